"""DINOv2 ViT-S/16 baselines."""
import pytest
import torch

import mambavision
from mambavision.layers import resample_patch_pos_embed


@pytest.mark.parametrize("name,depth,count", [("vit_12", 12, 21_698_304), ("vit_24", 24, 43_001_088)])
def test_full_size_parameter_counts(name, depth, count):
    m = mambavision.create_model(name)
    # patch 295,296 + cls 384 + pos 257*384 + mask 384 + depth * 1,775,232 + norm 768
    assert 295_296 + 384 + 257 * 384 + 384 + depth * 1_775_232 + 768 == count
    assert sum(p.numel() for p in m.parameters()) == count
    assert m.n_blocks == depth and m.pos_embed.shape == (1, 257, 384)
    assert torch.allclose(m.blocks[0].ls1.gamma, torch.full((384,), 1e-5))


def test_dinov2_key_names():
    keys = set(mambavision.create_model("vit_12", embed_dim=32, depth=1, num_heads=2).state_dict())
    for k in ("cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "blocks.0.norm1.weight",
              "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias", "blocks.0.ls1.gamma", "blocks.0.mlp.fc1.weight",
              "blocks.0.mlp.fc2.bias", "blocks.0.ls2.gamma", "norm.weight"):
        assert k in keys, k


def test_position_embedding_interpolation_for_local_crops():
    m = mambavision.create_model("vit_12", embed_dim=32, depth=1, num_heads=2).eval()
    pos = m.interpolate_pos_encoding((16, 16))
    assert torch.equal(pos, m.pos_embed)  # native grid: untouched
    pos7 = m.interpolate_pos_encoding((7, 7))
    assert pos7.shape == (1, 50, 32)
    torch.testing.assert_close(pos7[:, 0], m.pos_embed[:, 0])
    out = m.forward_features(torch.randn(2, 3, 112, 112))
    assert out["x_norm_patchtokens"].shape == (2, 49, 32)


def test_resample_is_smooth_and_rejects_non_square():
    # A linear ramp is reproduced (up to bicubic overshoot) at a lower resolution.
    ramp = torch.linspace(0, 1, 16).repeat(16, 1).reshape(1, 256, 1)
    out = resample_patch_pos_embed(ramp, (7, 7), interpolate_offset=0.0).reshape(7, 7)
    assert torch.all(out[:, 1:] > out[:, :-1])
    with pytest.raises(ValueError, match="square"):
        resample_patch_pos_embed(torch.zeros(1, 10, 4), (2, 2))
