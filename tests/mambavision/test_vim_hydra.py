"""ViM_EinFFT, Hydra_EinFFT and Hydra_Hybrid (specs/vim_hydra.md). The backbone contract itself is
covered for every registered model by test_contract.py; this file checks the architecture facts."""
import math

import pytest
import torch
import torch.nn.functional as F

import mambavision
from mambavision.layers import EinFFT
from mambavision.models.hydra import HydraMixer
from mambavision.models.vim import VimMixer, middle_cls_pos_embed

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
TINY_VIM = {k: v for k, v in TINY.items() if k != "num_heads"}  # no attention: vim_einfft refuses num_heads


def tiny_kw(name):
    return TINY_VIM if name == "vim_einfft" else TINY


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def vim_full():
    torch.manual_seed(0)
    return mambavision.create_model("vim_einfft")


@pytest.fixture(scope="module")
def hydra_full():
    torch.manual_seed(0)
    return mambavision.create_model("hydra_einfft")


# -- full-size parameter counts (constructed only, never run) -------------------------------------
def test_vim_einfft_parameter_count(vim_full):
    mixer = vim_full.layers[0].mixer
    # in_proj 1536*384 = 589,824; out_proj 384*768 = 294,912; per direction: conv1d 768*4 + 768 = 3,840,
    # x_proj 56*768 = 43,008, dt_proj 768*24 + 768 = 19,200, A_log 768*16 = 12,288, D 768 (= 79,104).
    assert n_params(mixer) == 589_824 + 294_912 + 2 * 79_104 == 1_042_944
    assert n_params(vim_full.layers[0].channel_mixer) == 148_992  # 2 * (2*4*96*96) + 2 * (2*4*96)
    # block = RMSNorm 384 + mixer + RMSNorm 384 + EinFFT
    assert n_params(vim_full.layers[0]) == 384 + 1_042_944 + 384 + 148_992 == 1_192_704
    # patch_embed 3*16*16*384 + 384 = 295,296; pos_embed 257*384 = 98,688; cls + mask 768; norm_f 384.
    assert n_params(vim_full) == 295_296 + 98_688 + 768 + 24 * 1_192_704 + 384 == 29_020_032


def test_hydra_parameter_counts(hydra_full):
    mixer = hydra_full.blocks[0].mixer
    # in_proj 1816*384 = 697,344 (z 768 | xBC 1024 | dt 24); conv1d 1024*7 + 1024 = 8,192;
    # dt_bias, A_log, D 3*12; fc_D 12*768 = 9,216; gated-norm weight 768; out_proj 384*768 = 294,912.
    assert n_params(mixer) == 697_344 + 8_192 + 36 + 9_216 + 768 + 294_912 == 1_010_468
    assert (mixer.nheads, mixer.headdim, mixer.d_state) == (12, 64, 64)
    block = 2 * 768 + 1_010_468 + 148_992  # two LayerNorms, Hydra, EinFFT = 1,160,996
    assert n_params(hydra_full.blocks[0]) == block
    # patch_embed 295,296; pos_embed 98,688; cls + mask 768; final LayerNorm 768.
    stem = 295_296 + 98_688 + 768 + 768
    assert n_params(hydra_full) == stem + 24 * block == 28_259_424
    hybrid = mambavision.create_model("hydra_hybrid")
    # 12 Hydra blocks + 12 attention+MLP blocks of 1,774,464 (as MV_Hybrid's second half).
    assert n_params(hybrid.blocks[12]) == 1_774_464
    assert n_params(hybrid) == stem + 12 * block + 12 * 1_774_464 == 35_621_040


def test_vim_state_dict_keys_follow_upstream(vim_full):
    sd = vim_full.state_dict()
    shapes = {
        "patch_embed.proj.weight": (384, 3, 16, 16), "cls_token": (1, 1, 384), "pos_embed": (1, 257, 384),
        "mask_token": (1, 384), "norm_f.weight": (384,),
        "layers.23.norm.weight": (384,), "layers.0.mixer.in_proj.weight": (1536, 384),
        "layers.0.mixer.out_proj.weight": (384, 768), "layers.0.norm2.weight": (384,),
        "layers.0.channel_mixer.complex_weight_1": (2, 4, 96, 96),
    }
    for sfx in ("", "_b"):
        shapes.update({
            f"layers.0.mixer.conv1d{sfx}.weight": (768, 1, 4), f"layers.0.mixer.conv1d{sfx}.bias": (768,),
            f"layers.0.mixer.x_proj{sfx}.weight": (56, 768), f"layers.0.mixer.dt_proj{sfx}.weight": (768, 24),
            f"layers.0.mixer.dt_proj{sfx}.bias": (768,), f"layers.0.mixer.A{sfx}_log": (768, 16),
            f"layers.0.mixer.D{sfx}": (768,),
        })
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k
    # the contract's `norm` / `blocks` are aliases: no duplicated parameters
    assert not any(k.startswith(("norm.", "blocks.")) for k in sd)
    assert vim_full.norm is vim_full.norm_f and vim_full.n_blocks == 24
    assert {"layers.0.mixer.A_b_log", "layers.0.mixer.D_b", "pos_embed"} <= vim_full.no_weight_decay()


def test_vim_initialisation(vim_full):
    mixer = vim_full.layers[3].mixer
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6 and dt.std() > 0
    assert torch.count_nonzero(mixer.dt_proj_b.bias) == 0  # Vim quirk: backward dt bias zeroed
    assert mixer.dt_proj.weight.abs().max() <= 24 ** -0.5
    torch.testing.assert_close(mixer.A_b_log[7], torch.log(torch.arange(1.0, 17.0)))
    assert torch.equal(mixer.D_b, torch.ones(768))
    # out_proj: kaiming_uniform(a=sqrt 5) = U(+-1/sqrt(768)), divided by sqrt(depth=24)
    expected_std = 768 ** -0.5 / math.sqrt(3) / math.sqrt(24)
    assert mixer.out_proj.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    # patch_embed: lecun normal, std sqrt(1/fan_in) with fan_in = 3*16*16
    assert vim_full.patch_embed.proj.weight.std().item() == pytest.approx(768 ** -0.5, rel=0.05)
    assert torch.count_nonzero(vim_full.patch_embed.proj.bias) == 0
    assert vim_full.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)


def test_hydra_initialisation(hydra_full):
    mixer = hydra_full.blocks[5].mixer
    assert torch.equal(mixer.A_log, torch.zeros(12))  # A = -1 on every head
    assert torch.equal(mixer.D, torch.ones(12))
    dt = F.softplus(mixer.dt_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    for lin in (mixer.in_proj, mixer.fc_D, mixer.out_proj):  # template's trunc_normal(0.02)
        assert lin.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert {"blocks.blocks.5.mixer.dt_bias", "blocks.blocks.5.mixer.A_log", "pos_embed"} <= hydra_full.no_weight_decay()


# -- mixers against independent slow computations (tiny) ------------------------------------------
def _mamba1_scan(u, delta, A, B, C, D, z):
    """Sequential selective scan, (b, d, l) inputs, B/C (b, n, l): h_t = exp(delta A) h + delta B u."""
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(delta[..., t, None] * A) * h + delta[..., t, None] * B[:, None, :, t] * u[..., t, None]
        ys.append((h * C[:, None, :, t]).sum(-1) + D * u[..., t])
    return torch.stack(ys, -1) * F.silu(z)


def test_vim_mixer_matches_two_hand_scans():
    torch.manual_seed(0)
    mixer = VimMixer(d_model=8, d_state=4, d_conv=4)
    with torch.no_grad():
        for p in (mixer.A_log, mixer.A_b_log, mixer.D, mixer.D_b, mixer.dt_proj_b.bias):
            p.add_(0.3 * torch.randn_like(p))  # break the symmetric init so the directions differ
    x_in = torch.randn(2, 7, 8)
    L = 7

    def branch(x, z, conv, x_proj, dt_proj, A_log, D):
        # causal depthwise conv: left-pad k-1, i.e. F.conv1d(padding=k-1) cut to the first L outputs
        x = F.silu(F.conv1d(x, conv.weight, conv.bias, padding=3, groups=x.shape[1])[..., :L])
        dbl = torch.einsum("bdl,ed->bel", x, x_proj.weight)
        dt, B, C = dbl[:, :1], dbl[:, 1:5], dbl[:, 5:9]  # dt_rank = ceil(8/16) = 1, d_state 4
        delta = F.softplus(torch.einsum("brl,dr->bdl", dt, dt_proj.weight) + dt_proj.bias[:, None])  # bias once
        return _mamba1_scan(x, delta, -torch.exp(A_log), B, C, D, z)

    with torch.no_grad():
        xz = torch.einsum("bld,ed->bel", x_in, mixer.in_proj.weight)
        x, z = xz[:, :16], xz[:, 16:]
        y_f = branch(x, z, mixer.conv1d, mixer.x_proj, mixer.dt_proj, mixer.A_log, mixer.D)
        y_b = branch(x.flip(-1), z.flip(-1), mixer.conv1d_b, mixer.x_proj_b, mixer.dt_proj_b, mixer.A_b_log, mixer.D_b)
        expect = ((y_f + y_b.flip(-1)) / 2).transpose(1, 2) @ mixer.out_proj.weight.t()
        out = mixer(x_in)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-4)


def test_vim_mixer_is_bidirectional():
    torch.manual_seed(0)
    mixer = VimMixer(d_model=8, d_state=4)
    x = torch.randn(1, 9, 8)
    x2 = x.clone()
    x2[:, -1] += 1.0
    with torch.no_grad():
        d = (mixer(x) - mixer(x2)).abs().sum(-1)[0]
    assert d[0] > 0  # the last token reaches the first one (backward branch)


def _hydra_closed_form(mixer: HydraMixer, u: torch.Tensor) -> torch.Tensor:
    """Hydra as an explicit quasiseparable matrix per head (spec section 3), then gated norm + out_proj."""
    Bsz, L, _ = u.shape
    E, H, P, N = mixer.d_inner, mixer.nheads, mixer.headdim, mixer.d_state
    zxbcdt = u @ mixer.in_proj.weight.t()
    z, xBC, dt = zxbcdt[..., :E], zxbcdt[..., E : 2 * E + 4 * N], zxbcdt[..., 2 * E + 4 * N :]
    k = mixer.conv1d.kernel_size[0]
    xBC = F.silu(F.conv1d(xBC.transpose(1, 2), mixer.conv1d.weight, mixer.conv1d.bias, padding=k // 2, groups=xBC.shape[-1]).transpose(1, 2))
    x, Bf, Cf, Bb, Cb = torch.split(xBC, [E, N, N, N, N], dim=-1)
    dt_f = F.softplus(dt[..., :H] + mixer.dt_bias)
    dt_b = F.softplus(dt[..., H:] + mixer.dt_bias)
    A = -torch.exp(mixer.A_log)
    diag = mixer.D + x @ mixer.fc_D.weight.t()  # (B, L, H)
    M = torch.zeros(Bsz, H, L, L)
    for t in range(L):
        for s in range(L):
            if s < t:
                M[:, :, t, s] = (Cf[:, t - 1] * Bf[:, s]).sum(-1)[:, None] * torch.exp(A * dt_f[:, s + 1 : t].sum(1)) * dt_f[:, s]
            elif s > t:
                M[:, :, t, s] = (Cb[:, t + 1] * Bb[:, s]).sum(-1)[:, None] * torch.exp(A * dt_b[:, t + 1 : s].sum(1)) * dt_b[:, s]
            else:
                M[:, :, t, t] = diag[:, t]
    xh = x.reshape(Bsz, L, H, P)
    y = torch.einsum("bhts,bshp->bthp", M, xh).reshape(Bsz, L, E)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * mixer.norm.weight * F.silu(z)
    return y @ mixer.out_proj.weight.t()


@pytest.mark.parametrize("L", [9, 5])
def test_hydra_mixer_matches_closed_form_quasiseparable_matrix(L):
    torch.manual_seed(0)
    mixer = HydraMixer(d_model=8, d_state=4, d_conv=7, expand=2, headdim=4, chunk_size=4)  # 4 heads
    with torch.no_grad():
        mixer.A_log.copy_(torch.randn(4) * 0.5)
        mixer.D.copy_(torch.randn(4))
        mixer.norm.weight.add_(0.2 * torch.randn(16))
    u = torch.randn(2, L, 8)
    with torch.no_grad():
        torch.testing.assert_close(mixer(u), _hydra_closed_form(mixer, u), atol=1e-5, rtol=1e-4)


def test_hydra_mixer_config_errors_and_headdim_override():
    with pytest.raises(ValueError, match="headdim=64"):
        HydraMixer(d_model=48)  # d_inner 96
    with pytest.raises(ValueError, match="d_conv=4 must be odd"):
        HydraMixer(d_model=32, d_conv=4)
    m = mambavision.create_model("hydra_einfft", **{**TINY, "embed_dim": 48, "headdim": 32})
    assert m.blocks[0].mixer.nheads == 3
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 96)


# -- backbones (tiny) ------------------------------------------------------------------------------
def test_hydra_hybrid_block_layout():
    kinds = lambda m: [type(b.mixer).__name__ for b in m.blocks]  # noqa: E731
    assert kinds(mambavision.create_model("hydra_hybrid", **{**TINY, "depth": 5})) == ["HydraMixer"] * 3 + ["Attention"] * 2
    assert kinds(mambavision.create_model("hydra_einfft", **{**TINY, "depth": 4})) == ["HydraMixer"] * 4
    assert isinstance(mambavision.create_model("hydra_hybrid", **TINY).blocks[0].channel_mixer, EinFFT)


def test_middle_cls_position_embedding():
    pos = torch.randn(1, 17, 4)  # 4x4 grid, CLS slot at 8
    same = middle_cls_pos_embed(pos, (4, 4))
    assert torch.equal(same, pos)
    small = middle_cls_pos_embed(pos, (2, 3))  # 6 patches: CLS slot at 3
    assert small.shape == (1, 7, 4)
    assert torch.equal(small[:, 3], pos[:, 8])


@pytest.mark.parametrize("name", ["vim_einfft", "hydra_einfft", "hydra_hybrid"])
@pytest.mark.parametrize("hw,cls_index", [((32, 32), 8), ((16, 24), 3)])
def test_cls_token_in_the_middle_with_its_position(name, hw, cls_index):
    torch.manual_seed(0)
    m = mambavision.create_model(name, **tiny_kw(name)).eval()
    tokens, idx = m.prepare_tokens_with_masks(torch.randn(2, 3, *hw))
    assert idx == cls_index
    pos = middle_cls_pos_embed(m.pos_embed, (hw[0] // 8, hw[1] // 8))
    torch.testing.assert_close(tokens[:, idx], (m.cls_token[0] + pos[:, idx]).expand(2, -1))


def test_vim_residual_stream_is_fp32():
    torch.manual_seed(0)
    m = mambavision.create_model("vim_einfft", **TINY_VIM).to(torch.bfloat16).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16), is_training=True)
    assert out["x_prenorm"].dtype == torch.float32
    assert torch.isfinite(out["x_norm_clstoken"].float()).all()


def test_global_pool_choices():
    assert mambavision.create_model("vim_einfft", **TINY_VIM).num_features == 32  # CLS, as Vim
    assert mambavision.create_model("hydra_einfft", **TINY).num_features == 64  # cat[CLS, mean], as MV_Hybrid


@pytest.mark.parametrize("name", ["vim_einfft", "hydra_hybrid"])
def test_load_pretrained_round_trip(tmp_path, name):
    torch.manual_seed(0)
    m = mambavision.create_model(name, **tiny_kw(name)).eval()
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in m.state_dict().items()}}, path)
    heads = {} if name == "vim_einfft" else {"num_heads": 2}
    loaded = mambavision.load_pretrained(str(path), name, img_size=32, **heads)
    assert loaded.n_blocks == 2 and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x))
