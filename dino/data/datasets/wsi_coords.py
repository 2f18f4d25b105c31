"""A dataset of whole-slide patches addressed by CLAM-format coordinate files.

Every (slide, coordinate) pair found in ``coords/*.h5`` is one sample; the patch is read from
the slide on the fly with OpenSlide, so no PNG export is needed. Slide handles are opened
lazily, once per process (DataLoader workers reopen after fork), and kept in a small LRU cache
so that a worker touching thousands of slides does not run out of file descriptors.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from dino.data.unreadable import UnreadableSampleError
from dino.data.wsi.patching import SLIDE_EXTENSIONS, find_slides, level_downsample, open_slide, read_coords_h5, read_patch



class WSICoordsDataset(Dataset):
    """Patches of whole-slide images listed in CLAM coords files; items are ``(PIL image, 0)``.

    Args:
        slides: folder holding the slide files (searched recursively; matched to coords files
            by file stem, i.e. ``coords/{slide_id}.h5`` <-> ``slides/**/{slide_id}.svs``).
        coords: folder of ``{slide_id}.h5`` files (dataset ``coords`` (N, 2) level-0 x, y).
        transform, target_transform: applied to the image and to the (dummy) target 0.
        patch_size: output size in px; default: the file's ``target_patch_size`` (else ``patch_size``).
        level: read at this pyramid level instead of the recorded ``patch_level``; the level-0
            footprint of each patch is kept, so only the pixel density changes.
        slide_ext: slide file extensions to consider.
        max_open_slides: open slide handles kept per process.

    The sample order is fixed (coords files sorted by slide id, coordinates in file order), so
    a seeded sampler sees the same sequence on every run.
    """

    def __init__(
        self,
        slides,
        coords,
        transform=None,
        target_transform=None,
        patch_size=None,
        level=None,
        slide_ext=SLIDE_EXTENSIONS,
        max_open_slides=64,
    ):
        self.slides_root = Path(slides)
        self.coords_root = Path(coords)
        self.transform = transform
        self.target_transform = target_transform
        self.max_open_slides = int(max_open_slides)
        if not self.slides_root.is_dir():
            raise FileNotFoundError(f"WSICoordsDataset: slide folder not found: {self.slides_root}")
        if not self.coords_root.is_dir():
            raise FileNotFoundError(f"WSICoordsDataset: coords folder not found: {self.coords_root}")
        if isinstance(slide_ext, str):
            slide_ext = tuple(e if e.startswith(".") else f".{e}" for e in slide_ext.split(","))
        exts = {e.lower() for e in slide_ext}

        coord_files = sorted(self.coords_root.glob("*.h5"))
        if not coord_files:
            raise FileNotFoundError(f"WSICoordsDataset: no .h5 coords files in {self.coords_root}")
        # The patcher's discovery: same extensions, and duplicate slide ids are an error, not a silent pick.
        slide_files = {p.stem: p for p in find_slides(self.slides_root, tuple(exts))}
        missing = [f.name for f in coord_files if f.stem not in slide_files]
        if missing:
            shown = ", ".join(missing[:20]) + (f" ... ({len(missing)} in all)" if len(missing) > 20 else "")
            raise FileNotFoundError(
                f"WSICoordsDataset: no slide with extension {sorted(exts)} under {self.slides_root} "
                f"matches these coords files: {shown}"
            )

        self.slide_paths, self.read_specs, coords_all, slide_index = [], [], [], []
        for f in coord_files:
            coords, attrs = read_coords_h5(f)
            if len(coords) == 0:
                continue
            idx = len(self.slide_paths)
            self.slide_paths.append(str(slide_files[f.stem]))
            self.read_specs.append(self._read_spec(attrs, patch_size, level, f))
            coords_all.append(coords)
            slide_index.append(np.full(len(coords), idx, dtype=np.int32))
        if not coords_all:
            raise ValueError(f"WSICoordsDataset: every coords file in {self.coords_root} is empty")
        # Flat arrays: a few bytes per sample even for millions of patches.
        self.coords = np.concatenate(coords_all).astype(np.int64)
        self.slide_index = np.concatenate(slide_index)
        self._handles = OrderedDict()
        self._pid = os.getpid()

    @staticmethod
    def _read_spec(attrs, patch_size, level, path):
        """(level, read size at that level or None, output size, level-0 footprint) of one file."""
        rec_level, rec_size = int(attrs["patch_level"]), int(attrs["patch_size"])
        out = int(patch_size) if patch_size is not None else int(attrs.get("target_patch_size", rec_size))
        if level is None or int(level) == rec_level:
            return (rec_level, rec_size, out, None)
        if "level0_patch_size" in attrs:
            level0 = int(attrs["level0_patch_size"])
        elif "downsample" in attrs:
            level0 = int(round(rec_size * float(np.atleast_1d(attrs["downsample"])[0])))
        else:
            raise KeyError(f"{path}: cannot change the read level without 'level0_patch_size' or 'downsample'")
        # The read size at the new level needs the slide's downsamples: resolved on first read.
        return (int(level), None, out, level0)

    def __len__(self):
        return len(self.coords)

    # Handles are per process: never pickle them into DataLoader workers.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    def _slide(self, idx):
        if self._pid != os.getpid():  # forked worker: the parent's handles are not ours
            self._handles = OrderedDict()
            self._pid = os.getpid()
        handle = self._handles.get(idx)
        if handle is None:
            handle = open_slide(self.slide_paths[idx])
            self._handles[idx] = handle
            while len(self._handles) > self.max_open_slides:
                self._handles.popitem(last=False)[1].close()
        else:
            self._handles.move_to_end(idx)
        return handle

    def _read_size(self, slide, slide_idx):
        level, size, out, level0 = self.read_specs[slide_idx]
        if size is None:
            if not 0 <= level < slide.level_count:
                raise ValueError(f"level {level} out of range for {self.slide_paths[slide_idx]} ({slide.level_count} levels)")
            size = max(1, int(round(level0 / level_downsample(slide, level)[0])))
            self.read_specs[slide_idx] = (level, size, out, level0)
        return size

    def get_image(self, index):
        """The PIL RGB patch for sample ``index`` (before ``transform``)."""
        s = int(self.slide_index[index])
        slide = self._slide(s)
        size = self._read_size(slide, s)
        level, _, out, _ = self.read_specs[s]
        return read_patch(slide, self.coords[index], level, size, out)

    def get_location(self, index):
        """(slide path, level-0 x, level-0 y) of sample ``index``."""
        x, y = self.coords[index]
        return self.slide_paths[int(self.slide_index[index])], int(x), int(y)

    def __getitem__(self, index):
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} patches")
        try:
            image = self.get_image(index)
        except Exception as err:
            # OpenSlide handles stay in an error state after one failed read: reopen next time.
            handle = self._handles.pop(int(self.slide_index[index]), None)
            if handle is not None:
                handle.close()
            path, x, y = self.get_location(index)
            # The loader replaces it by a substitute and counts it (dino.data.unreadable).
            raise UnreadableSampleError(f"cannot read patch {index} at ({x}, {y}) of {path}: {err}") from err
        target = 0
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def close(self):
        """Close the open slide handles of this process."""
        while self._handles:
            self._handles.popitem()[1].close()

    def __repr__(self):
        return (
            f"WSICoordsDataset(slides={str(self.slides_root)!r}, coords={str(self.coords_root)!r}, "
            f"n_slides={len(self.slide_paths)}, n_patches={len(self)})"
        )
