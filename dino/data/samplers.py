"""Resumable infinite sampling.

The sample stream is a pure function of ``(seed, position)``: global position ``g`` reads
dataset index ``perm_e[g mod N]`` where ``e = g div N`` and ``perm_e`` is a permutation seeded by
``(seed, e)``. Rank ``r`` of ``W`` takes positions ``r, r+W, r+2W, ...``. Resuming after ``k`` samples
per rank (``start = iteration * batch_size_per_gpu``) jumps straight there, without iterating the
consumed samples (this fixes the TODO in DINOv2's ``do_train``).

The sampler yields ``(position, index)`` pairs so that :class:`dino.data.loaders.SeededSampleDataset`
can seed each sample's augmentation from its global position, independently of worker scheduling.
"""
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Sampler


def mix_seed(*values: int) -> int:
    """A well-spread 64-bit seed from a tuple of non-negative integers."""
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 32 | int(state[1])) & (2**63 - 1)


class ShardedInfiniteSampler(Sampler):
    """Infinite, sharded, resumable; yields ``(global_position, dataset_index)``."""

    def __init__(
        self,
        sample_count: int,
        shuffle: bool = True,
        seed: int = 0,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if sample_count <= 0:
            raise ValueError(f"cannot sample from an empty dataset (sample_count={sample_count})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.sample_count = sample_count
        self.shuffle = shuffle
        self.seed = seed
        self.start = start
        self.rank = rank
        self.world_size = world_size
        self._perm_epoch: Optional[int] = None
        self._perm: Optional[torch.Tensor] = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            self._perm = torch.randperm(self.sample_count, generator=g)
            self._perm_epoch = epoch
        return self._perm

    def index_at(self, position: int) -> int:
        """Dataset index read at global stream ``position``."""
        epoch, offset = divmod(position, self.sample_count)
        if not self.shuffle:
            return offset
        return int(self._permutation(epoch)[offset])

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        k = self.start
        while True:
            g = k * self.world_size + self.rank
            yield g, self.index_at(g)
            k += 1
