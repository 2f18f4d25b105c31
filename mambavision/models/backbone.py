"""The backbone contract shared by every model in the zoo (see DESIGN.md).

A backbone turns an image into a token sequence (patch tokens plus one CLS token, placed where
the architecture wants it), runs its blocks, and applies a final norm. This base class owns
everything the trainer and the evaluations see, so they never branch on the architecture:

* ``forward_features(x, masks=None)`` -> dict, or a list of dicts for a list of crops;
* ``forward(x, is_training=False)`` -> the eval embedding, or the dict(s) when training;
* ``get_intermediate_layers``, ``no_weight_decay`` and the attributes ``embed_dim``,
  ``num_features``, ``n_blocks``, ``patch_size``, ``mask_token``;
* ``card``: the registry's :class:`~mambavision.card.BackboneCard` (set by ``create_model``), which
  says how to pool, preprocess, group parameters for the optimiser and find the SSM layers.

Subclasses build ``patch_embed``, ``cls_token``, ``mask_token``, ``blocks`` (iterable) and
``norm``, and implement ``_add_cls_token(patch_tokens, grid_hw) -> (tokens, cls_index)``.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..card import BackboneCard
from ..layers import PatchEmbed

RECOMPILE_LIMIT = 64  # dynamo graphs per block code object under compile_blocks


class Backbone(nn.Module):
    embed_dim: int
    patch_size: int
    card: BackboneCard  # attached by create_model / load_pretrained

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_features(self) -> int:
        """Dimension of the eval embedding returned by ``forward``."""
        return self.embed_dim * (2 if self.card.pool == "cls+mean" else 1)

    @property
    def pretrained_cfg(self) -> Dict:
        """timm's name for the preprocessing the weights expect: the card's mean, std, img_size, interpolation."""
        return self.card.preprocessing()

    # -- tokens -------------------------------------------------------------------------------
    def _build_stem(self, img_size, patch_size: int, in_chans: int, embed_dim: int, pos_embed: bool) -> None:
        """Patch embedding, CLS and mask tokens, and optionally a learned position embedding with one
        slot per patch of the ``img_size`` grid plus one for the CLS token (initialised by the subclass)."""
        self.embed_dim, self.patch_size, self.img_size = embed_dim, patch_size, img_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

    def token_parameters(self) -> List[nn.Parameter]:
        """The stem's learned tokens: CLS, mask and (if any) the position embedding."""
        return [self.cls_token, self.mask_token] + ([self.pos_embed] if hasattr(self, "pos_embed") else [])

    def _add_cls_token(self, x: torch.Tensor, grid_hw: Tuple[int, int]) -> Tuple[torch.Tensor, int]:
        raise NotImplementedError

    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: Optional[torch.Tensor] = None):
        """Patch-embed ``x``, put ``mask_token`` at masked positions, add the CLS token.

        Returns ``(tokens (B, L, D), cls_index)``. Masking happens before the CLS token is
        inserted, so ``masks`` is (B, N) on the raster-ordered patch grid.
        """
        H, W = x.shape[-2:]
        grid_hw = (H // self.patch_size, W // self.patch_size)
        tokens = self.patch_embed(x)
        if masks is not None:
            if masks.shape != tokens.shape[:2]:
                raise ValueError(f"masks has shape {tuple(masks.shape)}, expected {tuple(tokens.shape[:2])}")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        return self._add_cls_token(tokens, grid_hw)

    @staticmethod
    def _split(h: torch.Tensor, cls_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return h[:, cls_index], torch.cat([h[:, :cls_index], h[:, cls_index + 1 :]], dim=1)

    # -- forward ------------------------------------------------------------------------------
    def _forward_single(self, x: torch.Tensor, masks: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        h, cls_index = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            h = blk(h)
        h_norm = self.norm(h)
        cls, patches = self._split(h_norm, cls_index)
        return {"x_norm_clstoken": cls, "x_norm_patchtokens": patches, "x_prenorm": h, "masks": masks}

    def forward_features(self, x, masks=None):
        if isinstance(x, (list, tuple)):
            masks = list(masks) if masks is not None else [None] * len(x)
            if len(masks) != len(x):
                raise ValueError(f"got {len(x)} crop batches but {len(masks)} masks")
            return [self._forward_single(xi, mi) for xi, mi in zip(x, masks)]
        return self._forward_single(x, masks)

    def compile_blocks(self, **compile_kwargs) -> None:
        """``torch.compile`` each block in place (as dinov3 does): fuses the elementwise work and the
        layout copies around the mixers and cuts launch overhead; custom kernels stay graph breaks.

        Static shapes by default: DINOv2 feeds two crop sizes, and inductor's matmul padding pass
        fails on the symbolic shapes that a dynamic recompile would bring (torch 2.11, H200).
        """
        compile_kwargs.setdefault("dynamic", False)
        # All blocks share one code object (MixerBlock.forward), and each (mixer type, crop size, grad mode)
        # is a graph of its own: a hybrid's step needs 6, close to dynamo's default budget of 8 per code
        # object, past which it silently runs the block in eager. Leave room for evaluation at other sizes.
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        for blk in self.blocks:
            blk.compile(**compile_kwargs)

    def pool(self, out: Dict[str, torch.Tensor], mode: Optional[str] = None) -> torch.Tensor:
        """The embedding from a ``forward_features`` dict: ``mode`` "cls", "mean" (mean patch token) or
        "cls+mean"; by default the card's eval pooling."""
        mode = mode or self.card.pool
        cls = out["x_norm_clstoken"]
        if mode == "cls":
            return cls
        mean = out["x_norm_patchtokens"].mean(dim=1)
        if mode == "mean":
            return mean
        if mode == "cls+mean":
            return torch.cat([cls, mean], dim=-1)
        raise ValueError(f"unknown pooling {mode!r}; choose from 'cls', 'mean', 'cls+mean'")

    def forward(self, x, masks=None, is_training: bool = False):
        out = self.forward_features(x, masks)
        if is_training:
            return out
        return [self.pool(o) for o in out] if isinstance(out, list) else self.pool(out)

    # -- DINOv2 helpers -----------------------------------------------------------------------
    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: Union[int, Sequence[int]] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ):
        """Outputs of the last ``n`` blocks (or of the blocks indexed by ``n``), as in DINOv2."""
        h, cls_index = self.prepare_tokens_with_masks(x)
        total = self.n_blocks
        wanted = set(range(total - n, total)) if isinstance(n, int) else {i % total for i in n}
        if isinstance(n, int) and not 0 < n <= total:
            raise ValueError(f"n={n} must be in [1, {total}]")
        outputs: List[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            h = blk(h)
            if i in wanted:
                outputs.append(h)
        if norm:
            outputs = [self.norm(o) for o in outputs]
        split = [self._split(o, cls_index) for o in outputs]
        cls_tokens = [c for c, _ in split]
        patches = [p for _, p in split]
        if reshape:
            B, _, H, W = x.shape
            gh, gw = H // self.patch_size, W // self.patch_size
            patches = [p.reshape(B, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, cls_tokens))
        return tuple(patches)

    def no_weight_decay(self) -> set:
        """Names of the parameters that get no weight decay, as the card declares them (timm's method)."""
        return self.card.no_weight_decay(self)
