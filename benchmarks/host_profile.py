"""Where the host's time goes in one backbone train step (forward_features + backward, bf16 autocast).

First it times the step twice over: how long the host takes to issue it (until ``backward()`` returns) and
how long until the GPU has run it. When the two are equal the step is bound by the host: the GPU waits for
launches. Then it prints torch.profiler's CPU view, the top ops by self time, or with ``--cprofile`` the
Python functions by own time (the profiler's hooks cost host time of their own; cProfile's cost falls on Python
calls only). With ``--find-syncs`` it instead lists the calls of the step that synchronise the GPU with the host
(``torch.cuda.set_sync_debug_mode``): a sync drains the GPU's queue, so the host's lead is lost and the GPU then
idles while the host catches up.

``--model`` takes a backbone spec of ``bench_gpu.py`` (``name[scan=...,compile=...,mode=...]``).

    python benchmarks/host_profile.py --model "mv_hybrid[scan=triton]"
    python benchmarks/host_profile.py --model "mv_hybrid[scan=triton,compile=blocks]" --cprofile
    python benchmarks/host_profile.py --model "mv_hybrid[scan=triton]" --find-syncs
"""
import argparse
import collections
import cProfile
import os
import pstats
import statistics
import sys
import time
import traceback
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import build_backbone  # noqa: E402  (puts the repository on sys.path)
from bench_backbones import make_step  # noqa: E402
from mambavision.ops.selective_scan import BACKEND_ENV  # noqa: E402


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


def host_lead(step, reps=10):
    """Median ms per step: the host's issue time (``step()`` returns) and the wall time (the GPU is done)."""
    issue, wall = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        issue.append((t1 - t0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(issue), statistics.median(wall)


def gpu_busy_ms(step, reps=3):
    """GPU kernel time per step (torch.profiler; kernels, copies and memsets)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3 / reps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mv_hybrid", help="backbone spec, as bench_gpu.py's --backbones")
    p.add_argument("--scan", default="triton", help="selective-scan backend when the spec names none")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--cprofile", action="store_true", help="Python functions by own time (cProfile) instead")
    p.add_argument("--find-syncs", action="store_true", help="list the synchronising calls instead")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("host_profile.py times the host against a CUDA GPU's queue: it needs one")
    model, scan, graphs = build_backbone(args.model, tiny=False)
    os.environ[BACKEND_ENV] = scan or args.scan
    model = model.cuda().train()
    x = torch.randn(args.batch, 3, 256, 256, device="cuda")

    step = make_step(model, x, True, torch.bfloat16, graphs)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    if args.find_syncs:
        list_syncs(step)
        return
    issue, wall = host_lead(step)
    busy = gpu_busy_ms(step)
    print(f"## {args.model}, scan={os.environ[BACKEND_ENV]}, bs {args.batch}: per step, median of 10")
    print(f"host issue {issue:.1f} ms, wall {wall:.1f} ms, GPU kernels {busy:.1f} ms "
          f"({'host-bound' if issue > 0.9 * wall else 'GPU-bound'}; {args.batch / wall * 1e3:.0f} images/s)")
    if args.cprofile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        prof.disable()
        print("### two steps, Python functions by own time")
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
        print("### by cumulative time")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(args.top)
        return
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    print("### two steps, top ops by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
