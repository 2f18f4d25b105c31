"""Where the host's time goes in one backbone train step: torch.profiler's CPU view, top ops by self time.

    python benchmarks/host_profile.py --model mv_hybrid --scan triton
"""
import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

import mambavision
from mambavision.ops.selective_scan import BACKEND_ENV


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mv_hybrid")
    p.add_argument("--scan", default="triton")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    os.environ[BACKEND_ENV] = args.scan
    model = mambavision.create_model(args.model).cuda().train()
    x = torch.randn(args.batch, 3, 256, 256, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.forward_features(x)
            (out["x_norm_clstoken"].float().mean() + out["x_norm_patchtokens"].float().mean()).backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    print(f"## {args.model}, scan={args.scan}: per step, top ops by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
