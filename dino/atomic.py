"""Atomic file writes, shared by the trainer, the data tools and the evaluations.

Every output is written to a temporary file next to its final path (same file system) and
``os.replace``-d onto it, so a reader, or a run killed half way, never sees a partial file.

``tempfile.mkstemp`` / ``mkdtemp`` create private files (0600) and folders (0700); after the rename
the results would be unreadable to the rest of a lab's group on a shared cluster. These helpers
give the temporary path the permissions a plain ``open()`` / ``mkdir()`` would (``0o666`` /
``0o777`` minus the umask). Temporary names are ``.<name>.<random>.tmp`` (files) and
``.<name>.tmp-<random>`` (folders), which ``dino.utils.run_dir`` recognises as leftovers.

This module depends on the standard library only, so ``eval`` and ``scripts`` use it without
pulling in the trainer (``dino.utils``).
"""
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_temp_path", "atomic_temp_dir", "atomic_write"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_temp_path(path) -> str:
    """A new empty file next to ``path`` (same file system, so ``os.replace`` is atomic)."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return tmp


def atomic_temp_dir(path) -> Path:
    """A new empty folder next to ``path``, to be filled and then renamed onto it."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


@contextmanager
def atomic_write(path, fsync: bool = False) -> Iterator[str]:
    """Yield a temporary path to write; on a clean exit it replaces ``path``, on an error it is removed.

    ``fsync=True`` flushes the file to disk before the rename and the folder after it (checkpoints,
    configs, histories: after a power loss the name then points at the old or the new data, whole).
    """
    tmp = atomic_temp_path(path)
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
        if fsync:
            try:
                _fsync(os.path.dirname(tmp))
            except OSError:  # some file systems cannot fsync a folder; the rename is still atomic
                pass
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
