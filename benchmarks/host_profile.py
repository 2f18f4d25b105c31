"""Where the host's time goes in one backbone train step (forward_features + backward, bf16 autocast).

Prints torch.profiler's CPU view, the top ops by self time. With ``--find-syncs`` it instead lists the calls of
the step that synchronise the GPU with the host (``torch.cuda.set_sync_debug_mode``): a sync drains the GPU's
queue, so the host's lead is lost and the GPU then idles while the host catches up.

    python benchmarks/host_profile.py --model mv_hybrid --scan triton
    python benchmarks/host_profile.py --model mv_hybrid --scan triton --find-syncs
"""
import argparse
import collections
import os
import traceback
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

import mambavision
from mambavision.ops.selective_scan import BACKEND_ENV


def list_syncs(step):
    seen, stacks = collections.Counter(), {}

    def show(message, category, filename, lineno, file=None, line=None):
        if str(message).startswith("Synchronization debug mode is a prototype"):
            return  # the mode's own notice, not a sync
        frames = [f for f in traceback.extract_stack()[:-1] if "site-packages" not in f.filename]
        key = tuple((f.filename, f.lineno) for f in frames[-4:])
        seen[key] += 1
        stacks.setdefault(key, (str(message)[:120], frames[-6:]))

    saved = warnings.showwarning
    warnings.showwarning = show
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = saved
    print(f"{sum(seen.values())} synchronising calls in one step ({len(seen)} distinct)")
    for key, n in seen.most_common():
        msg, frames = stacks[key]
        print(f"- {n}x {msg}")
        for f in frames:
            print(f"    {os.path.basename(f.filename)}:{f.lineno} {f.name}: {f.line}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mv_hybrid")
    p.add_argument("--scan", default="triton", help="selective-scan backend (cuda, triton, torch)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--find-syncs", action="store_true", help="list the synchronising calls instead")
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
    if args.find_syncs:
        list_syncs(step)
        return
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    print(f"## {args.model}, scan={args.scan}: two steps, top ops by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
