"""Optimiser parameter groups with layer-wise lr decay and weight-decay exclusions (DINOv2).

What each backbone parameter is (its layer, whether it is decayed, whether it is the patch embedding)
comes from the backbone's card (:meth:`mambavision.BackboneCard.parameter_roles`), which reads the
model's structure; nothing here parses parameter names. Parameters outside a backbone (the heads) get
the lr multiplier 1 and DINOv2's rule for weight decay: none for biases and other 1-D parameters.
"""

import logging
from collections import defaultdict

from mambavision.card import backbone_cards
from mambavision.pretrained import strip_wrappers

logger = logging.getLogger("dino")  # the logger setup_logging configures


def _lr_decay_multiplier(layer_id, lr_decay_rate, num_layers):
    """``lr_decay_rate ** (num_layers + 1 - layer_id)``: the stem decays most, the final norm not at all."""
    return lr_decay_rate ** (num_layers + 1 - layer_id)


def _backbone_roles(model, lr_decay_rate, patch_embed_lr_mult):
    """``id(param) -> (lr_multiplier, wd_multiplier)`` for every parameter of every backbone in ``model``."""
    roles = {}
    for _, backbone, card in backbone_cards(model):
        params = dict(backbone.named_parameters())
        for name, role in card.parameter_roles(backbone).items():
            lr = _lr_decay_multiplier(role.layer_id, lr_decay_rate, backbone.n_blocks)
            roles[id(params[name])] = (lr * (patch_embed_lr_mult if role.patch_embed else 1.0),
                                       1.0 if role.weight_decay else 0.0)
    return roles


def get_params_groups_with_decay(model, lr_decay_rate=1.0, patch_embed_lr_mult=1.0):
    """One dict per trainable parameter: params, name, lr_multiplier, wd_multiplier, is_last_layer.

    - lr_multiplier: layer-wise decay over the backbone's ``n_blocks`` (for any backbone inside ``model``,
      e.g. ``backbone.*`` of a student), times ``patch_embed_lr_mult`` for the patch embedding; 1 elsewhere.
    - wd_multiplier 0 for what the backbone's card exempts (tokens, SSM dynamics, parameters of <= 1
      dimension) and for 1-D parameters outside a backbone; 1 otherwise.
    - is_last_layer for the heads' prototype layers (DINOv2's ``last_layer``).
    Frozen parameters (requires_grad False) are left out.
    """
    roles = _backbone_roles(model, lr_decay_rate, patch_embed_lr_mult)
    all_param_groups = []
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = strip_wrappers(raw_name)  # logged names as in the plain module, whatever wraps it
        lr_multiplier, wd_multiplier = roles.get(id(param), (1.0, 0.0 if param.ndim <= 1 else 1.0))
        d = {
            "params": param,
            "name": name,
            "is_last_layer": "last_layer" in name,
            "lr_multiplier": lr_multiplier,
            "wd_multiplier": wd_multiplier,
        }
        all_param_groups.append(d)
        logger.debug("%s: lr_multiplier %s, wd_multiplier %s", name, d["lr_multiplier"], d["wd_multiplier"])
    return all_param_groups


def fuse_params_groups(all_params_groups, keys=("lr_multiplier", "wd_multiplier", "is_last_layer")):
    """Merge per-parameter dicts that agree on ``keys`` into optimiser param groups."""
    fused = defaultdict(lambda: {"params": []})
    for d in all_params_groups:
        identifier = "_".join(f"{k}{d[k]}" for k in keys)
        for k in keys:
            fused[identifier][k] = d[k]
        fused[identifier]["params"].append(d["params"])
    return fused.values()
