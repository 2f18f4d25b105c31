"""Which calls of one backbone train step synchronise the GPU with the host (torch.cuda.set_sync_debug_mode).

A sync in the step drains the GPU's queue, so the host's lead is lost and the GPU then idles while the host
catches up. Prints each synchronising call once, with the innermost frames of the project's code, then the
host time of the step with the GPU kept busy ahead of it.

    python benchmarks/find_syncs.py --model "mv_hybrid" --scan triton
"""
import argparse
import collections
import time
import traceback
import warnings

import torch

import mambavision
from mambavision.ops.selective_scan import BACKEND_ENV


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mv_hybrid")
    p.add_argument("--scan", default="triton")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    import os
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
    seen = collections.Counter()
    stacks = {}

    def show(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "site-packages" not in f.filename or "triton" in f.filename]
        key = tuple((f.filename.split("/")[-1], f.lineno) for f in frames[-4:])
        seen[key] += 1
        stacks.setdefault(key, (str(message)[:120], frames[-6:]))

    warnings.showwarning = show
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    step()
    torch.cuda.set_sync_debug_mode(0)
    print(f"{sum(seen.values())} synchronising calls in one step ({len(seen)} distinct)")
    for key, n in seen.most_common():
        msg, frames = stacks[key]
        print(f"- {n}x {msg}")
        for f in frames:
            print(f"    {f.filename.split('/')[-1]}:{f.lineno} {f.name}: {f.line}")
    big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    for _ in range(200):  # ~0.3 s of GPU work queued ahead: the step below issues without waiting for the GPU
        big @ big
    t0 = time.perf_counter()
    step()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    print(f"host time to issue one step: {host * 1e3:.1f} ms (GPU kept busy ahead)")


if __name__ == "__main__":
    main()
