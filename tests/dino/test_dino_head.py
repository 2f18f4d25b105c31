"""DINOHead: shapes, unit-norm prototypes that stay unit-norm, init, state_dict compatibility."""

import pytest
import torch
from torch import nn

from dino.heads import DINOHead


def _prototype_norms(head):
    return head.last_layer.weight.norm(dim=1)


def test_output_shapes_and_cosine_logits():
    head = DINOHead(in_dim=32, out_dim=50, hidden_dim=64, bottleneck_dim=16)
    out = head(torch.randn(4, 32))
    assert out.shape == (4, 50)
    assert head(torch.randn(2, 7, 32)).shape == (2, 7, 50)
    # unit bottleneck times unit prototypes: logits are cosines
    assert out.abs().max() <= 1.0 + 1e-5
    assert isinstance(head.last_layer, nn.Linear) and head.last_layer.bias is None


@pytest.mark.parametrize("nlayers,use_bn", [(1, False), (2, True), (4, False)])
def test_mlp_depth_variants(nlayers, use_bn):
    head = DINOHead(in_dim=8, out_dim=10, use_bn=use_bn, nlayers=nlayers, hidden_dim=12, bottleneck_dim=6)
    linears = [m for m in head.mlp.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == nlayers
    assert linears[0].in_features == 8 and linears[-1].out_features == 6
    assert any(isinstance(m, nn.BatchNorm1d) for m in head.modules()) == (use_bn and nlayers > 1)
    assert head(torch.randn(3, 8)).shape == (3, 10)


def test_init_trunc_normal_and_zero_bias():
    head = DINOHead(in_dim=256, out_dim=8, hidden_dim=512, bottleneck_dim=64)
    first = head.mlp[0]
    assert torch.all(first.bias == 0)
    assert first.weight.std().item() == pytest.approx(0.02, rel=0.1)
    torch.testing.assert_close(_prototype_norms(head), torch.ones(8))


def test_prototype_norm_frozen_at_one_through_optimizer_steps():
    head = DINOHead(in_dim=16, out_dim=20, hidden_dim=32, bottleneck_dim=8)
    g = head.last_layer.parametrizations.weight.original0
    v = head.last_layer.parametrizations.weight.original1
    assert not g.requires_grad and v.requires_grad
    v_before = v.detach().clone()
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=0.1, weight_decay=0.5)
    for _ in range(3):
        opt.zero_grad()
        head(torch.randn(5, 16)).pow(2).sum().backward()
        assert v.grad is not None and v.grad.abs().sum() > 0
        opt.step()
    assert not torch.equal(v, v_before), "prototype directions must train"
    torch.testing.assert_close(g, torch.ones_like(g))
    torch.testing.assert_close(_prototype_norms(head), torch.ones(20))


def test_state_dict_round_trip_and_legacy_weight_norm_keys():
    head = DINOHead(in_dim=8, out_dim=6, hidden_dim=16, bottleneck_dim=4)
    sd = head.state_dict()
    assert {"last_layer.parametrizations.weight.original0", "last_layer.parametrizations.weight.original1"} <= set(sd)
    other = DINOHead(in_dim=8, out_dim=6, hidden_dim=16, bottleneck_dim=4)
    other.load_state_dict(sd)
    x = torch.randn(3, 8)
    torch.testing.assert_close(other(x), head(x))

    # checkpoints from the deprecated torch.nn.utils.weight_norm (DINOv2 releases) load too
    legacy = {k: v for k, v in sd.items() if not k.startswith("last_layer.")}
    legacy["last_layer.weight_g"] = sd["last_layer.parametrizations.weight.original0"]
    legacy["last_layer.weight_v"] = sd["last_layer.parametrizations.weight.original1"]
    third = DINOHead(in_dim=8, out_dim=6, hidden_dim=16, bottleneck_dim=4)
    third.load_state_dict(legacy)
    torch.testing.assert_close(third(x), head(x))


def test_deepcopy_for_the_ema_teacher():
    import copy

    head = DINOHead(in_dim=8, out_dim=6, hidden_dim=16, bottleneck_dim=4)
    teacher = copy.deepcopy(head)
    x = torch.randn(3, 8)
    torch.testing.assert_close(teacher(x), head(x))
    assert not teacher.last_layer.parametrizations.weight.original0.requires_grad
