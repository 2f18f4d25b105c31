"""Host time of one selective-scan call (forward + backward) per backend, and where it goes (cProfile).

An eager step waits on the host when the kernels are shorter than the Python that launches them, so
the kernel time alone does not say how fast a call is. This prints, per backend, the wall time of a
call with the GPU kept busy ahead of it (a long matmul queued first, so the host never waits on the GPU),
and the top functions of the host's time.

    python benchmarks/scan_host_time.py --backends cuda,triton --calls 50
"""
import argparse
import cProfile
import io
import pstats
import time

import torch

from bench_selective_scan import make_inputs
from mambavision.ops.selective_scan import selective_scan_fn


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="cuda,triton")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--shape", default="64,384,264,16", help="batch,dim,length,dstate")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    b, d, l, n = (int(v) for v in args.shape.split(","))
    inp = make_inputs(l, torch.device("cuda"), torch.bfloat16, batch=b, dim=d, dstate=n)
    big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for be in args.backends.split(","):
        def call():
            y = selective_scan_fn(**inp, delta_softplus=True, backend=be)
            y.backward(torch.ones_like(y))
        for _ in range(5):
            call()
        torch.cuda.synchronize()
        for _ in range(10):  # ~10 ms of GPU work queued ahead: the calls below never wait for the GPU
            big @ big
        t0 = time.perf_counter()
        for _ in range(args.calls):
            call()
        plain_ms = (time.perf_counter() - t0) / args.calls * 1e3
        torch.cuda.synchronize()
        for _ in range(10):
            big @ big
        t0 = time.perf_counter()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            call()
        prof.disable()
        host_ms = (time.perf_counter() - t0) / args.calls * 1e3
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
        print(f"## {be}: {plain_ms:.3f} ms of host per forward + backward ({host_ms:.3f} with cProfile on; "
              f"{args.calls} calls)")
        print(s.getvalue())


if __name__ == "__main__":
    main()
