"""The fast GPU backends against our PyTorch paths, one whole token mixer at a time, at full size.

Each mixer runs twice on the same weights and input: once with every op forced to its PyTorch
path, once with compiled kernels (mamba-ssm's selective scan and causal-conv1d, our Triton selective
scan, mamba-ssm's Triton SSD). Output, input gradient and every parameter gradient are compared, in fp32 and under
bf16 autocast (as in training). CUDA-only: skipped on CPU machines and where the kernel is absent.
Run with ``-s`` to see the errors (benchmarks/gpu_session.sh does).
"""
import pytest
import torch

from mambavision.models.hydra import HydraMixer
from mambavision.models.mv_hybrid import MambaVisionMixer
from mambavision.models.vim import VimMixer
from mambavision.ops import causal_conv1d as cc
from mambavision.ops import selective_scan as ss
from mambavision.ops import ssd

BATCH, TOKENS, DIM = 8, 257, 384  # full-size pretraining shapes: 16x16 patches + CLS, 384-d
ENV = {"scan": ss.BACKEND_ENV, "conv": cc.BACKEND_ENV, "ssd": ssd._ENV_VAR}


def _available(op, backend):
    return {
        ("scan", "cuda"): ss.mamba_ssm_available,
        ("scan", "triton"): ss.triton_scan_available,
        ("conv", "cuda"): cc.causal_conv1d_available,
        ("ssd", "cuda"): lambda: ssd._triton_fn() is not None,
    }[(op, backend)]()


# name -> (mixer factory, the fast backends it is run with; every other op stays on torch)
MIXERS = {
    "mv_hybrid": (lambda: MambaVisionMixer(DIM), {"scan": "cuda"}),
    "mv_hybrid-triton": (lambda: MambaVisionMixer(DIM), {"scan": "triton"}),
    "vim": (lambda: VimMixer(DIM), {"scan": "cuda", "conv": "cuda"}),
    "vim-triton": (lambda: VimMixer(DIM), {"scan": "triton"}),
    "hydra": (lambda: HydraMixer(DIM), {"ssd": "cuda"}),
}


def _run(mixer, x, dtype, backends, monkeypatch):
    for op, choice in backends.items():
        monkeypatch.setenv(ENV[op], choice)
    mixer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = mixer(x)
    # A fixed random projection of the output as the loss, so every output element gets a gradient.
    g = torch.Generator(device="cuda").manual_seed(1)
    (y.float() * torch.randn(y.shape, device="cuda", generator=g)).sum().backward()
    grads = {"input": x.grad.detach()}
    grads.update({n: p.grad.detach() for n, p in mixer.named_parameters()})
    return y.detach(), grads


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(MIXERS))
def test_cuda_kernels_match_torch_path_for_mixer(name, dtype, monkeypatch):
    factory, fast = MIXERS[name]
    missing = [f"{op}={b}" for op, b in fast.items() if not _available(op, b)]
    if missing:
        pytest.skip(f"not importable here: {', '.join(missing)}")
    fast = {op: fast.get(op, "torch") for op in ENV}
    torch.manual_seed(0)
    mixer = factory().cuda()
    x = torch.randn(BATCH, TOKENS, DIM, device="cuda")
    y_ref, g_ref = _run(mixer, x, dtype, {op: "torch" for op in ENV}, monkeypatch)
    y_fast, g_fast = _run(mixer, x, dtype, fast, monkeypatch)

    label = f"{name} mixer {str(dtype).split('.')[-1]} [{', '.join(f'{k}={v}' for k, v in fast.items())}]"
    out_err = _rel(y_fast, y_ref)
    grad_errs = {k: _rel(g_fast[k], g_ref[k]) for k in g_ref}
    worst = max((k for k in grad_errs if k != "input"), key=grad_errs.get)
    print(f"\n{label}: forward max rel {out_err:.2e}; input grad {grad_errs['input']:.2e}; "
          f"worst parameter grad {worst} {grad_errs[worst]:.2e}")
    for k in sorted(grad_errs):
        print(f"    d{k:12s} {grad_errs[k]:.2e}")

    # mamba-ssm's scan is full fp32 (~1e-6); Triton's SSD matmuls run in TF32 (~1e-3). Under bf16
    # autocast the projections round to 8 mantissa bits, and the paths round at different places.
    if dtype == torch.float32:
        tol = 5e-3 if fast["ssd"] == "cuda" else 1e-4
    else:
        tol = 3e-2
    assert out_err < tol
    for k, err in grad_errs.items():
        assert err < 10 * tol, f"d{k}: {err:.2e}"
