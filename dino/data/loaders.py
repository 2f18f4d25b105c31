"""Datasets from a string, and the deterministic, resumable training data loader.

Dataset strings (``train.dataset_path``)::

    Folder:root=PATH[:key=value...]                  -> ImageFolderDataset
    Synthetic[:length=N][:seed=S][:image_size=P]     -> SyntheticDataset
    WSICoords:slides=DIR:coords=DIR[:key=value...]   -> WSICoordsDataset

Determinism: every sample's augmentation is drawn from RNGs seeded by ``(seed, global position)``
and every batch's iBOT masks from RNGs seeded by ``(seed, position of its first sample)``, so the
batches depend neither on the number of workers nor on their scheduling, and a resumed run reads
exactly the batches an uninterrupted run would. An unreadable sample is replaced by a substitute
drawn from ``(seed, position)`` (see :mod:`dino.data.unreadable`), which keeps that property.

DataLoader workers ignore the pre-emption signals (SIGTERM, SIGUSR1, SIGUSR2): a scheduler signals
the whole process group, and only the main process must react (save, then shut the workers down).
"""
import contextlib
import inspect
import logging
import random
import signal
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dino.utils.preemption import PREEMPTION_SIGNALS

from .samplers import ShardedInfiniteSampler, mix_seed
from .unreadable import UnreadableSampleError

logger = logging.getLogger("dino")

_SAMPLE_TAG, _COLLATE_TAG, _SUBSTITUTE_TAG = 1, 2, 3
MAX_SUBSTITUTE_ATTEMPTS = 100  # this many unreadable reads for one sample: the data set, not a file, is broken


def _dataset_classes() -> Dict[str, Callable[[], type]]:
    # Imported lazily so that one missing optional dependency (e.g. openslide) breaks only its kind.
    def folder():
        from .datasets import ImageFolderDataset

        return ImageFolderDataset

    def synthetic():
        from .datasets import SyntheticDataset

        return SyntheticDataset

    def wsi():
        from .datasets import WSICoordsDataset

        return WSICoordsDataset

    return {"Folder": folder, "Synthetic": synthetic, "WSICoords": wsi}


def _convert(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def parse_dataset_str(dataset_str: str) -> Tuple[str, Dict[str, Any]]:
    """``"Kind:k=v:k=v"`` -> ``("Kind", {k: v})``, with int/float/bool values converted."""
    if not dataset_str or not dataset_str.strip():
        raise ValueError("empty dataset string; e.g. 'Folder:root=/data/patches' or 'Synthetic:length=1000'")
    kind, *tokens = dataset_str.strip().split(":")
    kwargs: Dict[str, Any] = {}
    for tok in tokens:
        if "=" not in tok:
            raise ValueError(f"dataset string {dataset_str!r}: {tok!r} is not key=value")
        k, v = tok.split("=", 1)
        if k in kwargs:
            raise ValueError(f"dataset string {dataset_str!r}: key {k!r} given twice")
        kwargs[k] = _convert(v)
    return kind, kwargs


def make_dataset(dataset_str: str, transform: Optional[Callable] = None) -> Dataset:
    """Build the dataset named by ``dataset_str`` (see the module docstring)."""
    kind, kwargs = parse_dataset_str(dataset_str)
    classes = _dataset_classes()
    if kind not in classes:
        raise ValueError(f"unknown dataset kind {kind!r} in {dataset_str!r}; known: {', '.join(classes)}")
    cls = classes[kind]()
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p not in ("self", "transform", "target_transform")]
    takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in accepted]
    if unknown and not takes_var_kw:
        raise ValueError(f"unknown key(s) {unknown} for dataset {kind!r}; accepted: {', '.join(accepted)}")
    if "transform" in params:
        kwargs["transform"] = transform
    dataset = cls(**kwargs)
    logger.info("dataset %s: %d samples", dataset_str, len(dataset))
    return dataset


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """Seed python ``random``, numpy and torch (CPU) for the block, then restore their states.

    Transforms draw from these global RNGs; restoring them keeps the caller's streams untouched
    (with ``num_workers=0`` the caller is the training process).
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    torch_state = torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.random.set_rng_state(torch_state)


class SeededSampleDataset(Dataset):
    """Reads ``(position, index)`` items from :class:`ShardedInfiniteSampler`; seeds per position.

    Returns ``(sample, position, unreadable)``; ``sample`` is what the wrapped dataset returns, as
    an ``(image, target)`` pair (a bare image gets an empty target, as DINOv2's collate expects), and
    ``unreadable`` counts the unreadable items it met (and replaced) on the way.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self._bad: set = set()  # per process; readability is a property of the file, so skipping is exact

    def __len__(self) -> int:
        return len(self.dataset)

    def substitute_index(self, position: int, attempt: int) -> int:
        return mix_seed(self.seed, position, _SUBSTITUTE_TAG, attempt) % len(self.dataset)

    def __getitem__(self, item: Tuple[int, int]):
        position, index = item
        unreadable, first_error = 0, None
        for attempt in range(MAX_SUBSTITUTE_ATTEMPTS):
            i = index if attempt == 0 else self.substitute_index(position, attempt)
            if i in self._bad:
                unreadable += 1
                continue
            try:
                # Re-seeded per attempt: the substitute's augmentation does not depend on the failure.
                with seeded_rngs(mix_seed(self.seed, position, _SAMPLE_TAG)):
                    sample = self.dataset[i]
            except UnreadableSampleError as err:
                self._bad.add(i)
                unreadable += 1
                first_error = first_error or err
                logger.warning("skipping unreadable sample %d (%s); replaced by a substitute", i, err)
                continue
            if not isinstance(sample, tuple):
                sample = (sample, ())
            return sample, position, unreadable
        raise UnreadableSampleError(f"{MAX_SUBSTITUTE_ATTEMPTS} unreadable samples in a row for position {position}, "
                                    f"e.g. {first_error}; the data set looks broken")


class SeededCollate:
    """Calls ``collate_fn`` under RNGs seeded by the batch's first global position (iBOT masks)."""

    def __init__(self, collate_fn: Callable, seed: int):
        self.collate_fn = collate_fn
        self.seed = seed

    def __call__(self, batch: List[Tuple[Any, int, int]]):
        samples = [s for s, _, _ in batch]
        positions = [p for _, p, _ in batch]
        with seeded_rngs(mix_seed(self.seed, positions[0], _COLLATE_TAG)):
            out = self.collate_fn(samples)
        if isinstance(out, dict):
            out["positions"] = torch.tensor(positions, dtype=torch.long)
            out["unreadable"] = torch.tensor(sum(u for _, _, u in batch), dtype=torch.long)
        return out


def ignore_preemption_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: leave pre-emption to the main process. (torch's worker SIGTERM
    handler would kill the worker and crash the loader.) A worker still ends through the loader's
    shutdown, or by itself once the main process is gone."""
    for name in PREEMPTION_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


def make_data_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    num_workers: int = 0,
    seed: int = 0,
    start_iteration: int = 0,
    shuffle: bool = True,
    rank: int = 0,
    world_size: int = 1,
    collate_fn: Optional[Callable] = None,
    pin_memory: bool = False,
) -> DataLoader:
    """An infinite loader whose ``i``-th batch (counting from 0 at the start of training) is a pure
    function of ``(seed, i, rank, world_size, batch_size)``; it starts at ``start_iteration``."""
    if len(dataset) < batch_size * world_size:
        logger.warning("dataset has %d samples, fewer than one global batch (%d)", len(dataset), batch_size * world_size)
    sampler = ShardedInfiniteSampler(
        len(dataset), shuffle=shuffle, seed=seed, start=start_iteration * batch_size, rank=rank, world_size=world_size
    )
    collate = SeededCollate(collate_fn or torch.utils.data.default_collate, seed)
    return DataLoader(
        SeededSampleDataset(dataset, seed),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
        worker_init_fn=ignore_preemption_signals if num_workers > 0 else None,
        # A private generator: the loader must not draw from the global torch RNG, whose state is
        # checkpointed (the per-sample seeding above makes worker seeds irrelevant).
        generator=torch.Generator().manual_seed(seed),
    )
