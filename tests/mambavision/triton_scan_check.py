"""Cases and helpers for test_selective_scan_triton.py.

Run as a script, it checks the Triton selective scan against the sequential reference through Triton's
CPU interpreter and prints one JSON object of relative errors per case. TRITON_INTERPRET=1 has to be
set before triton is first imported (triton.language's own helpers are decorated at import), so the
test runs this file in a subprocess.
"""
import json
import os

import torch

from mambavision.ops.selective_scan import selective_scan_fn, selective_scan_ref

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# (batch, dim, length, dstate, groups): one group, groups of 16 and 32 channels, 40 channels (8-channel
# blocks), dstate not a power of two, lengths below, at and across the 32-step chunks (150: five chunks).
SHAPES = [(2, 64, 70, 4, 0), (2, 48, 33, 5, 3), (1, 64, 32, 8, 2), (2, 40, 1, 3, 1), (1, 32, 9, 16, 1),
          (1, 16, 150, 2, 0)]


COMPILED = "compiled-fullgraph-b2-d48-l33-n5-g3"
LAUNCHED = "launch-4x16x4-b2-d64-l70-n4-g2"  # a launch configuration other than the default rule's
OUT_ONLY = "out-only-b2-d64-l70-n4-g2"  # no gradient reaches the last state (the models' use)


def case_id(shape, dtype=torch.float32):
    return "b{}-d{}-l{}-n{}-g{}".format(*shape) + ("" if dtype == torch.float32 else "-" + str(dtype).split(".")[-1])


def inputs(b, d, l, n, groups, dtype=torch.float32, device="cpu", seed=0):
    """groups=0: B and C as (b, n, l); else (b, groups, n, l)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    bc = (b, groups, n, l) if groups else (b, n, l)
    t = dict(u=r(b, d, l), delta=0.5 * r(b, d, l), A=-(0.1 + 2 * torch.rand(d, n, generator=g)), B=r(*bc), C=r(*bc),
             D=r(d), z=r(b, d, l), delta_bias=0.1 * r(d))
    # model-like dtypes: activations in `dtype`, A / D / delta_bias in fp32 (as MV_Hybrid and Vim pass them)
    return {k: (v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v).to(device).requires_grad_()
            for k, v in t.items()}


def run(fn, args, use_last=True, **kw):
    """Output, last state and every input's gradient for a fixed random projection of both outputs (of ``out``
    alone with ``use_last=False``, as the models use the scan: then no gradient reaches the last state)."""
    out, last = fn(**args, delta_softplus=True, return_last_state=True, **kw)
    g = torch.Generator().manual_seed(1)
    proj = lambda x: (x.float() * torch.randn(x.shape, generator=g).to(x.device)).sum()  # noqa: E731
    grads = torch.autograd.grad(proj(out) + (proj(last) if use_last else 0), [args[k] for k in NAMES])
    return out, last, dict(zip(NAMES, grads))


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def errors(args, backend="triton", reference=None, fn=selective_scan_fn, use_last=True):
    """Relative errors of every output and gradient against the reference (default: the per-step loop)."""
    out, last, grads = run(fn, args, use_last, backend=backend)
    ref, ref_last, ref_grads = (run(selective_scan_ref, args, use_last) if reference is None
                                else run(selective_scan_fn, args, use_last, backend=reference))
    errs = {"out": rel(out, ref), "last": rel(last, ref_last)}
    errs.update({"d" + k: rel(grads[k], ref_grads[k]) for k in NAMES})
    errs["dtypes_kept"] = out.dtype == args["u"].dtype and all(grads[k].dtype == args[k].dtype for k in NAMES)
    return errs


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    results = {case_id(s): errors(inputs(*s)) for s in SHAPES}
    results[case_id((2, 32, 40, 4, 0), torch.bfloat16)] = errors(inputs(2, 32, 40, 4, 0, dtype=torch.bfloat16))
    # Traced by torch.compile in one graph (the kernels are custom ops), forward and backward.
    compiled = torch.compile(selective_scan_fn, fullgraph=True, backend="aot_eager")
    results[COMPILED] = errors(inputs(2, 48, 33, 5, 3), fn=compiled)
    from mambavision.ops import selective_scan_triton as sst

    results[OUT_ONLY] = errors(inputs(2, 64, 70, 4, 2), use_last=False)
    sst.LAUNCH = (4, 16, 4)  # five 16-step chunks, 4-channel programs
    results[LAUNCHED] = errors(inputs(2, 64, 70, 4, 2))
    print(json.dumps(results))
