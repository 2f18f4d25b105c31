"""A folder of image files (flat, like the paper's 755,936 PNGs, or one subfolder per class).

Listing a huge folder takes minutes on a network file system, so the sorted listing is cached
on disk and reused while no listed directory has changed (checked through directory mtimes).
The listing is held in numpy arrays rather than Python lists, so DataLoader workers that fork
from the main process share it instead of copying it page by page through refcount writes.

A file that cannot be decoded (zero bytes, truncated, not an image, over PIL's pixel limit) raises
:class:`~dino.data.unreadable.UnreadableSampleError` naming it, is remembered and counted in
``num_skipped``; the training loader replaces it by a deterministic substitute. A directory that
cannot be listed, or a symlink loop, is skipped with a warning while listing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from dino.data.unreadable import UnreadableSampleError
from dino.atomic import atomic_write

logger = logging.getLogger("dino")

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
_CACHE_VERSION = 1
# What a corrupt or hostile file raises while decoding (SyntaxError: some PIL decoders' corrupt headers).
_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def _cache_dir() -> Path:
    return Path(os.environ.get("MVHYBRID_CACHE_DIR", Path.home() / ".cache" / "mvhybrid")) / "folder_listings"


def _normalise_extensions(extensions: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(extensions, str):  # from a dataset string: "png" or ".png,.jpg"
        extensions = extensions.split(",")
    exts = tuple(sorted({("." + e.strip().lstrip(".")).lower() for e in extensions if e.strip()}))
    if not exts:
        raise ValueError("ImageFolderDataset: empty extensions")
    return exts


def _scan(root: Path, extensions: tuple[str, ...], recursive: bool) -> tuple[list[str], dict[str, int]]:
    """Sorted relative paths of image files under root, and the mtime of every directory read."""
    files: list[str] = []
    dirs: dict[str, int] = {}
    seen: set[tuple[int, int]] = set()  # (device, inode) of every directory listed: no symlink loops
    stack = [""]
    while stack:
        rel = stack.pop()
        full = root / rel if rel else root
        try:
            st = full.stat()
            if (st.st_dev, st.st_ino) in seen:
                logger.warning("ImageFolderDataset: skipping %s: a symlink back to a folder already listed", full)
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = list(os.scandir(full))
        except OSError as err:
            if not rel:
                raise
            logger.warning("ImageFolderDataset: skipping folder %s (%s)", full, err)
            continue
        dirs[rel] = st.st_mtime_ns
        for entry in entries:
            name = f"{rel}/{entry.name}" if rel else entry.name
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:  # a broken or looping link: listed as a file, reported when read
                is_dir = False
            if is_dir:
                if recursive:
                    stack.append(name)
            elif os.path.splitext(entry.name)[1].lower() in extensions:
                files.append(name)
    files.sort()
    return files, dirs


def _load_rgb(path: str) -> Image.Image:
    """Decode fully (so truncation surfaces here) and convert any mode to 8-bit RGB."""
    with Image.open(path) as img:
        img.load()
        mode = img.mode
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
            # Transparent pixels are empty glass: composite onto white, not black.
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        if mode.startswith("I") or mode == "F":
            # 16/32-bit greyscale: rescale to 8 bits rather than letting PIL clip at 255.
            arr = np.asarray(img, dtype=np.float64)
            top = 65535.0 if arr.max(initial=0) > 255 else 255.0
            if mode == "F" and arr.max(initial=0) <= 1.0:
                top = 1.0
            arr8 = np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
            return Image.fromarray(arr8).convert("RGB")
        return img.convert("RGB")


class ImageFolderDataset(Dataset):
    """Images under ``root``; items are ``(PIL RGB image, target)``.

    Args:
        root: the folder. Images may sit directly in it (target 0 for all) or in subfolders, in
            which case the target is the index of the first-level subfolder name in the sorted
            ``classes`` (files lying directly in ``root`` next to class folders get target -1).
        transform, target_transform: applied to the image and to the target.
        extensions: file extensions to include (case-insensitive), a tuple or "png,jpg".
        recursive: descend into subfolders.
        cache_listing: reuse / write the sorted listing under ``$MVHYBRID_CACHE_DIR``
            (default ``~/.cache/mvhybrid``); it is rebuilt whenever a listed directory changed.

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a directory.
        ValueError: no file with a matching extension was found.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        extensions: str | Iterable[str] = IMG_EXTENSIONS,
        recursive: bool = True,
        cache_listing: bool = True,
    ):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolderDataset: image folder not found or not a directory: {root}")
        self.transform = transform
        self.target_transform = target_transform
        self.extensions = _normalise_extensions(extensions)
        self.recursive = bool(recursive)

        files = self._cached_listing() if cache_listing else None
        if files is None:
            files, dirs = _scan(self.root, self.extensions, self.recursive)
            if cache_listing and files:
                self._write_cache(files, dirs)
        if not files:
            raise ValueError(f"ImageFolderDataset: no images with extensions {self.extensions} in {self.root}"
                             f"{' (searched recursively)' if self.recursive else ''}")

        tops = [f.split("/", 1)[0] if "/" in f else None for f in files]
        self.classes: list[str] = sorted({t for t in tops if t is not None})
        if self.classes:
            index = {c: i for i, c in enumerate(self.classes)}
            targets = [index[t] if t is not None else -1 for t in tops]
        else:
            targets = [0] * len(files)
        # Fixed-width byte arrays: shared, not copied, by forked DataLoader workers.
        self._paths = np.array([f.encode("utf-8") for f in files])
        self._targets = np.array(targets, dtype=np.int32)
        self._bad: set[int] = set()
        self.num_skipped = 0

    # -- listing cache --------------------------------------------------------------------------
    def _cache_path(self) -> Path:
        key = json.dumps([str(self.root), self.extensions, self.recursive, _CACHE_VERSION])
        return _cache_dir() / (hashlib.sha1(key.encode()).hexdigest()[:20] + ".json")

    def _cached_listing(self) -> list[str] | None:
        path = self._cache_path()
        try:
            with open(path, encoding="utf-8") as fh:
                cache = json.load(fh)
            for rel, mtime in cache["dirs"].items():
                if (self.root / rel).stat().st_mtime_ns != mtime:
                    return None
            logger.info("ImageFolderDataset: reusing the listing of %s cached in %s", self.root, path)
            return cache["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent, stale or unreadable cache: list the folder again

    def _write_cache(self, files: list[str], dirs: dict[str, int]) -> None:
        path = self._cache_path()
        try:
            with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
                json.dump({"root": str(self.root), "dirs": dirs, "files": files}, fh)
        except OSError as err:  # read-only home on a compute node: just list again next time
            logger.debug("ImageFolderDataset: could not cache the listing in %s: %s", path, err)

    # -- access ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> str:
        """Absolute path of sample ``index``."""
        return str(self.root / self._paths[index].decode("utf-8"))

    def target(self, index: int) -> int:
        return int(self._targets[index])

    def __getitem__(self, index: int):
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        path = self.path(index)
        if index in self._bad:
            raise UnreadableSampleError(f"unreadable image {path} (already reported)")
        try:
            image = _load_rgb(path)
        except _DECODE_ERRORS as err:
            self._bad.add(index)
            self.num_skipped += 1
            raise UnreadableSampleError(f"unreadable image {path} ({type(err).__name__}: {err}); "
                                        f"{self.num_skipped} in this folder so far") from err
        target = self.target(index)
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    @property
    def skipped_paths(self) -> list[str]:
        """Files found unreadable so far in this process."""
        return [self.path(i) for i in sorted(self._bad)]

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(root={str(self.root)!r}, n={len(self)}, classes={len(self.classes)}, "
                f"skipped={self.num_skipped})")
