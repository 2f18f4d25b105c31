"""Per-iteration schedules (lr, weight decay, teacher momentum and temperature), as in DINOv2."""

import math

import numpy as np


class CosineScheduler:
    """A precomputed schedule: ``freeze_iters`` zeros, a linear warmup, then a cosine decay.

    ``scheduler[it]`` gives the value at iteration ``it``; past ``total_iters`` it gives
    ``final_value``. The warmup ramps from ``start_warmup_value`` to ``base_value`` over
    ``warmup_iters`` iterations, both ends included; the cosine then goes from
    ``base_value`` towards ``final_value`` over the remaining iterations. ``schedule`` is a
    writable numpy array (the trainer zeroes the last-layer lr during its freeze).

    DINOv2 builds the teacher temperature "linear warmup then constant" as
    ``CosineScheduler(base_value=t, final_value=t, total_iters=W, warmup_iters=W,
    start_warmup_value=t0)``: the cosine part is empty and ``final_value`` follows.
    """

    def __init__(self, base_value, final_value, total_iters, warmup_iters=0, start_warmup_value=0, freeze_iters=0):
        if min(total_iters, warmup_iters, freeze_iters) < 0:
            raise ValueError(
                f"CosineScheduler: iteration counts must be >= 0, got total_iters={total_iters}, "
                f"warmup_iters={warmup_iters}, freeze_iters={freeze_iters}"
            )
        n_cosine = total_iters - warmup_iters - freeze_iters
        if n_cosine < 0:
            raise ValueError(
                f"CosineScheduler: warmup_iters ({warmup_iters}) + freeze_iters ({freeze_iters}) "
                f"exceed total_iters ({total_iters})"
            )
        self.final_value = final_value
        self.total_iters = total_iters

        freeze = np.zeros(freeze_iters)
        warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
        progress = np.arange(n_cosine) / max(n_cosine, 1)
        cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(math.pi * progress))
        self.schedule = np.concatenate((freeze, warmup, cosine))

    def __getitem__(self, it):
        if it < 0:
            raise IndexError(f"CosineScheduler: iteration must be >= 0, got {it}")
        if it >= self.total_iters:
            return self.final_value
        return self.schedule[it]
