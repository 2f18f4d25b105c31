"""Block-wise patch masking for iBOT (BEiT, Bao et al. 2022; as used by DINOv2).

All randomness comes from Python's global ``random`` module, as upstream: the data loader
seeds it (per batch, see ``dino.data.loaders``), which makes the masks reproducible.
"""

import math
import random

import numpy as np


class MaskingGenerator:
    """Draws a boolean (H, W) mask made of random rectangles.

    Args:
        input_size: patch-grid size, an int (square) or (H, W).
        num_masking_patches: default budget, kept for DINOv2 compatibility (``__call__``
            takes the budget per call).
        min_num_patches: smallest rectangle area tried.
        max_num_patches: largest area added by one rectangle (default: num_masking_patches).
        min_aspect, max_aspect: log-uniform rectangle aspect range (max defaults to 1/min).
    """

    def __init__(
        self,
        input_size,
        num_masking_patches=None,
        min_num_patches=4,
        max_num_patches=None,
        min_aspect=0.3,
        max_aspect=None,
    ):
        if not isinstance(input_size, (tuple, list)):
            input_size = (input_size,) * 2
        self.height, self.width = (int(s) for s in input_size)
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"MaskingGenerator: input_size must be positive, got {input_size!r}")
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        if self.max_num_patches is None:
            raise ValueError("MaskingGenerator: give max_num_patches (or num_masking_patches)")
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self):
        return (
            f"MaskingGenerator({self.height}x{self.width}, block area [{self.min_num_patches}, "
            f"{self.max_num_patches}], log-aspect [{self.log_aspect_ratio[0]:.3f}, {self.log_aspect_ratio[1]:.3f}])"
        )

    def get_shape(self):
        return self.height, self.width

    def _mask(self, mask, max_mask_patches):
        """Add one rectangle of at most ``max_mask_patches`` new cells; return how many were added."""
        delta = 0
        for _attempt in range(10):
            target_area = random.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            # Strict inequality as upstream: a block never spans a whole row or column.
            if w < self.width and h < self.height:
                top = random.randint(0, self.height - h)
                left = random.randint(0, self.width - w)
                block = mask[top : top + h, left : left + w]
                new_cells = h * w - int(block.sum())
                if 0 < new_cells <= max_mask_patches:
                    block[...] = True
                    delta += new_cells
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches=0):
        """A bool (H, W) mask with at most ``num_masking_patches`` True cells (fewer if blocks stop fitting)."""
        mask = np.zeros(shape=self.get_shape(), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            mask_count += delta
        return mask
