"""Read every patch of a patching output once, as training would, and list the unreadable ones.

Segmentation reads only a low-resolution level, so a slide with a corrupt tile at level 0 is
patched as ``done``; training would then replace (and count) that patch on every pass. This finds
such tiles beforehand: ``scripts/create_patches.py --verify`` writes ``verify.csv`` (one row per
unreadable patch: slide_id, x, y, error).
"""
from __future__ import annotations

import csv
from pathlib import Path

from dino.data.unreadable import UnreadableSampleError
from dino.atomic import atomic_write

VERIFY_FIELDS = ("slide_id", "x", "y", "error")


def verify_patches(slide_dir, save_dir, progress: bool = True) -> dict:
    """Read every patch listed in ``save_dir/coords/*.h5`` from the slides under ``slide_dir``.

    Returns ``{"patches": read, "unreadable": [(slide_id, x, y, error), ...]}`` and writes
    ``save_dir/verify.csv`` atomically.
    """
    from tqdm.auto import tqdm

    from dino.data.datasets.wsi_coords import WSICoordsDataset

    ds = WSICoordsDataset(slides=slide_dir, coords=Path(save_dir) / "coords")
    bad = []
    try:
        for i in tqdm(range(len(ds)), desc="verifying patches", unit="patch", disable=not progress):
            try:
                ds[i]
            except UnreadableSampleError as err:
                path, x, y = ds.get_location(i)
                bad.append((Path(path).stem, x, y, str(err.__cause__ or err)))
    finally:
        ds.close()
    out = Path(save_dir) / "verify.csv"
    with atomic_write(out) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(VERIFY_FIELDS)
        writer.writerows(bad)
    return {"patches": len(ds), "unreadable": bad}
