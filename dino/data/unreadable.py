"""Unreadable samples: how a bad tile or image is reported, replaced and budgeted.

A dataset raises :class:`UnreadableSampleError` (naming the file, and the tile) for an item it
cannot decode. :class:`dino.data.loaders.SeededSampleDataset` logs it, remembers it, and reads a
substitute instead: an index drawn from ``(seed, position, attempt)``, so the substitute is the same
in every run and after every resume, whatever the workers did before. Each unreadable read is
counted in the batch (``batch["unreadable"]``); :class:`UnreadableBudget` stops the run with
:class:`TooManyUnreadableSamples` only when they exceed ``train.max_unreadable_fraction`` of
``max(samples read, dataset size)``: a single bad tile never stops a run, a broken data set does.
"""
import logging

logger = logging.getLogger("dino")


class UnreadableSampleError(RuntimeError):
    """One item of a dataset cannot be read; the message names the file (and location)."""


class TooManyUnreadableSamples(RuntimeError):
    """More unreadable samples than ``train.max_unreadable_fraction`` allows."""


class UnreadableBudget:
    """Running count of unreadable samples over the run (restored on resume), checked per iteration."""

    def __init__(self, max_fraction: float, dataset_size: int, global_batch_size: int, count: int = 0):
        self.max_fraction = float(max_fraction)
        self.dataset_size = int(dataset_size)
        self.global_batch_size = int(global_batch_size)
        self.count = int(count)

    def update(self, new: int, iteration: int) -> int:
        """Add ``new`` unreadable reads of ``iteration``; raise past the budget; return the total."""
        self.count += int(new)
        if new:
            read = (iteration + 1) * self.global_batch_size
            allowed = self.max_fraction * max(read, self.dataset_size)
            logger.warning("iteration %d: %d unreadable sample(s) replaced by substitutes (%d in the run, budget %.0f)",
                           iteration, new, self.count, allowed)
            if self.count > allowed:
                raise TooManyUnreadableSamples(
                    f"{self.count} unreadable samples by iteration {iteration} ({read} samples read, dataset of "
                    f"{self.dataset_size}): more than train.max_unreadable_fraction={self.max_fraction} of "
                    f"max(samples read, dataset size). The log names each bad file or tile; repair or remove them "
                    f"(scripts/create_patches.py --verify finds bad tiles), or raise train.max_unreadable_fraction"
                )
        return self.count
