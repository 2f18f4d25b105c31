"""The project's Triton selective scan, against the sequential reference.

On CPU the kernels run through Triton's CPU interpreter in a subprocess (TRITON_INTERPRET=1 must be
set before triton is imported), which executes the same kernel code on NumPy; on a GPU the compiled
kernels are compared against the PyTorch path at full-size MV_Hybrid and Vim shapes.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from mambavision.ops import selective_scan as ss
from mambavision.ops.selective_scan import selective_scan_fn
from triton_scan_check import COMPILED, LAUNCHED, OUT_ONLY, SHAPES, case_id, errors, inputs

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CASES = [case_id(s) for s in SHAPES] + [case_id((2, 32, 40, 4, 0), torch.bfloat16), COMPILED, LAUNCHED, OUT_ONLY]


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")  # a dependency of torch on Linux, so CI always has it
    if torch.cuda.is_available():
        # There the compiled kernel is compared directly (test_cuda_triton_kernel_matches_torch_path);
        # Triton 3.6's interpreter (the GPU box's) also fails on loops over runtime scalars under numpy 2.
        pytest.skip("CUDA present: the compiled kernel is tested instead of the interpreter")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(HERE, "triton_scan_check.py")], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_interpreted_kernel_matches_reference(case, interpreted):
    errs = dict(interpreted[case])
    assert errs.pop("dtypes_kept"), "output / gradient dtypes differ from the inputs'"
    tol = 1e-5 if "bfloat16" not in case else 2e-2  # bf16: the output is rounded to bf16 after the fp32 scan
    if "bfloat16" in case:
        assert errs["last"] < 1e-5  # the last state stays fp32
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, bad


@pytest.mark.parametrize("kernel", ["_scan_fwd_kernel", "_scan_bwd_kernel"], ids=["fwd", "bwd"])
@pytest.mark.parametrize("act", ["fp32", "bf16"])
def test_kernels_compile_for_h100(kernel, act):
    """The interpreter does not type-check; compiling to an sm_90 cubin (no GPU needed) does."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mambavision.ops import selective_scan_triton as sst

    fn = getattr(sst, kernel)
    bd, chunk, _ = sst._config()  # the launch configuration the models use
    consts = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, K=chunk, BD=bd, BN=16)
    if kernel == "_scan_bwd_kernel":
        consts["HAS_DLAST"] = True
    # activations (and their gradients) in `act`; A, D, delta_bias, states and fp32 accumulators in fp32
    fp32_ptrs = {"A_ptr", "D_ptr", "bias_ptr", "last_ptr", "ckpt_ptr", "scratch_ptr", "dlast_ptr", "sums_ptr",
                 "parts_ptr"}
    signature = {a: "constexpr" if a in consts else ("*fp32" if a in fp32_ptrs else f"*{act}") if a.endswith("_ptr")
                 else "i32" for a in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", 90, 32))
    assert len(compiled.asm["cubin"]) > 0 and ".target sm_90" in compiled.asm["ptx"]


def test_dispatch_rules(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(ss.BACKEND_ENV, raising=False)
    args = {k: v.detach() for k, v in inputs(1, 32, 8, 4, 0).items()}
    calls = []
    monkeypatch.setattr(ss, "_triton_scan", lambda: (lambda *a: calls.append(a)))
    selective_scan_fn(**args)  # auto on CPU: the PyTorch path, the kernel is never called
    assert not calls
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        selective_scan_fn(**args, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="time-varying B and C"):
        selective_scan_fn(**dict(args, B=torch.randn(32, 4)), backend="triton")  # constant B: torch only
    with pytest.raises(RuntimeError, match="fp32/bf16/fp16"):
        selective_scan_fn(**{k: v.double() for k, v in args.items()}, backend="triton")
    monkeypatch.setattr(ss, "_triton_scan", lambda: None)
    with pytest.raises(RuntimeError, match="triton does not import"):
        selective_scan_fn(**args, backend="triton")
    with pytest.raises(ValueError, match="'cuda', 'triton', 'torch'"):
        selective_scan_fn(**args, backend="pallas")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(8, 384, 257, 16, 1), (8, 384, 50, 16, 1), (8, 768, 257, 16, 1)],
                         ids=["mv_hybrid-256px", "mv_hybrid-112px", "vim-256px"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_triton_kernel_matches_torch_path(shape, dtype):
    errs = errors(inputs(*shape, dtype=dtype, device="cuda"), backend="triton", reference="torch")
    assert errs.pop("dtypes_kept")
    print(f"\ntriton-vs-torch {shape} {dtype}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: outputs rounded to bf16; atomics reorder the sums
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, bad


def test_auto_prefers_the_traceable_kernel_under_compile(monkeypatch):
    monkeypatch.delenv(ss.BACKEND_ENV, raising=False)
    monkeypatch.setattr(ss, "mamba_ssm_available", lambda: True)
    monkeypatch.setattr(ss, "triton_scan_available", lambda: True)
    assert ss._resolve_backend(None, "cuda", torch.bfloat16, True) == "cuda"  # eager: mamba-ssm's kernel
    assert ss._resolve_backend(None, "cuda", torch.bfloat16, True, length=264) == "cuda"  # 256 px, padded
    # short sequences (112-px crops, padded to 56): ours is the faster kernel there
    assert ss._resolve_backend(None, "cuda", torch.bfloat16, True, length=56) == "triton"
    assert ss._resolve_backend("cuda", "cuda", torch.bfloat16, True, length=56) == "cuda"  # forced stays
    assert ss._resolve_backend(None, "cuda", torch.bfloat16, True, compiling=True) == "triton"
    assert ss._resolve_backend("cuda", "cuda", torch.bfloat16, True, compiling=True) == "cuda"  # forced stays
    # a trace with dynamic shapes cannot form the kernels' launch: auto falls back, a forced triton says why
    assert ss._resolve_backend(None, "cuda", torch.bfloat16, True, compiling=True, symbolic=True) == "cuda"
    with pytest.raises(Exception, match="static shapes"):
        ss._resolve_backend("triton", "cuda", torch.bfloat16, True, compiling=True, symbolic=True)
    # constant B/C: our kernel does not take them, so compile falls back to mamba-ssm's
    assert ss._resolve_backend(None, "cuda", torch.bfloat16, False, compiling=True) == "cuda"
    # meta tensors (the trainer's FLOP count) never reach a kernel
    assert ss._resolve_backend("triton", "meta", torch.bfloat16, True) == "torch"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_inductor_launches_the_kernels_itself():
    """Under torch.compile the scan is a triton_op: inductor's code launches both kernels directly (no Python
    operator call per use) and gives the eager results."""
    from torch._inductor.utils import run_and_get_code

    args = inputs(2, 64, 72, 16, 1, dtype=torch.bfloat16, device="cuda")

    def loss(**kw):
        out, last = selective_scan_fn(**kw, delta_softplus=True, return_last_state=True, backend="triton")
        return out.float().square().sum() + last.sum()

    def grads(fn):
        return torch.autograd.grad(fn(**args), list(args.values()))

    compiled = torch.compile(loss, fullgraph=True)
    got, codes = run_and_get_code(grads, compiled)
    want = grads(loss)
    code = "\n".join(codes)
    assert "_scan_fwd_kernel" in code and "_scan_bwd_kernel" in code
    assert "mambavision.selective_scan_triton" not in code
    for g, w in zip(got, want):
        assert torch.allclose(g.float(), w.float(), rtol=2e-2, atol=1e-3 * w.float().abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(2, 64, 72, 16, 0), (4, 384, 264, 16, 0)], ids=["small", "mv_hybrid-256px"])
def test_compiled_scan_as_the_mixer_calls_it(shape):
    """The mixer's call under torch.compile: no z, the last state unused (so autograd hands the backward a zero
    gradient for it), B and C as (b, n, l). compile=blocks once failed here with an illegal memory access."""
    args = inputs(*shape, dtype=torch.bfloat16, device="cuda")
    args.pop("z")

    def loss(**kw):
        return selective_scan_fn(**kw, delta_softplus=True, backend="triton").float().square().sum()

    def grads(fn):
        out = torch.autograd.grad(fn(**args), list(args.values()))
        torch.cuda.synchronize()
        return out

    got, want = grads(torch.compile(loss, fullgraph=True, dynamic=False)), grads(loss)
    errs = {name: ((g.float() - w.float()).abs().max() / w.float().abs().max()).item()
            for name, g, w in zip(args, got, want)}
    bad = {k: f"{v:.1e}" for k, v in errs.items() if not v <= 2e-2}
    assert not bad, bad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_blocks_train_step_matches_eager(monkeypatch):
    """A small mv_hybrid, each block compiled as the trainer does: forward_features + backward with the Triton scan
    gives the eager step's gradients. In fp32, where the two differ only in the order of fused arithmetic (under
    bf16 autocast inductor's fusions skip the eager path's roundings: gradients of block 0's EinFFT differed by up
    to 10% of their largest entry, with the PyTorch scan as with ours, H200), so a wrongly wired gradient shows."""
    import mambavision

    monkeypatch.setenv(ss.BACKEND_ENV, "triton")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # full fp32 in both
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    eager = mambavision.create_model("mv_hybrid", embed_dim=128, depth=2, num_heads=2).cuda()
    compiled = mambavision.create_model("mv_hybrid", embed_dim=128, depth=2, num_heads=2).cuda()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    x = torch.randn(2, 3, 256, 256, device="cuda")
    for model in (eager, compiled):
        out = model.forward_features(x)
        (out["x_norm_clstoken"].square().mean() + out["x_norm_patchtokens"].square().mean()).backward()
        torch.cuda.synchronize()
    errs = {name: ((p.grad.float() - q.grad.float()).abs().max() / (p.grad.float().abs().max() + 1e-12)).item()
            for (name, p), q in zip(eager.named_parameters(), compiled.parameters()) if p.grad is not None}
    bad = {k: f"{v:.1e}" for k, v in errs.items() if not v <= 1e-3}
    assert not bad, bad
