"""Host cost of the Triton selective scan's Python wrappers, with the kernel launch stubbed out (no GPU needed).

Times ``_fwd`` and ``_bwd`` of ``mambavision.ops.selective_scan_triton`` on tiny CPU tensors, so what is timed is
the wrappers' Python and PyTorch op dispatch (allocations, copies, the dB/dC reduction), not arithmetic. For a
before/after, run it from a copy of the older tree: ``git archive <rev> mambavision benchmarks | tar -x -C /tmp/old``
and ``python /tmp/old/benchmarks/scan_wrapper_time.py``.

    python benchmarks/scan_wrapper_time.py --calls 2000
"""
import argparse
import inspect
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the tree this file is in
from mambavision.ops import selective_scan_triton as sst  # noqa: E402


def _noop(kernel, grid):
    return lambda *args, **kwargs: None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    b, d, l, n = 1, 32, 8, 16
    u = torch.randn(b, d, l, generator=g).bfloat16()
    delta, dout = torch.randn_like(u), torch.randn_like(u)
    A, D, bias = -torch.rand(d, n, generator=g), torch.randn(d, generator=g), torch.randn(d, generator=g)
    B = torch.randn(b, 1, n, l, generator=g).bfloat16()
    C = torch.randn_like(B)

    def fwd():
        return sst._fwd(u, delta, A, B, C, D, None, bias, True, _noop)

    out = fwd()
    if "A_nd" in inspect.signature(sst._bwd).parameters:  # since 20cd7b9: A as (n, d) from the forward, no dlast
        def bwd():
            return sst._bwd(u, delta, A, out[3], B, C, D, None, bias, out[2], dout, None, True, _noop)
    else:  # before: autograd handed a zero dlast
        def bwd():
            return sst._bwd(u, delta, A, B, C, D, None, bias, out[2], dout, torch.zeros(b, d, n), True, _noop)
    for name, fn in (("forward", fwd), ("backward", bwd)):
        for _ in range(200):
            fn()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            fn()
        print(f"{name}: {(time.perf_counter() - t0) / args.calls * 1e6:.1f} us of host per call (launch stubbed)")


if __name__ == "__main__":
    main()
