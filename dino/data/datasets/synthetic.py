"""The built-in synthetic H&E dataset: patches rendered on the fly, no files, no network."""
from __future__ import annotations

from typing import Callable

from PIL import Image
from torch.utils.data import Dataset

from ..synthetic_tissue import CLASS_NAMES, SyntheticTissue


class SyntheticDataset(Dataset):
    """``length`` deterministic synthetic H&E patches; items are ``(PIL RGB image, class label)``.

    Item ``i`` is patch ``i`` of :class:`~dino.data.synthetic_tissue.SyntheticTissue` with the same
    seed: the same on every run, in every worker. Labels cycle through the classes and studies, so
    any contiguous block of indices is balanced.
    """

    def __init__(
        self,
        length: int = 10000,
        seed: int = 0,
        image_size: int = 256,
        n_studies: int = 4,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
    ):
        if int(length) < 1:
            raise ValueError(f"SyntheticDataset: length must be >= 1, got {length}")
        self.length = int(length)
        self.generator = SyntheticTissue(seed=seed, n_studies=n_studies, image_size=image_size)
        self.transform = transform
        self.target_transform = target_transform

    @property
    def classes(self) -> tuple[str, ...]:
        return CLASS_NAMES

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for SyntheticDataset of length {self.length}")
        patch = self.generator.patch(index % self.length)
        image, target = Image.fromarray(patch.image, "RGB"), patch.label
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __repr__(self) -> str:
        g = self.generator
        return f"SyntheticDataset(length={self.length}, seed={g.seed}, image_size={g.image_size}, n_studies={g.n_studies})"
