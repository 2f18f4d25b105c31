"""Write an RGB array as a tiled, pyramidal TIFF that OpenSlide reads as a slide.

Useful to turn a large image (a synthetic slide, a stitched scan, a test fixture) into
something the patching pipeline and :class:`WSICoordsDataset` accept. OpenSlide's
generic-tiff reader needs every level tiled; it takes the microns per pixel from the TIFF
resolution tags (centimetre units).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dino.atomic import atomic_write


def write_pyramidal_tiff(path, rgb: np.ndarray, mpp: float | None = 0.5, tile: int = 256, n_levels: int = 3,
                         compression: str = "zlib"):
    """Write ``rgb`` (H, W, 3) uint8 with ``n_levels`` levels, each half the size of the previous.

    Downsampling averages 2x2 blocks. The file is written atomically. Returns the path.
    """
    import tifffile

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    if tile % 16:
        raise ValueError(f"TIFF tiles must be a multiple of 16 px, got {tile}")
    path = Path(path)
    with atomic_write(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as tw:
            level = rgb
            for i in range(n_levels):
                kwargs = {}
                if mpp:
                    px_per_cm = 1e4 / (mpp * 2**i)
                    kwargs = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
                tw.write(level, tile=(tile, tile), photometric="rgb", compression=compression,
                         subfiletype=0 if i == 0 else 1, **kwargs)
                h, w = (level.shape[0] // 2) * 2, (level.shape[1] // 2) * 2
                if h < 2 or w < 2:
                    break
                level = level[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    return path
