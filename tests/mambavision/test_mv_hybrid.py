"""MV_Hybrid facts from the release (specs/mv_hybrid_and_training.md)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mambavision
from mambavision.layers import EinFFT
from mambavision.layers import attention_start
from mambavision.models.mv_hybrid import MambaVisionMixer


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def full():
    return mambavision.create_model("mv_hybrid")


def test_full_size_parameter_count(full):
    assert n_params(full) == 30_963_072
    assert n_params(full.patch_embed) == 295_296
    mamba_block, attn_block = full.blocks[0], full.blocks[23]
    assert n_params(mamba_block) == 781_056
    assert n_params(mamba_block.mixer) == 630_528
    assert n_params(mamba_block.channel_mixer) == 148_992
    assert n_params(attn_block) == 1_774_464
    assert full.cls_token.numel() + full.mask_token.numel() == 768
    assert n_params(full.norm) == 768
    # 295,296 + 12 * 781,056 + 12 * 1,774,464 + 768 + 768
    assert 295_296 + 12 * 781_056 + 12 * 1_774_464 + 768 + 768 == 30_963_072


def test_released_state_dict_keys(full):
    expected = {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "mask_token", "norm.weight", "norm.bias"}
    for i in range(24):
        p = f"blocks.blocks.{i}."
        expected |= {p + s for s in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")}
        if i < 12:
            expected |= {p + "mixer." + s for s in (
                "in_proj.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "out_proj.weight",
                "A_log", "D", "conv1d_x.weight", "conv1d_z.weight")}
            expected |= {p + "channel_mixer." + s for s in (
                "complex_weight_1", "complex_weight_2", "complex_bias_1", "complex_bias_2")}
        else:
            expected |= {p + "mixer." + s for s in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias")}
            expected |= {p + "channel_mixer." + s for s in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}
    assert set(full.state_dict()) == expected
    mixer = full.blocks[0].mixer
    assert tuple(mixer.x_proj.weight.shape) == (56, 384) and tuple(mixer.dt_proj.weight.shape) == (384, 24)
    assert tuple(mixer.conv1d_x.weight.shape) == (384, 1, 4) and mixer.conv1d_x.bias is None
    assert tuple(full.blocks[0].channel_mixer.complex_weight_1.shape) == (2, 4, 96, 96)


def test_initialisation(full):
    mixer = full.blocks[0].mixer
    # global trunc_normal(0.02) init overwrites Mamba's dt init, biases are zero
    assert mixer.dt_proj.weight.std().item() == pytest.approx(0.02, rel=0.15)
    assert torch.count_nonzero(mixer.dt_proj.bias) == 0
    torch.testing.assert_close(mixer.A_log[5], torch.log(torch.arange(1, 17, dtype=torch.float32)))
    assert torch.equal(mixer.D, torch.ones(384))
    assert torch.count_nonzero(full.mask_token) == 0
    assert 0.015 < full.cls_token.std().item() < 0.025
    assert full.blocks[0].channel_mixer.complex_weight_1.std().item() == pytest.approx(0.02, rel=0.05)


def test_attention_half_split():
    assert attention_start(24) == 12 and attention_start(4) == 2
    assert attention_start(5) == 3 and attention_start(3) == 2
    m = mambavision.create_model("mv_hybrid", img_size=32, patch_size=8, embed_dim=32, depth=5, num_heads=2)
    kinds = [type(b.mixer).__name__ for b in m.blocks]
    assert kinds == ["MambaVisionMixer"] * 3 + ["Attention"] * 2


@pytest.mark.parametrize("img,n,cls_index", [(256, 256, 128), (112, 49, 24)])
def test_cls_token_sits_in_the_middle(img, n, cls_index):
    m = mambavision.create_model("mv_hybrid", img_size=img, embed_dim=32, depth=2, num_heads=2)
    with torch.no_grad():
        tokens, idx = m.prepare_tokens_with_masks(torch.randn(1, 3, img, img))
    assert idx == cls_index and tokens.shape[1] == n + 1
    torch.testing.assert_close(tokens[0, idx], m.cls_token[0, 0])
    patches = m.patch_embed(torch.zeros(1, 3, img, img))
    assert patches.shape[1] == n


def _scan_naive(u, delta, A, B, C, D):
    b, d, l = u.shape
    h = torch.zeros(b, d, A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(l):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1) + D * u[:, :, t])
    return torch.stack(ys, -1)


@pytest.mark.filterwarnings("ignore:Using padding=.same.")
def test_mixer_applies_dt_bias_twice_and_non_causal_convs():
    torch.manual_seed(0)
    mixer = MambaVisionMixer(d_model=16, d_state=4).double()
    with torch.no_grad():
        mixer.dt_proj.bias.uniform_(-1.0, 1.0)
    h = torch.randn(2, 9, 16, dtype=torch.float64)
    out = mixer(h)
    # Independent recomputation from the spec.
    xz = mixer.in_proj(h).transpose(1, 2)
    x, z = xz.chunk(2, dim=1)
    conv = lambda v, c: F.silu(F.conv1d(v, c.weight, None, padding="same", groups=v.shape[1]))
    x, z = conv(x, mixer.conv1d_x), conv(z, mixer.conv1d_z)
    dbl = F.linear(x.transpose(1, 2), mixer.x_proj.weight)  # x_proj is nn.Linear's weight, applied channel-first
    dt, B, C = torch.split(dbl, [mixer.dt_rank, 4, 4], -1)
    W, b = mixer.dt_proj.weight, mixer.dt_proj.bias
    delta = F.softplus(dt @ W.T + 2 * b).transpose(1, 2)  # softplus(W dt + 2b)
    y = _scan_naive(x, delta, -torch.exp(mixer.A_log), B.transpose(1, 2), C.transpose(1, 2), mixer.D)
    expected = mixer.out_proj(torch.cat([y, z], 1).transpose(1, 2))
    torch.testing.assert_close(out, expected)


def _einfft_numpy(x, w1, b1, w2, b2, nb, lam=0.01):
    B, L, Cdim = x.shape
    X = np.fft.fft2(x.reshape(B, L, nb, Cdim // nb), axes=(1, 2), norm="ortho")
    W1, W2 = w1[0] + 1j * w1[1], w2[0] + 1j * w2[1]
    h = np.einsum("...bd,bdk->...bk", X, W1) + (b1[0] + 1j * b1[1])
    h = np.maximum(h.real, 0) + 1j * np.maximum(h.imag, 0)
    h = np.einsum("...bd,bdk->...bk", h, W2) + (b2[0] + 1j * b2[1])
    shrink = lambda v: np.sign(v) * np.maximum(np.abs(v) - lam, 0)
    h = shrink(h.real) + 1j * shrink(h.imag)
    return np.fft.ifft2(h, axes=(1, 2), norm="ortho").real.reshape(B, L, Cdim)


def test_einfft_matches_independent_numpy_and_runs_fp32_under_autocast():
    torch.manual_seed(0)
    m = EinFFT(32, num_blocks=4, scale=0.5)
    x = torch.randn(2, 50, 32)
    p = {k: v.detach().numpy().astype(np.float64) for k, v in m.named_parameters()}
    ref = _einfft_numpy(x.numpy().astype(np.float64), p["complex_weight_1"], p["complex_bias_1"],
                        p["complex_weight_2"], p["complex_bias_2"], 4)
    np.testing.assert_allclose(m(x).detach().numpy(), ref, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x.bfloat16())
    assert y.dtype == torch.bfloat16
    np.testing.assert_allclose(y.float().detach().numpy(), ref, rtol=1e-2, atol=0.05)


def test_training_forward_returns_the_dict_not_only_cls():
    # The release returned only the CLS token in training mode; the contract needs the dict.
    m = mambavision.create_model("mv_hybrid", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2).train()
    out = m(torch.randn(2, 3, 32, 32), is_training=True)
    assert isinstance(out, dict) and out["x_norm_patchtokens"].shape == (2, 16, 32)
    assert m.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    assert math.isclose(m.num_features, 64)


def test_mixer_moves_no_activation_through_a_strided_copy(monkeypatch):
    """Regression (H200 profile, 7232740): in eager, the mixer's (b, l, d) <-> (b, d, l) rearranges were
    strided copies and elementwise kernels on transposed views, forward and backward (the slow
    ``elementwise_kernel`` and ``direct_copy`` rows of the profile). The mixer now stays channel-first:
    no op that writes an activation-sized tensor reads a transposed one (innermost stride not 1: uncoalesced
    on a GPU), except the batched products, which take transposed operands as they are."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import mambavision.models.mv_hybrid as mvh

    # A stand-in scan made of contiguous ops, so the count sees only the mixer's own layout work.
    monkeypatch.setattr(mvh, "selective_scan_fn", lambda u, delta, *a, **k: u * torch.sigmoid(delta))
    b, L, d = 2, 50, 128  # dt_rank 8 and 8 states, so the weights themselves are aligned, as at full size
    products = {torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default, torch.ops.aten.mm.default}
    strided, leading = [], []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in products:  # a matrix operand's leading dimension: its stride that is not 1
                leading.extend(max(a.stride()[-2:]) for a in args[-2:])
            elif func._schema.name not in ("aten::t", "aten::transpose", "aten::expand"):
                for a in args:
                    if isinstance(a, torch.Tensor) and a.numel() >= b * L * d and a.dim() > 1 and a.stride(-1) > 1:
                        strided.append((str(func), tuple(a.shape)))
            return func(*args, **(kwargs or {}))

    mixer = MambaVisionMixer(d_model=d, d_state=8)
    h = torch.randn(b, L, d, requires_grad=True)
    with Record():
        mixer(h).square().sum().backward()
    views = ("aten.view", "aten.slice", "aten.split", "aten.chunk", "aten.alias", "aten.detach", "aten.as_strided")
    left = [s for s in strided if not s[0].startswith(views)]
    assert left == [], left
    # The sequence (50 tokens) is padded to 56, so channel-first operands have aligned rows (cuBLAS align8).
    assert leading and all(ld % 8 == 0 for ld in leading), sorted(set(leading))
    assert h.grad is not None and mixer.in_proj.weight.grad is not None


def test_compiled_blocks_stay_compiled_through_a_dino_step_pattern(caplog):
    """compile_blocks: student crops of two sizes with gradients and the teacher's no-grad pass, as in a DINOv2
    step, all compile (no block falls back to eager at dynamo's recompile limit) and match eager."""
    import logging

    import torch._dynamo

    torch._dynamo.reset()
    kw = dict(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2)
    ref = mambavision.create_model("mv_hybrid", **kw)
    model = mambavision.create_model("mv_hybrid", **kw)
    model.load_state_dict(ref.state_dict())
    model.compile_blocks(backend="eager")
    assert torch._dynamo.config.recompile_limit >= 6
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        for _ in range(2):
            for size, b in ((64, 2), (32, 4)):
                x = torch.randn(b, 3, size, size)
                out, expected = model.forward_features(x), ref.forward_features(x)
                torch.testing.assert_close(out["x_norm_clstoken"], expected["x_norm_clstoken"])
                out["x_norm_clstoken"].sum().backward()
            with torch.no_grad():
                model.forward_features(torch.randn(2, 3, 64, 64))
    limit_hits = [r for r in caplog.records if "recompile_limit" in r.getMessage() or "cache_size_limit" in r.getMessage()]
    assert not limit_hits
    torch._dynamo.reset()


@pytest.mark.parametrize("k, bias", [(4, False), (3, True)])
def test_depthwise_conv_as_shifted_products_is_the_convolution(k, bias):
    """layers/depthwise_conv: the form torch.compile fuses equals F.conv1d, forward and every gradient (float64),
    and runs in autocast's dtype as the convolution does."""
    from mambavision.layers.depthwise_conv import shifted_products

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, kernel_size=k, groups=6, bias=bias).double()
    x = torch.randn(2, 6, 11 + k - 1, dtype=torch.float64, requires_grad=True)
    ref = F.conv1d(x, conv.weight, conv.bias, groups=6)
    out = shifted_products(x, conv.weight, conv.bias)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((out * w).sum(), [x, *conv.parameters()]),
                    torch.autograd.grad((ref * w).sum(), [x, *conv.parameters()])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xf, cf = x.detach().float(), conv.float()
        assert shifted_products(xf, cf.weight, cf.bias).dtype == F.conv1d(xf, cf.weight, cf.bias, groups=6).dtype


def test_compiled_mixer_has_no_convolution_and_matches_eager(monkeypatch):
    """Regression (H200 trace, 5cfd683): in a compiled DINOv2 step the mixer's depthwise convolutions ran on ATen's
    generic depthwise kernels, 21.6 of 228 ms of kernels (134 us a forward call where the bytes take 6 us), which
    inductor cannot fuse. Under compile they are shifted products: no convolution is left in the traced graph."""
    import torch._dynamo

    import mambavision.models.mv_hybrid as mvh

    monkeypatch.setattr(mvh, "selective_scan_fn", lambda u, delta, *a, **k: u * torch.sigmoid(delta))
    targets = []

    def record(gm, inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch.manual_seed(0)
    mixer = MambaVisionMixer(d_model=32, d_state=8)
    h = torch.randn(2, 17, 32)
    torch._dynamo.reset()
    try:
        out = torch.compile(mixer, backend=record, fullgraph=True)(h)
    finally:
        torch._dynamo.reset()
    assert targets and not any("conv" in t for t in targets), [t for t in targets if "conv" in t]
    torch.testing.assert_close(out, mixer(h), rtol=1e-5, atol=1e-6)
