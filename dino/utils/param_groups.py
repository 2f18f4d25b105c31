"""Optimiser parameter groups with layer-wise lr decay and weight-decay exclusions (DINOv2)."""

import logging
from collections import defaultdict

from mambavision.pretrained import strip_wrappers

logger = logging.getLogger("dino")  # the logger setup_logging configures

# Parameters that live before the first block: layer id 0.
_STEM_COMPONENTS = {"pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens"}
# Containers of the blocks: "blocks" (ViT, MV_Hybrid's blocks.blocks), "layers" (Vim).
_BLOCK_CONTAINERS = {"blocks", "layers"}


def _clean_name(name):
    # Wrapper components (FSDP1, checkpointing, torch.compile, DDP) dropped so names match the plain module's.
    return strip_wrappers(name)


def _find_n_blocks(model):
    """The backbone's depth: ``n_blocks`` of the model or of its first submodule that has one."""
    for module in model.modules():
        n_blocks = getattr(module, "n_blocks", None)
        if isinstance(n_blocks, int):
            return n_blocks
    return 0


def _no_weight_decay_names(model):
    """Full (prefixed) names listed by every ``no_weight_decay()`` in the module tree."""
    names = set()
    for prefix, module in model.named_modules():
        if callable(getattr(module, "no_weight_decay", None)):
            prefix = _clean_name(prefix)
            names.update(f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay())
    return names


def _layer_id(name, n_blocks):
    """0 for the stem, i + 1 for block i, n_blocks + 1 for the rest (final norm, heads).

    The block index is the last of the run of integer components that follows the first
    "blocks"/"layers" component, so ``blocks.3``, ``blocks.blocks.3`` (MV_Hybrid),
    ``layers.3`` (Vim) and DINOv2's chunked ``blocks.0.3`` all give 3.
    """
    components = name.split(".")
    if _STEM_COMPONENTS.intersection(components):
        return 0
    seen_container = False
    index = None
    for c in components:
        if index is None:
            seen_container = seen_container or c in _BLOCK_CONTAINERS
            if seen_container and c.isdigit():
                index = int(c)
        elif c.isdigit():
            index = int(c)
        else:
            break
    if index is None:
        return n_blocks + 1
    if index >= n_blocks:
        raise ValueError(f"parameter {name!r} is in block {index} but the model reports n_blocks={n_blocks}")
    return index + 1


def _lr_decay_multiplier(name, lr_decay_rate, num_layers):
    """lr multiplier ``lr_decay_rate ** (num_layers + 1 - layer_id)`` for a (clean) parameter name.

    With ``num_layers == 0`` (a module without blocks, e.g. a head) every parameter gets 1.
    """
    if num_layers == 0:
        return 1.0
    return lr_decay_rate ** (num_layers + 1 - _layer_id(name, num_layers))


def get_params_groups_with_decay(model, lr_decay_rate=1.0, patch_embed_lr_mult=1.0):
    """One dict per trainable parameter: params, name, lr_multiplier, wd_multiplier, is_last_layer.

    - lr_multiplier: layer-wise decay over the backbone's ``n_blocks`` (read from the model
      or the first submodule that has it, so a wrapper holding ``backbone.*`` works), times
      ``patch_embed_lr_mult`` for the patch embedding.
    - wd_multiplier 0 for biases, norms, LayerScale ``gamma``, any parameter with <= 1 dims,
      and anything named by a ``no_weight_decay()`` in the module tree; 1 otherwise.
    - is_last_layer for names containing ``last_layer`` (the heads' prototype layers).
    Frozen parameters (requires_grad False) are left out.
    """
    n_blocks = _find_n_blocks(model)
    no_wd = _no_weight_decay_names(model)
    no_wd_leaves = {n for n in no_wd if "." not in n}  # bare names such as "A_log" match any leaf
    all_param_groups = []
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = _clean_name(raw_name)
        d = {
            "params": param,
            "name": name,
            "is_last_layer": "last_layer" in name,
            "lr_multiplier": _lr_decay_multiplier(name, lr_decay_rate, n_blocks),
            "wd_multiplier": 1.0,
        }
        if (
            name.endswith(".bias")
            or "norm" in name
            or "gamma" in name
            or param.ndim <= 1
            or name in no_wd
            or name.rsplit(".", 1)[-1] in no_wd_leaves
        ):
            d["wd_multiplier"] = 0.0
        if "patch_embed" in name:
            d["lr_multiplier"] *= patch_embed_lr_mult
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
