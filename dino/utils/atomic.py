"""Temporary paths for atomic writes (write there, then ``os.replace``).

``tempfile.mkstemp`` / ``mkdtemp`` create private files (0600) and folders (0700); after the rename
the results would be unreadable to the rest of a lab's group on a shared cluster. These helpers
give the temporary path the permissions a plain ``open()`` / ``mkdir()`` would (``0o666`` /
``0o777`` minus the umask).
"""
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_temp_path(path) -> str:
    """A new empty file next to ``path`` (same file system, so ``os.replace`` is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return tmp


def atomic_temp_dir(path) -> Path:
    """A new empty folder next to ``path``, to be filled and then renamed onto it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp
