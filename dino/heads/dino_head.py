"""DINO projection head (Caron et al. 2021, DINO; as configured by DINOv2, Oquab et al. 2023)."""

import torch
from torch import nn
from torch.nn.init import trunc_normal_
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """MLP in->hidden->...->bottleneck, L2 normalisation, then a prototype layer.

    The prototype layer ``last_layer`` is a bias-free Linear(bottleneck_dim -> out_dim),
    weight-normalised through ``torch.nn.utils.parametrizations.weight_norm`` with the
    per-prototype norm (``parametrizations.weight.original0``, the old ``weight_g``) set to
    1 and frozen, so every prototype is a unit vector and the logits are cosine
    similarities. Checkpoints with the legacy ``last_layer.weight_g/weight_v`` keys load
    (torch converts them).

    Args:
        in_dim: input feature size (the backbone's embed_dim).
        out_dim: number of prototypes K.
        use_bn: BatchNorm1d after each hidden Linear (off in DINOv2).
        nlayers: number of Linear layers in the MLP (>= 1).
        hidden_dim: hidden width.
        bottleneck_dim: width before the prototype layer.
        mlp_bias: bias in the MLP's Linear layers.
    """

    def __init__(
        self,
        in_dim,
        out_dim,
        use_bn=False,
        nlayers=3,
        hidden_dim=2048,
        bottleneck_dim=256,
        mlp_bias=True,
    ):
        super().__init__()
        self.mlp = _build_mlp(max(nlayers, 1), in_dim, bottleneck_dim, hidden_dim, use_bn, mlp_bias)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        norm = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            norm.fill_(1.0)
        norm.requires_grad_(False)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x):
        """(..., in_dim) -> (..., out_dim) prototype logits."""
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12  # 1e-12 underflows in fp16
        x = nn.functional.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)


def _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, use_bn, bias):
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers = []
    dims = [in_dim] + [hidden_dim] * (nlayers - 1)
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)
