"""EinFFT's two implementations compute one function: the DFT-as-matmul fast path (default) and
the release's torch.fft formulation (``impl="fft"``)."""
import pytest
import torch

from mambavision.layers import EinFFT


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _pair(C, nb, dtype, scale=0.1, seed=0):
    torch.manual_seed(seed)
    m = EinFFT(C, num_blocks=nb).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, scale)  # large enough that relu / softshrink are active on both sides
    return m


def _run(m, impl, x):
    m.impl = impl
    y = m(x)
    proj = torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)
    grads = torch.autograd.grad((y * proj).sum(), [x, *m.parameters()])
    return y, grads


# MV_Hybrid's token counts (257 at 256 px, 50 at 112 px), even and odd, and other block counts.
@pytest.mark.parametrize("L,C,nb", [(257, 64, 4), (50, 64, 4), (16, 32, 2), (9, 48, 3), (1, 32, 4)])
def test_dft_matches_fft_in_float64_forward_and_backward(L, C, nb):
    m = _pair(C, nb, torch.float64)
    x = torch.randn(3, L, C, dtype=torch.float64, requires_grad=True)
    y0, g0 = _run(m, "fft", x)
    y1, g1 = _run(m, "dft", x)
    assert _rel(y1, y0) < 1e-12
    for a, b in zip(g1, g0):
        assert _rel(a, b) < 1e-12


def test_dft_matches_fft_in_float32_to_1e5():
    m = _pair(384, 4, torch.float32, scale=0.02)  # the init scale, the full width, 257 tokens
    x = torch.randn(2, 257, 384, requires_grad=True)
    y0, g0 = _run(m, "fft", x)
    y1, g1 = _run(m, "dft", x)
    assert _rel(y1, y0) < 1e-5
    assert max(_rel(a, b) for a, b in zip(g1, g0)) < 1e-5


def test_dft_runs_in_bf16_under_autocast_close_to_fp32():
    m = _pair(64, 4, torch.float32)
    x = torch.randn(2, 50, 64)
    m.impl = "fft"
    ref = m(x)
    m.impl = "dft"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16  # no fp32 round trip: the products run in the autocast dtype
    assert _rel(y.float(), ref) < 2e-2


def test_output_layout_and_state_dict_are_impl_independent():
    m = _pair(32, 4, torch.float32)
    keys = set(m.state_dict())
    assert keys == {"complex_weight_1", "complex_weight_2", "complex_bias_1", "complex_bias_2"}
    y = m(torch.randn(2, 5, 32))
    assert y.shape == (2, 5, 32) and set(m.state_dict()) == keys  # cached DFT matrices are not buffers


def test_unknown_impl_is_named():
    m = EinFFT(32, 4, impl="fast")
    with pytest.raises(ValueError, match="impl must be one of"):
        m(torch.randn(1, 4, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-only: the fast path against cuFFT on the GPU")
def test_cuda_dft_matches_cufft_fp32_and_bf16():
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 bound is for true fp32 products
    try:
        m = _pair(384, 4, torch.float32, scale=0.02).cuda()
        for L in (257, 50):
            x = torch.randn(64, L, 384, device="cuda", requires_grad=True)
            y0, g0 = _run(m, "fft", x)
            y1, g1 = _run(m, "dft", x)
            err = max(_rel(a, b) for a, b in zip((y1, *g1), (y0, *g0)))
            print(f"EinFFT cuda fp32 L={L}: max rel err (out, grads) {err:.2e}")
            assert err < 1e-5
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yb, gb = _run(m, "dft", x)
            errs = [_rel(a.float(), b) for a, b in zip((yb, *gb), (y0, *g0))]
            print(f"EinFFT cuda bf16 autocast L={L}: rel err vs fp32: out {errs[0]:.1e}, grads "
                  + ", ".join(f"{e:.1e}" for e in errs[1:]))
            # Gradients carry the relu / softshrink masks: rounding flips the ones near a kink, and a few
            # per mille flipped give a few per cent in the gradient's norm (unbiased noise, as in any relu net).
            assert errs[0] < 3e-2 and max(errs[1:]) < 0.15
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def test_cached_dft_matrices_survive_inference_mode_then_training():
    from mambavision.layers import einfft

    einfft._DFT_CACHE.clear()
    m = _pair(32, 4, torch.float32)
    with torch.inference_mode():  # e.g. feature extraction in a notebook first: builds the cache
        m(torch.randn(2, 7, 32))
    x = torch.randn(2, 7, 32, requires_grad=True)
    m(x).sum().backward()  # would raise "Inference tensors cannot be saved for backward"
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("L", [257, 50])
def test_every_matrix_product_has_aligned_sizes(L):
    """Regression (H200 profile, 7232740): at 257 and 50 tokens the token products contracted over an odd
    length, and cuBLAS ran them on ``cutlass_75 ... align1`` kernels (6.3 of 67.6 ms of an mv_hybrid step).
    Every product of the fast path, forward and backward, now has sizes that are multiples of 8."""
    from torch.utils._python_dispatch import TorchDispatchMode

    mm_ops = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
    sizes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in mm_ops:
                a, b = args[-2], args[-1]
                sizes.append((*a.shape[-2:], b.shape[-1]))
            return func(*args, **(kwargs or {}))

    m = _pair(64, 4, torch.float32)
    x = torch.randn(3, L, 64, requires_grad=True)
    with Record():
        y = m(x)
        y.square().sum().backward()
    token_products = [s for s in sizes if 64 not in s[1:]]
    assert token_products, sizes  # the (rows, rows) @ (rows, B*C) products were seen, forward and backward
    assert all(d % 8 == 0 for s in sizes for d in s), sorted(set(sizes))
    assert y.shape == (3, L, 64)


def test_padding_rows_are_not_counted_as_model_flops():
    """The trainer counts FLOPs on the meta device; the alignment padding is not a model FLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    m = EinFFT(64, 4)
    counts = {}
    for device in ("cpu", "meta"):
        mm = m.to(device)
        with FlopCounterMode(display=False) as fc:
            mm(torch.randn(2, 50, 64, device=device))
        counts[device] = fc.get_total_flops()
    C, L, B = 64, 50, 2
    model_flops = B * (8 * 2 * L * L * C + 8 * 2 * L * C * C)  # 8 token and 8 channel products
    assert counts["meta"] == model_flops
    assert counts["cpu"] > model_flops  # 56 rows on a real device


def test_fast_path_op_count_stays_low():
    """Regression (H200, caa3372): an eager mv_hybrid step ran 64 ms of kernels in 115 ms, bound by launching
    ops, and EinFFT was 243 of a Mamba block's 382 aten ops (forward + backward). Real and imaginary parts
    now share each product, and the bias and relu after the token DFT run out of place (no CopySlices in the
    backward): 121 ops, at most 125."""
    from torch.utils._python_dispatch import TorchDispatchMode

    m = _pair(64, 4, torch.float32)
    x = torch.randn(2, 17, 64, requires_grad=True)
    m(x)  # builds the cached constants
    n = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            n[0] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        m(x).sum().backward()
    assert n[0] <= 125, n[0]


def test_compiled_fast_path_compiles_once_per_length():
    """Regression: under torch.compile the module-level cache of DFT matrices made dynamo guard on the dict's
    contents, so every newly cached length recompiled the block once more. With two crop sizes, two block
    types and the teacher's no-grad pass, compile_blocks ran out of its recompile budget and fell back to eager."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from mambavision.layers import einfft

    einfft._DFT_CACHE.clear()
    torch._dynamo.reset()
    counters.clear()
    m = _pair(32, 4, torch.float32)
    compiled = torch.compile(m, backend="eager", fullgraph=True, dynamic=False)
    for L in (17, 17, 5, 5, 17):
        x = torch.randn(2, L, 32)
        torch.testing.assert_close(compiled(x), m(x))
    assert counters["stats"]["unique_graphs"] == 2  # one graph per length
    torch._dynamo.reset()


def test_dft_constants_are_built_on_the_target_device():
    """Regression (H200, 5cfd683): under compile the DFT matrices are rebuilt at every call, and they were made
    on the host and then copied: 144 pageable host-to-device copies per DINOv2 step, each a stream sync that left
    the GPU idle (up to 24 ms a gap). Every op that builds them must run on the target device."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mambavision.layers import einfft

    devices = set()

    class Devices(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    devices.add(t.device.type)
            return out

    with Devices():
        built = einfft._build_dft_constants(257, 264, 4, 96, torch.device("meta"), torch.bfloat16, torch.float32)
    assert devices == {"meta"}
    assert [tuple(t.shape) for t in built] == [(528, 528), (528, 528), (2, 384, 384), (2, 2, 4, 4), (4, 4)]


def test_backward_copies_only_the_input_gradient():
    """The bias add and relu after the token DFT ran in place on a view, so autograd rebuilt the base in the
    backward (CopySlices): a zero-filled buffer, a clone and copies of activation size per layer and call, and 13
    more ops. Out of place they cost none. What is left is one copy: the input gradient back to token-major
    layout, the mirror of the forward's transpose."""
    from torch.utils._python_dispatch import TorchDispatchMode

    m = _pair(64, 4, torch.float32)
    x = torch.randn(2, 17, 64, requires_grad=True)
    y = m(x)
    big = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in ("clone", "copy_", "new_zeros", "zeros_like") and out.numel() >= x.numel():
                big.append(name)
            return out

    with Copies():
        y.square().sum().backward()
    assert big == ["copy_"], big
