"""The backbone contract (DESIGN.md), one parametrised test per registered backbone, tiny configs."""
import inspect
import io

import pytest
import torch
from torch import nn

import mambavision

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4)
HEADS = dict(num_heads=2)  # for the backbones with attention blocks
MODELS = mambavision.list_models()
SSM_LAYERS_AT_DEPTH_4 = {"mv_hybrid": 2, "vim_einfft": 8, "hydra_einfft": 4, "hydra_hybrid": 2, "vit_12": 0, "vit_24": 0}


def tiny(name, **kw):
    torch.manual_seed(0)
    heads = HEADS if "num_heads" in mambavision.get_card(name).accepted_overrides else {}
    return mambavision.create_model(name, **{**TINY, **heads, **kw})


def test_all_six_paper_backbones_are_registered():
    assert {"mv_hybrid", "vit_12", "vit_24", "vim_einfft", "hydra_einfft", "hydra_hybrid"} <= set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_attributes_and_no_batchnorm(name):
    m = tiny(name)
    assert m.embed_dim == 32 and m.patch_size == 8 and m.n_blocks == 4
    assert isinstance(m.mask_token, nn.Parameter) and m.mask_token.shape[-1] == 32
    assert m.num_features in (32, 64)
    assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in m.modules())
    assert {"cls_token", "mask_token"} <= m.no_weight_decay()


@pytest.mark.parametrize("name", MODELS)
def test_tensor_and_list_inputs(name):
    m = tiny(name).eval()
    g, l = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 16, 16)
    out = m.forward_features(g)
    assert out["x_norm_clstoken"].shape == (3, 32)
    assert out["x_norm_patchtokens"].shape == (3, 16, 32)
    assert out["x_prenorm"].shape == (3, 17, 32)
    assert out["masks"] is None
    masks = torch.zeros(3, 16, dtype=torch.bool)
    masks[:, :5] = True
    outs = m.forward_features([g, l], masks=[masks, None])
    assert isinstance(outs, list) and len(outs) == 2
    assert outs[0]["x_norm_patchtokens"].shape == (3, 16, 32) and outs[0]["masks"] is masks
    assert outs[1]["x_norm_patchtokens"].shape == (3, 4, 32) and outs[1]["masks"] is None
    emb = m(g)
    assert emb.shape == (3, m.num_features)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("hw", [(16, 16), (24, 40), (48, 48)])
def test_any_multiple_of_patch_size(name, hw):
    m = tiny(name).eval()
    out = m.forward_features(torch.randn(2, 3, *hw))
    n = (hw[0] // 8) * (hw[1] // 8)
    assert out["x_norm_patchtokens"].shape == (2, n, 32)
    assert torch.isfinite(out["x_norm_patchtokens"]).all()


@pytest.mark.parametrize("name", MODELS)
def test_non_multiple_size_is_a_clear_error(name):
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny(name)(torch.randn(1, 3, 30, 32))


@pytest.mark.parametrize("name", MODELS)
def test_masks_change_exactly_the_masked_inputs(name):
    m = tiny(name).eval()
    with torch.no_grad():
        m.mask_token.normal_()  # zeros at init could coincide with a real embedding value
    x = torch.randn(2, 3, 32, 32)
    masks = torch.rand(2, 16) < 0.4
    masks[0, 0] = True
    t0, ci0 = m.prepare_tokens_with_masks(x)
    t1, ci1 = m.prepare_tokens_with_masks(x, masks)
    assert ci0 == ci1
    changed = (t0 != t1).any(-1)
    changed_patches = torch.cat([changed[:, :ci0], changed[:, ci0 + 1 :]], dim=1)
    assert not changed[:, ci0].any()
    assert torch.equal(changed_patches, masks)
    # and the masked tokens are the mask token (plus position embedding, if any)
    t_all, _ = m.prepare_tokens_with_masks(x, torch.ones(2, 16, dtype=torch.bool))
    t_other, _ = m.prepare_tokens_with_masks(torch.randn(2, 3, 32, 32), torch.ones(2, 16, dtype=torch.bool))
    assert torch.allclose(t_all, t_other)


@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_every_parameter(name):
    m = tiny(name).train()
    g, l = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[:, ::3] = True
    outs = m([g, l], masks=[masks, None], is_training=True)
    loss = sum((o["x_norm_clstoken"] ** 2).sum() + (o["x_norm_patchtokens"] ** 3).sum() for o in outs)
    loss.backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"


@pytest.mark.parametrize("name", MODELS)
def test_eval_and_train_outputs_are_consistent(name):
    m = tiny(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        emb = m(x)
        d = m(x, is_training=True)
        layers = m.get_intermediate_layers(x, n=2, return_class_token=True)
        reshaped = m.get_intermediate_layers(x, n=[0, -1], reshape=True)
    cls, patches = d["x_norm_clstoken"], d["x_norm_patchtokens"]
    expected = torch.cat([cls, patches.mean(1)], -1) if m.num_features == 2 * m.embed_dim else cls
    torch.testing.assert_close(emb, expected)
    assert len(layers) == 2
    torch.testing.assert_close(layers[-1][0], patches)
    torch.testing.assert_close(layers[-1][1], cls)
    assert reshaped[0].shape == (2, 32, 4, 4) and len(reshaped) == 2
    torch.testing.assert_close(reshaped[1].flatten(2).transpose(1, 2), patches)


# --------------------------------------------------------------------------- the backbone card
@pytest.mark.parametrize("name", MODELS)
def test_card_is_attached_and_round_trips_as_a_plain_dict(name):
    m = tiny(name)
    card = mambavision.get_card(name)
    assert m.card is card and card.name == name
    assert m.num_features == m.embed_dim * (2 if card.pool == "cls+mean" else 1)
    buf = io.BytesIO()
    torch.save({"card": card.to_dict()}, buf)
    buf.seek(0)
    assert mambavision.BackboneCard.from_dict(torch.load(buf, weights_only=True)["card"]) == card
    with pytest.raises(ValueError, match="unknown keys"):
        mambavision.BackboneCard.from_dict({**card.to_dict(), "nope": 1})


@pytest.mark.parametrize("name", MODELS)
def test_card_preprocessing_is_valid(name):
    card = mambavision.get_card(name)
    pre = tiny(name).pretrained_cfg
    assert pre == card.preprocessing()
    assert len(card.mean) == len(card.std) == 3 and all(0 < v < 1 for v in card.mean + card.std)
    assert card.img_size % mambavision.get_entry(name).default_cfg["patch_size"] == 0
    from PIL import Image

    x = mambavision.eval_transform(card=card)(Image.new("RGB", (300, 200), (200, 100, 150)))
    assert x.shape == (3, card.img_size, card.img_size)
    torch.testing.assert_close(x[:, 0, 0], (torch.tensor([200, 100, 150]) / 255 - torch.tensor(card.mean)) / torch.tensor(card.std))
    with pytest.raises(ValueError, match="interpolation"):
        mambavision.BackboneCard(name="x", paper_name="x", pool="cls", accepted_overrides=(), interpolation="lanczos9")


@pytest.mark.parametrize("name", MODELS)
def test_card_layer_ids_cover_every_parameter_in_depth_order(name):
    m = tiny(name)
    roles = m.card.parameter_roles(m)
    assert set(roles) == {n for n, _ in m.named_parameters()}
    n = m.n_blocks
    assert all(0 <= r.layer_id <= n + 1 for r in roles.values())
    by_id = {id(p): roles[k].layer_id for k, p in m.named_parameters()}
    block_ids = [{by_id[id(p)] for p in blk.parameters()} for blk in m.blocks]
    assert block_ids == [{i + 1} for i in range(n)]  # one id per block, rising with depth
    stem = list(m.patch_embed.parameters()) + m.token_parameters()
    assert {by_id[id(p)] for p in stem} == {0}
    assert {by_id[id(p)] for p in m.norm.parameters()} == {n + 1}
    assert {k for k, r in roles.items() if r.patch_embed} == {f"patch_embed.{k}" for k, _ in m.patch_embed.named_parameters()}


@pytest.mark.parametrize("name", MODELS)
def test_card_no_weight_decay_set(name):
    m = tiny(name)
    params = dict(m.named_parameters())
    nwd = m.no_weight_decay()
    assert nwd == m.card.no_weight_decay(m) and nwd <= set(params)
    ids = {id(params[k]) for k in nwd}
    assert all(id(p) in ids for p in m.token_parameters())
    assert all(id(p) in ids for layer in m.card.ssm_layers(m) for p in layer.parameters())
    assert all(id(p) in ids for p in m.parameters() if p.ndim <= 1)
    for blk in m.blocks:  # every block has decayed matrices
        assert any(p.ndim >= 2 and id(p) not in ids for p in blk.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_card_ssm_layers(name):
    m = tiny(name)
    layers = list(m.card.ssm_layers(m))
    assert len(layers) == SSM_LAYERS_AT_DEPTH_4[name]
    own = {id(p) for p in m.parameters()}
    for layer in layers:
        assert all(id(p) in own for p in layer.parameters())
        assert layer.A_log.shape[0] == layer.dt_bias.shape[0] == layer.D.shape[0]
        assert (layer.A < 0).all() and layer.dt_bias_applications in (1, 2)
        if layer.kind == "mamba1":
            n, rank = layer.A_log.shape[1], layer.dt_weight.shape[1]
            assert layer.x_proj.out_features == rank + 2 * n and layer.dt_weight.shape[0] == layer.A_log.shape[0]
    if name == "mv_hybrid":  # the release adds the dt bias twice
        assert all(layer.dt_bias_applications == 2 for layer in layers)


def _default(entry, key):
    if key in entry.default_cfg:
        return entry.default_cfg[key]
    return inspect.signature(entry.cls.__init__).parameters[key].default


@pytest.mark.parametrize("name", MODELS)
def test_card_accepted_overrides_build_and_others_are_refused(name):
    entry = mambavision.get_entry(name)
    card = entry.card
    base = {**TINY, **(HEADS if "num_heads" in card.accepted_overrides else {})}
    for key in card.accepted_overrides:
        value = base.get(key, _default(entry, key))
        assert tiny(name, **{key: value}).model_cfg[key] == value, key
    with pytest.raises(TypeError, match=r"unknown override\(s\) \['no_such_key'\]"):
        tiny(name, no_such_key=1)


def test_vim_refuses_num_heads_which_it_would_ignore():
    assert "num_heads" not in mambavision.get_card("vim_einfft").accepted_overrides
    with pytest.raises(TypeError, match=r"create_model\('vim_einfft'\): unknown override\(s\) \['num_heads'\]"):
        mambavision.create_model("vim_einfft", num_heads=6)


def test_patch_embedding_is_the_strided_convolution_as_one_matrix_product():
    """Regression (H200 trace, 5cfd683): in bf16 cuDNN ran the stride-16 patch convolution on a slow implicit-GEMM
    kernel, 1 ms a call at 128 x 256 px. The embedding is now one matrix product over flattened patches; it must
    equal the Conv2d it replaces (whose weights it keeps), forward and backward, and count the same FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from mambavision.layers import PatchEmbed

    torch.manual_seed(0)
    pe = PatchEmbed(img_size=64, patch_size=16, in_chans=3, embed_dim=32).double()
    x = torch.randn(2, 3, 48, 64, dtype=torch.float64)  # not square: rows and columns must not swap
    ref = pe.proj(x).flatten(2).transpose(1, 2)
    out = pe(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g_ref = torch.autograd.grad(ref.square().sum(), list(pe.parameters()))
    g_out = torch.autograd.grad(pe(x).square().sum(), list(pe.parameters()))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    counts = []
    for fn in (lambda: pe.proj(x), lambda: pe(x)):
        with FlopCounterMode(display=False) as c:
            fn()
        counts.append(c.get_total_flops())
    assert counts[0] == counts[1] > 0
    assert list(pe.state_dict()) == ["proj.weight", "proj.bias"]
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket)
            return func(*args, **(kwargs or {}))

    with Ops():
        pe(x).sum().backward()
    assert torch.ops.aten.convolution not in ops and torch.ops.aten.convolution_backward not in ops
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pe.float()(x.float()).dtype == torch.bfloat16
