"""Training image datasets: a folder of images, the synthetic H&E demo data, WSI coordinates.

``WSICoordsDataset`` needs OpenSlide, so it is imported only when first asked for; a missing
optional dependency then breaks that one dataset, never ``import dino.data.datasets``.
"""
from .folder import IMG_EXTENSIONS, ImageFolderDataset
from .synthetic import SyntheticDataset

__all__ = ["IMG_EXTENSIONS", "ImageFolderDataset", "SyntheticDataset", "WSICoordsDataset"]


def __getattr__(name: str):
    if name == "WSICoordsDataset":
        from .wsi_coords import WSICoordsDataset

        return WSICoordsDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
