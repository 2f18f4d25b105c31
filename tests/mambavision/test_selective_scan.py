"""The chunked torch selective scan against the sequential reference, and the dispatcher."""
import pytest
import torch

from mambavision.ops import selective_scan as ss
from mambavision.ops.selective_scan import selective_scan_fn, selective_scan_ref

ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(b=2, d=8, l=50, n=4, bc="variable", dtype=torch.float32, device="cpu", D=True, z=True, bias=True):
    """Random inputs in mamba-ssm's layout; bc is 'variable' (b,n,l), 'constant' (d,n) or 'groups' (b,2,n,l)."""
    kw = dict(dtype=dtype, device=device)
    shape_bc = {"variable": (b, n, l), "constant": (d, n), "groups": (b, 2, n, l)}[bc]
    args = {
        "u": torch.randn(b, d, l, **kw),
        "delta": 0.05 + 0.5 * torch.rand(b, d, l, **kw),  # positive, so stable without softplus too
        "A": -torch.exp(torch.randn(d, n, **kw)),  # negative, as the models make it
        "B": torch.randn(shape_bc, **kw),
        "C": torch.randn(shape_bc, **kw),
        "D": torch.randn(d, **kw) if D else None,
        "z": torch.randn(b, d, l, **kw) if z else None,
        "delta_bias": 0.1 * torch.randn(d, **kw) if bias else None,
    }
    return {k: (v.requires_grad_() if v is not None else None) for k, v in args.items()}


def grads(out, args):
    """Gradients of a fixed random projection of the output(s) w.r.t. every given input."""
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outs)
    names = [k for k in ARG_NAMES if args[k] is not None]
    return dict(zip(names, torch.autograd.grad(loss, [args[k] for k in names])))


def assert_close_rel(a, b, rtol, what=""):
    """Max-abs error relative to the reference's scale (robust for values near zero)."""
    err = (a.double() - b.double()).abs().max().item()
    scale = b.double().abs().max().item() + 1e-12
    assert err <= rtol * scale, f"{what}: max abs err {err:.3e} > {rtol} * {scale:.3e}"


@pytest.mark.parametrize("bc", ["variable", "constant", "groups"])
@pytest.mark.parametrize("l,chunk", [(1, 64), (50, 16), (50, 7), (257, 64), (17, 1)])
@pytest.mark.parametrize("extras", [True, False])
def test_forward_and_grads_match_reference_fp32(bc, l, chunk, extras):
    args = make_inputs(l=l, bc=bc, D=extras, z=extras, bias=extras)
    kw = dict(delta_softplus=extras, return_last_state=True)
    out, last = selective_scan_fn(**args, **kw, chunk_size=chunk, backend="torch")
    ref, ref_last = selective_scan_ref(**args, **kw)
    assert out.shape == (2, 8, l) and last.shape == (2, 8, 4)
    assert out.dtype == torch.float32 and last.dtype == torch.float32
    assert_close_rel(out, ref, 1e-5, "out")
    assert_close_rel(last, ref_last, 1e-5, "last_state")
    g, g_ref = grads((out, last), args), grads((ref, ref_last), args)
    assert g.keys() == g_ref.keys()
    for k in g:
        assert g[k].shape == args[k].shape, k
        assert_close_rel(g[k], g_ref[k], 1e-5, f"d{k}")


def test_without_last_state_returns_a_tensor_and_grads_match():
    args = make_inputs(l=33)
    out = selective_scan_fn(**args, delta_softplus=True, chunk_size=8)
    ref = selective_scan_ref(**args, delta_softplus=True)
    assert isinstance(out, torch.Tensor) and out.is_contiguous()
    assert_close_rel(out, ref, 1e-5)
    g, g_ref = grads(out, args), grads(ref, args)
    for k in g:
        assert_close_rel(g[k], g_ref[k], 1e-5, f"d{k}")


def test_recurrence_by_hand():
    """One channel, one state: h_t = exp(dt*a) h_{t-1} + dt*b_t*u_t, y_t = c_t h_t + D u_t."""
    u = torch.tensor([[[1.0, 2.0, -1.0]]])
    dt = torch.tensor([[[0.5, 1.0, 2.0]]])
    A = torch.tensor([[-1.0]])
    B = torch.tensor([[[1.0, 0.5, 2.0]]])
    C = torch.tensor([[[2.0, 1.0, -1.0]]])
    D = torch.tensor([0.25])
    h, expected = 0.0, []
    for t in range(3):
        h = torch.exp(dt[0, 0, t] * -1.0) * h + dt[0, 0, t] * B[0, 0, t] * u[0, 0, t]
        expected.append(C[0, 0, t] * h + 0.25 * u[0, 0, t])
    out, last = selective_scan_fn(u, dt, A, B, C, D, return_last_state=True, chunk_size=2)
    torch.testing.assert_close(out[0, 0], torch.stack(expected))
    torch.testing.assert_close(last[0, 0, 0], h)


def test_groups_follow_mamba_channel_to_group_mapping():
    """With groups, channel d reads group d // (dim // groups): equal to repeating B, C per channel."""
    args = make_inputs(bc="groups", d=8)
    per_channel = {k: v.detach() for k, v in args.items()}
    for k in ("B", "C"):  # (b, 2, n, l) -> one group per channel: (b, 8, n, l)
        per_channel[k] = per_channel[k].repeat_interleave(4, dim=1)
    out = selective_scan_fn(**args, chunk_size=16)
    torch.testing.assert_close(out, selective_scan_fn(**per_channel, chunk_size=16))


def test_mixed_group_counts():
    args = make_inputs(bc="groups", d=8)
    args["C"] = torch.randn(2, 4, 4, 50, requires_grad=True)  # B has 2 groups, C has 4
    out = selective_scan_fn(**args, chunk_size=16)
    ref = selective_scan_ref(**args)
    assert_close_rel(out, ref, 1e-5)
    g, g_ref = grads(out, args), grads(ref, args)
    for k in g:
        assert_close_rel(g[k], g_ref[k], 1e-5, f"d{k}")


@pytest.mark.parametrize("bc", ["variable", "constant"])
def test_bf16_inputs(bc):
    args = make_inputs(l=50, bc=bc, dtype=torch.bfloat16)
    kw = dict(delta_softplus=True, return_last_state=True)
    out, last = selective_scan_fn(**args, **kw, chunk_size=16)
    ref, ref_last = selective_scan_ref(**args, **kw)
    # The same bf16 inputs, both computed in fp32: only the final rounding to bf16 may differ.
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    assert_close_rel(out, ref, 1e-2, "out")
    assert_close_rel(last, ref_last, 1e-5, "last_state")
    # Against an fp32 run on fp32 copies of those inputs: bf16 output rounding only.
    fp32 = {k: (v.detach().float() if v is not None else None) for k, v in args.items()}
    assert_close_rel(out, selective_scan_ref(**fp32, delta_softplus=True), 1e-2, "out vs fp32")
    g, g_ref = grads((out, last), args), grads((ref, ref_last), args)
    for k in g:
        assert g[k].dtype == torch.bfloat16, k
        assert_close_rel(g[k], g_ref[k], 2e-2, f"d{k}")


def test_autocast_does_not_lower_the_scan_precision():
    args = {k: (v.detach() if v is not None else None) for k, v in make_inputs(l=40).items()}
    plain = selective_scan_fn(**args, delta_softplus=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = selective_scan_fn(**args, delta_softplus=True)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain)


def test_large_decays_stay_finite():
    """delta * A of several hundred per step must not overflow (no exp of positive sums)."""
    args = {k: (v.detach() if v is not None else None) for k, v in make_inputs(l=70).items()}
    args["delta"] = 30.0 + 20.0 * torch.rand_like(args["delta"])
    args["A"] = -16.0 * torch.ones_like(args["A"])
    out = selective_scan_fn(**args, delta_softplus=True, chunk_size=32)
    assert torch.isfinite(out).all()
    assert_close_rel(out, selective_scan_ref(**args, delta_softplus=True), 1e-5)


def test_backward_memory_is_bounded_by_the_chunk():
    """Saved-for-backward memory is a few (b, d, l) tensors, not the (b, d, l, n) states."""
    b, d, l, n = 2, 64, 256, 64
    args = make_inputs(b=b, d=d, l=l, n=n)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = selective_scan_fn(**args, delta_softplus=True, chunk_size=32)
    full_states = b * d * l * n * 4
    assert sum(saved) < full_states / 4, f"saved {sum(saved)} bytes, all states would be {full_states}"
    out.sum().backward()  # and the backward still runs from what was saved
    assert torch.isfinite(args["A"].grad).all()


def test_gradcheck_float64():
    args = make_inputs(b=1, d=2, l=5, n=2, dtype=torch.float64)
    fn = lambda *xs: selective_scan_fn(  # noqa: E731
        *xs, delta_softplus=True, return_last_state=True, chunk_size=2, backend="torch"
    )
    assert torch.autograd.gradcheck(fn, tuple(args[k] for k in ARG_NAMES))


def test_gradcheck_float64_constant_bc():
    args = make_inputs(b=2, d=2, l=4, n=3, bc="constant", dtype=torch.float64, D=False, z=False, bias=False)
    fn = lambda u, dt, A, B, C: selective_scan_fn(u, dt, A, B, C, return_last_state=True, chunk_size=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(args[k] for k in ("u", "delta", "A", "B", "C")))


@pytest.mark.parametrize(
    "name,bad,match",
    [
        ("B", torch.randn(2, 4, 49), "B must be"),
        ("C", torch.randn(2, 3, 4, 50), "C must be"),
        ("A", torch.randn(7, 4), "A must be"),
        ("D", torch.randn(3), "D must be"),
        ("z", torch.randn(2, 8, 49), "z must have"),
        ("delta", torch.randn(2, 8, 49), "delta must have"),
        ("delta_bias", torch.randn(8, 1), "delta_bias must be"),
    ],
)
def test_bad_shapes_are_named(name, bad, match):
    args = {k: (v.detach() if v is not None else None) for k, v in make_inputs().items()}
    args[name] = bad
    with pytest.raises(ValueError, match=match):
        selective_scan_fn(**args)


def test_backend_selection(monkeypatch):
    args = {k: (v.detach() if v is not None else None) for k, v in make_inputs(l=10).items()}
    with pytest.raises(ValueError, match="unknown selective-scan backend"):
        selective_scan_fn(**args, backend="triton-please")
    monkeypatch.setenv(ss.BACKEND_ENV, "nope")
    with pytest.raises(ValueError, match="'nope'"):
        selective_scan_fn(**args)
    monkeypatch.setenv(ss.BACKEND_ENV, "torch")
    selective_scan_fn(**args)

    calls = []

    def fake_cuda(*a):
        calls.append(a)
        return "from-cuda"

    monkeypatch.setattr(ss, "_mamba_ssm_scan", lambda: fake_cuda)
    monkeypatch.delenv(ss.BACKEND_ENV)
    # auto: a CPU tensor never goes to the CUDA kernel, even when mamba-ssm imports.
    assert isinstance(selective_scan_fn(**args), torch.Tensor) and not calls
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        selective_scan_fn(**args, backend="cuda")
    monkeypatch.setattr(ss, "_mamba_ssm_scan", lambda: None)
    with pytest.raises(RuntimeError, match="needs mamba-ssm"):
        selective_scan_fn(**args, backend="cuda")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_mamba = pytest.mark.skipif(
    not (torch.cuda.is_available() and ss.mamba_ssm_available()), reason="needs CUDA and mamba-ssm"
)
MV_HYBRID_SHAPES = [(8, 384, 257, 16), (8, 384, 50, 16)]  # (batch, d_inner/2, tokens+cls, d_state)


def _report(tag, a, b):
    err = (a.double() - b.double()).abs().max().item()
    rel = err / (b.double().abs().max().item() + 1e-12)
    print(f"{tag}: max abs {err:.3e}, rel {rel:.3e}")
    return rel


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_on_cuda_matches_reference(dtype):
    args = make_inputs(b=2, d=32, l=257, n=16, dtype=dtype, device="cuda")
    out = selective_scan_fn(**args, delta_softplus=True, backend="torch")
    ref = selective_scan_ref(**args, delta_softplus=True)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert _report(f"torch-cuda {dtype} out", out, ref) < tol
    g, g_ref = grads(out, args), grads(ref, args)
    for k in g:
        assert _report(f"torch-cuda {dtype} d{k}", g[k], g_ref[k]) < tol * 10


@needs_mamba
@pytest.mark.parametrize("shape", MV_HYBRID_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba_ssm_cuda_kernel_matches_torch_path(shape, dtype):
    b, d, l, n = shape
    args = make_inputs(b=b, d=d, l=l, n=n, dtype=dtype, device="cuda", z=False)
    # As MV_Hybrid calls it: fp32 A, D and delta_bias, softplus on.
    for k in ("A", "D", "delta_bias"):
        args[k] = args[k].detach().float().requires_grad_()
    kw = dict(delta_softplus=True, return_last_state=True)
    out, last = selective_scan_fn(**args, **kw, backend="cuda")
    ref, ref_last = selective_scan_fn(**args, **kw, backend="torch")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert _report(f"cuda-vs-torch {shape} {dtype} out", out, ref) < tol
    assert _report(f"cuda-vs-torch {shape} {dtype} last", last, ref_last) < tol
    # Gradients of the output only: mamba-ssm's backward drops the gradient arriving through
    # last_state (its backward takes ``dout, *args`` and ignores the rest); our torch path keeps it.
    # No model here backpropagates through the last state (docs/deviations.md).
    g, g_ref = grads(out, args), grads(ref, args)
    for k in g:
        assert _report(f"cuda-vs-torch {shape} {dtype} d{k}", g[k], g_ref[k]) < tol * 10
