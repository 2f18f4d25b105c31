"""CosineScheduler values and DINOv2 parameter groups on real tiny backbones."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import mambavision
from dino.heads import DINOHead
from mambavision.models.vit import VisionTransformer
from dino.utils.param_groups import fuse_params_groups, get_params_groups_with_decay
from dino.utils.schedules import CosineScheduler

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


# ---------------------------------------------------------------- CosineScheduler
def test_cosine_scheduler_warmup_cosine_and_tail():
    s = CosineScheduler(base_value=1.0, final_value=0.1, total_iters=20, warmup_iters=5, start_warmup_value=0.2)
    assert s[0] == pytest.approx(0.2)  # warmup start
    assert s[4] == pytest.approx(1.0)  # warmup end, inclusive
    assert s[2] == pytest.approx(0.6)  # linear in between
    assert s[5] == pytest.approx(1.0)  # cosine starts at the base value
    # cosine over the 15 remaining iterations: i-th value is final + (base-final)(1+cos(pi i/15))/2
    assert s[12] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 7 / 15)))
    assert s[19] > 0.1 and s[19] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 14 / 15)))
    assert s[20] == 0.1 and s[10_000] == 0.1  # past the end: final value
    assert np.all(np.diff(s.schedule[5:]) < 0)


def test_cosine_scheduler_freeze_and_writable_schedule():
    s = CosineScheduler(base_value=0.5, final_value=0.0, total_iters=10, warmup_iters=2, freeze_iters=3)
    assert [s[i] for i in range(3)] == [0, 0, 0]
    assert s[3] == 0 and s[4] == pytest.approx(0.5)
    s.schedule[:6] = 0  # the trainer freezes the last layer this way
    assert s[5] == 0


def test_teacher_temperature_dinov2_construction_is_warmup_then_constant():
    warmup = 30 * 4  # 30 "epochs" of 4 iterations
    temp = CosineScheduler(
        base_value=0.06, final_value=0.06, total_iters=warmup, warmup_iters=warmup, start_warmup_value=0.04
    )
    assert temp[0] == pytest.approx(0.04)
    assert temp[warmup // 2] == pytest.approx(0.04 + 0.02 * (warmup // 2) / (warmup - 1))
    assert temp[warmup - 1] == pytest.approx(0.06)
    assert temp[warmup] == 0.06 and temp[100 * warmup] == 0.06


def test_cosine_scheduler_rejects_bad_lengths():
    with pytest.raises(ValueError, match="exceed total_iters"):
        CosineScheduler(1.0, 0.0, total_iters=5, warmup_iters=4, freeze_iters=2)
    with pytest.raises(IndexError):
        CosineScheduler(1.0, 0.0, total_iters=5)[-1]


# ---------------------------------------------------------------- parameter groups
def _by_name(groups):
    return {d["name"]: d for d in groups}


def test_param_groups_vit_layer_decay_wd_and_patch_embed():
    model = mambavision.create_model("vit_12", **TINY)
    groups = _by_name(get_params_groups_with_decay(model, lr_decay_rate=0.5, patch_embed_lr_mult=0.2))
    assert set(groups) == {n for n, _ in model.named_parameters()}
    n = model.n_blocks
    assert n == 2
    # layer ids: stem 0, block i -> i + 1, final norm n + 1; multiplier = rate ** (n + 1 - id)
    assert groups["cls_token"]["lr_multiplier"] == pytest.approx(0.5**3)
    assert groups["patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.2 * 0.5**3)
    assert groups["blocks.0.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.5**2)
    assert groups["blocks.1.mlp.fc1.weight"]["lr_multiplier"] == pytest.approx(0.5)
    assert groups["norm.weight"]["lr_multiplier"] == 1.0
    # no weight decay: bias, norm, LayerScale gamma, 1-D, and no_weight_decay() names
    for name in ["blocks.0.attn.qkv.bias", "blocks.0.norm1.weight", "blocks.1.ls1.gamma", "norm.weight"]:
        assert groups[name]["wd_multiplier"] == 0.0, name
    for name in model.no_weight_decay():  # cls_token, pos_embed, mask_token: not 1-D
        assert groups[name]["wd_multiplier"] == 0.0, name
    for name in ["blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "patch_embed.proj.weight"]:
        assert groups[name]["wd_multiplier"] == 1.0, name
    assert not any(d["is_last_layer"] for d in groups.values())


def test_param_groups_mv_hybrid_nested_blocks_and_mamba_params():
    model = mambavision.create_model("mv_hybrid", **TINY)
    groups = _by_name(get_params_groups_with_decay(model, lr_decay_rate=0.5))
    assert groups["blocks.blocks.0.mixer.in_proj.weight"]["lr_multiplier"] == pytest.approx(0.25)
    assert groups["blocks.blocks.1.mixer.qkv.weight"]["lr_multiplier"] == pytest.approx(0.5)
    # A_log is 2-D: excluded only because MV_Hybrid lists it in no_weight_decay()
    assert groups["blocks.blocks.0.mixer.A_log"]["params"].ndim == 2
    assert groups["blocks.blocks.0.mixer.A_log"]["wd_multiplier"] == 0.0
    assert groups["blocks.blocks.0.mixer.D"]["wd_multiplier"] == 0.0
    assert groups["blocks.blocks.0.channel_mixer.complex_weight_1"]["wd_multiplier"] == 1.0


def test_param_groups_on_prefixed_student_with_heads():
    student = nn.ModuleDict(
        {
            "backbone": mambavision.create_model("vit_12", **TINY),
            "dino_head": DINOHead(32, 16, hidden_dim=32, bottleneck_dim=8),
        }
    )
    groups = _by_name(get_params_groups_with_decay(student, lr_decay_rate=0.5, patch_embed_lr_mult=0.2))
    # the frozen prototype norm is not handed to the optimiser
    assert "dino_head.last_layer.parametrizations.weight.original0" not in groups
    last = groups["dino_head.last_layer.parametrizations.weight.original1"]
    assert last["is_last_layer"] and last["lr_multiplier"] == 1.0 and last["wd_multiplier"] == 1.0
    assert groups["dino_head.mlp.0.bias"]["wd_multiplier"] == 0.0
    assert groups["backbone.blocks.0.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.25)
    assert groups["backbone.patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.2 * 0.125)
    assert groups["backbone.pos_embed"]["wd_multiplier"] == 0.0  # no_weight_decay() seen through the prefix
    assert sum(d["is_last_layer"] for d in groups.values()) == 1


def test_param_groups_vim_layers_and_wrapper_prefixes():
    """Vim keeps its blocks under ``layers``; a wrapper (here FSDP1's name insertion) changes no role."""

    class Wrapper(nn.Module):
        def __init__(self, m):
            super().__init__()
            self._fsdp_wrapped_module = m

    vim = mambavision.create_model("vim_einfft", img_size=32, patch_size=8, embed_dim=32, depth=3)
    groups = _by_name(get_params_groups_with_decay(Wrapper(vim), lr_decay_rate=0.1))
    assert groups["layers.2.mixer.in_proj.weight"]["lr_multiplier"] == pytest.approx(0.1)
    assert groups["layers.0.mixer.in_proj.weight"]["lr_multiplier"] == pytest.approx(0.001)
    assert groups["norm_f.weight"]["lr_multiplier"] == 1.0
    assert groups["layers.0.mixer.A_b_log"]["wd_multiplier"] == 0.0  # 2-D, exempt as SSM dynamics


def test_fuse_params_groups_covers_every_parameter_once():
    model = mambavision.create_model("vit_12", **TINY)
    groups = get_params_groups_with_decay(model, lr_decay_rate=0.5, patch_embed_lr_mult=0.2)
    fused = list(fuse_params_groups(groups))
    keys = {(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in fused}
    assert len(keys) == len(fused)
    fused_ids = [id(p) for g in fused for p in g["params"]]
    assert sorted(fused_ids) == sorted(id(p) for p in model.parameters())
    # usable by an optimiser directly
    torch.optim.AdamW([{"params": g["params"]} for g in fused], lr=1e-3)


# ---------------------------------------------------------------- the card, not names, drives the groups
class _RenamedViT(VisionTransformer):
    """ViT_12 with its block container called ``trunk`` (not "blocks"/"layers") and an extra 2-D weight
    whose name contains "norm": the cases where parsing names used to change lr decay and weight decay."""

    blocks = property(lambda self: self.trunk)

    def __init__(self, **kw):
        super().__init__(**kw)
        self.trunk = self._modules.pop("blocks")
        self.normalizer = nn.Linear(4, 4, bias=False)


def _renamed_vit():
    torch.manual_seed(0)
    m = _RenamedViT(**{**mambavision.get_entry("vit_12").default_cfg, **TINY})
    m.card = mambavision.get_card("vit_12")
    return m


def test_renaming_the_block_container_does_not_change_lr_decay():
    """Issue 13: with blocks under ``trunk.*`` the name parser gave every block parameter layer id
    n_blocks + 1, i.e. no layer-wise decay at all, without a word."""
    plain = _by_name(get_params_groups_with_decay(mambavision.create_model("vit_12", **TINY), lr_decay_rate=0.5))
    renamed = _by_name(get_params_groups_with_decay(_renamed_vit(), lr_decay_rate=0.5))
    assert renamed["trunk.0.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.25)
    assert renamed["trunk.1.mlp.fc1.weight"]["lr_multiplier"] == pytest.approx(0.5)
    for name, d in plain.items():
        other = renamed[name.replace("blocks.", "trunk.", 1) if name.startswith("blocks.") else name]
        assert (other["lr_multiplier"], other["wd_multiplier"]) == (d["lr_multiplier"], d["wd_multiplier"]), name


def test_weight_decay_follows_the_card_not_the_word_norm():
    """A 2-D weight is decayed whatever its name; the card's no-weight-decay set is what is exempt."""
    model = _renamed_vit()
    groups = _by_name(get_params_groups_with_decay(model, lr_decay_rate=0.5))
    assert groups["normalizer.weight"]["wd_multiplier"] == 1.0
    exempt = model.card.no_weight_decay(model)
    assert {n for n, d in groups.items() if d["wd_multiplier"] == 0.0} == exempt
