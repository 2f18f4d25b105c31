"""The backbone contract (DESIGN.md), one parametrised test per registered backbone, tiny configs."""
import pytest
import torch
from torch import nn

import mambavision

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
MODELS = mambavision.list_models()


def tiny(name, **kw):
    torch.manual_seed(0)
    return mambavision.create_model(name, **{**TINY, **kw})


def test_all_six_paper_backbones_are_registered():
    assert {"mv_hybrid", "vit_12", "vit_24", "vim_einfft", "hydra_einfft", "hydra_hybrid"} <= set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_attributes_and_no_batchnorm(name):
    m = tiny(name)
    assert m.embed_dim == 32 and m.patch_size == 8 and m.n_blocks == 4
    assert isinstance(m.mask_token, nn.Parameter) and m.mask_token.shape[-1] == 32
    assert m.num_features in (32, 64)
    assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in m.modules())
    nwd = m.no_weight_decay()
    assert {"cls_token", "mask_token"} <= nwd
    params = dict(m.named_parameters())
    assert nwd <= set(params)
    for key in params:
        if key.rsplit(".", 1)[-1] in ("pos_embed", "A_log", "A_b_log", "dt_bias"):
            assert key in nwd


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
