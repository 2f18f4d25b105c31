"""The Mamba-2 SSD scan (mambavision/ops/ssd.py): chunked torch path vs the step-by-step recurrence,
and, on CUDA with mamba-ssm installed, mamba-ssm's Triton kernels vs the torch path."""
import pytest
import torch

from mambavision.ops import ssd
from mambavision.ops.ssd import mamba_chunk_scan_combined, ssd_backends, ssd_ref


def make_inputs(b=2, l=50, h=4, p=8, g=1, n=16, dtype=torch.float32, device="cpu", D_per_channel=False):
    gen = torch.Generator().manual_seed(1234)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    t = dict(
        x=r(b, l, h, p),
        dt=r(b, l, h) - 1.0,
        A=-torch.rand(h, generator=gen) * 2 - 0.1,
        B=r(b, l, g, n) * 0.5,
        C=r(b, l, g, n) * 0.5,
        D=r(h, p) if D_per_channel else r(h),
        z=r(b, l, h, p),
        dt_bias=r(h) * 0.5,
    )
    return {k: v.to(device=device, dtype=dtype if k in ("x", "dt", "B", "C", "z") else torch.float32) for k, v in t.items()}


def run(fn, t, **kw):
    return fn(t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True, **kw)


@pytest.mark.parametrize("l", [50, 257, 64])
@pytest.mark.parametrize("groups", ["one", "per_head"])
def test_chunked_matches_sequential_forward(l, groups):
    h = 4
    t = make_inputs(l=l, h=h, g=1 if groups == "one" else h)
    init = torch.randn(2, h, 8, 16)
    y, final = run(lambda *a, **k: mamba_chunk_scan_combined(*a, chunk_size=16, backend="torch", **k), t,
                   initial_states=init, return_final_states=True)
    y_ref, final_ref = run(ssd_ref, t, initial_states=init, return_final_states=True)
    assert y.shape == t["x"].shape and y.dtype == torch.float32
    assert final.shape == (2, h, 8, 16)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final, final_ref, atol=1e-4, rtol=1e-4)


def test_chunk_size_is_only_a_speed_knob():
    t = make_inputs(l=37)
    ys = [run(lambda *a, **k: mamba_chunk_scan_combined(*a, chunk_size=c, backend="torch", **k), t) for c in (1, 5, 16, 256)]
    for y in ys[1:]:
        torch.testing.assert_close(y, ys[0], atol=1e-4, rtol=1e-4)


def test_matches_hand_computed_scan_without_options():
    # y_t = sum_{s<=t} exp(A * (dt_{s+1} + ... + dt_t)) dt_s <C_t, B_s> x_s, written out directly.
    b, l, h, p, n = 1, 6, 2, 3, 4
    x, dt = torch.randn(b, l, h, p), torch.rand(b, l, h)
    A, B, C = -torch.rand(h), torch.randn(b, l, 1, n), torch.randn(b, l, 1, n)
    y = mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size=4, backend="torch")
    expect = torch.zeros_like(y)
    for t_ in range(l):
        for s in range(t_ + 1):
            decay = torch.exp(A * dt[0, s + 1 : t_ + 1].sum(0))  # (h,)
            w = decay * dt[0, s] * (C[0, t_, 0] @ B[0, s, 0])
            expect[0, t_] += w[:, None] * x[0, s]
    torch.testing.assert_close(y, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("l", [50, 37])
@pytest.mark.parametrize("groups", ["one", "per_head"])
def test_chunked_matches_sequential_backward(l, groups):
    h = 4
    t = make_inputs(l=l, h=h, g=1 if groups == "one" else h)
    names = ("x", "dt", "A", "B", "C", "D", "dt_bias", "z")
    grads = []
    for fn in (lambda *a, **k: mamba_chunk_scan_combined(*a, chunk_size=16, backend="torch", **k), ssd_ref):
        leaves = {k: v.clone().requires_grad_(k in names) for k, v in t.items()}
        y = run(fn, leaves)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=torch.float32)).reshape(y.shape))
        grads.append({k: leaves[k].grad for k in names})
    for k in names:
        assert grads[0][k] is not None and torch.isfinite(grads[0][k]).all(), k
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=2e-4, rtol=2e-4, msg=lambda m: f"grad of {k}: {m}")


def test_bf16_inputs_compute_in_fp32_and_return_bf16():
    t = make_inputs(l=50, dtype=torch.bfloat16)
    y = run(lambda *a, **k: mamba_chunk_scan_combined(*a, chunk_size=16, backend="torch", **k), t)
    assert y.dtype == torch.bfloat16
    # Same bf16 values, exact fp32 recurrence: only the final rounding to bf16 differs.
    y_ref = run(ssd_ref, {k: v.float() for k, v in t.items()})
    torch.testing.assert_close(y.float(), y_ref, atol=2e-2, rtol=1e-2)
    # And gradients flow back to bf16 leaves.
    x = t["x"].clone().requires_grad_()
    mamba_chunk_scan_combined(x, t["dt"], t["A"], t["B"], t["C"], 16, dt_softplus=True, backend="torch").sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_per_channel_D_and_dt_limit():
    t = make_inputs(l=21, D_per_channel=True)
    kw = dict(dt_limit=(0.05, 0.5))
    y = run(lambda *a, **k: mamba_chunk_scan_combined(*a, chunk_size=8, backend="torch", **k), t, **kw)
    torch.testing.assert_close(y, run(ssd_ref, t, **kw), atol=1e-4, rtol=1e-4)
    # the limit is active: without it the result differs
    assert not torch.allclose(y, run(ssd_ref, t), atol=1e-3)


def test_clear_errors_on_bad_shapes_and_backends(monkeypatch):
    t = make_inputs(l=8, h=4, g=3)
    with pytest.raises(ValueError, match="ngroups=3 must divide nheads=4"):
        run(lambda *a, **k: mamba_chunk_scan_combined(*a, chunk_size=4, **k), t)
    t = make_inputs(l=8)
    with pytest.raises(ValueError, match="dt must have shape"):
        mamba_chunk_scan_combined(t["x"], t["dt"][:, :4], t["A"], t["B"], t["C"], 4)
    # One meaning per name across ops: "triton" is the project's own kernel, and the SSD has none.
    with pytest.raises(ValueError, match="unknown SSD backend 'triton'.*'cuda'"):
        mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 4, backend="triton")
    monkeypatch.setenv("MAMBAVISION_SSD_BACKEND", "tirton")
    with pytest.raises(ValueError, match="MAMBAVISION_SSD_BACKEND"):
        mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 4)
    monkeypatch.setenv("MAMBAVISION_SSD_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):  # CPU tensor, or mamba-ssm missing: both named
        mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 4)


def test_auto_dispatch_never_sends_cpu_tensors_to_triton(monkeypatch):
    calls = []
    fake_triton = lambda *a, **k: calls.append(1)  # noqa: E731
    monkeypatch.setattr(ssd, "_triton_fn", lambda: fake_triton)
    monkeypatch.delenv("MAMBAVISION_SSD_BACKEND", raising=False)
    t = make_inputs(l=8)
    y = mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 4)
    assert not calls and y.shape == t["x"].shape
    assert "cuda" in ssd_backends()


# -- CUDA: mamba-ssm's Triton kernels against the torch path at Hydra's full-size shapes --------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in ssd_backends(), reason="needs CUDA and mamba-ssm"
)
# Hydra at d=384: batch 8 stacked twice (two directions), L=257, 12 heads of 64, d_state 64, one group.
HYDRA_SHAPE = dict(b=16, l=257, h=12, p=64, g=1, n=64)


def _hydra_inputs(dtype):
    t = make_inputs(dtype=dtype, device="cuda", **HYDRA_SHAPE)
    t["A"] = -torch.ones(12, device="cuda")  # Hydra's init
    t["D"] = t["z"] = None
    return t


def _errors(a, b):
    diff = (a.float() - b.float()).abs()
    return diff.max().item(), (diff.max() / b.float().abs().max().clamp_min(1e-12)).item()


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_torch_path_matches_cpu(dtype):
    t = make_inputs(l=257, h=4, dtype=dtype)
    y_cpu = run(lambda *a, **k: mamba_chunk_scan_combined(*a, chunk_size=64, backend="torch", **k), t)
    y_gpu = run(lambda *a, **k: mamba_chunk_scan_combined(*a, chunk_size=64, backend="torch", **k),
                {k: v.cuda() for k, v in t.items()})
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y_gpu.cpu().float(), y_cpu.float(), atol=tol, rtol=tol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_torch_at_hydra_shapes(dtype):
    t = _hydra_inputs(dtype)
    truth = run(ssd_ref, {k: (v.double() if v is not None else None) for k, v in t.items()})  # fp64 recurrence
    names = ("x", "dt", "A", "B", "C", "dt_bias")
    outs, grads = {}, {}
    for backend in ("cuda", "torch"):
        leaves = {k: (v.clone().requires_grad_(k in names) if v is not None else None) for k, v in t.items()}
        y = run(lambda *a, **k: mamba_chunk_scan_combined(*a, chunk_size=256, backend=backend, **k), leaves)
        y.float().pow(2).mean().backward()
        outs[backend] = y.detach()
        grads[backend] = {k: leaves[k].grad for k in names}
        print(f"\nSSD {dtype} forward {backend} vs fp64 recurrence: max abs %.3e, max rel %.3e" % _errors(y, truth))
    abs_err, rel_err = _errors(outs["cuda"], outs["torch"])
    print(f"SSD {dtype} forward triton vs torch: max abs {abs_err:.3e}, max rel {rel_err:.3e}")
    # Triton's fp32 matmuls run in TF32 (10-bit mantissa), hence ~1e-3 there; our torch path is full fp32.
    tol = 5e-3 if dtype == torch.float32 else 2e-2
    assert rel_err < tol
    if dtype == torch.float32:
        assert _errors(outs["torch"], truth)[1] < 1e-4
    for k in names:
        abs_err, rel_err = _errors(grads["cuda"][k], grads["torch"][k])
        print(f"SSD {dtype} grad {k:8s} triton vs torch: max abs {abs_err:.3e}, max rel {rel_err:.3e}")
        assert rel_err < 4 * tol, k
