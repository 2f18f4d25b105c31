"""One training per output directory: ``<output_dir>/.run.lock``.

Rank 0 holds an exclusive ``flock`` on the file for the whole run and writes into it who holds it
(host, pid, start time, SLURM job). The kernel drops the lock when the process dies, however it
dies, so a lock left by a killed run is recognised as stale (its text names a holder, but nobody
holds the lock) and taken over with a note. A second run on the same directory fails at once with
the holder's details. Linux NFS clients map ``flock`` onto NFS byte-range locks, so this also works
between nodes; where the file system has no locks at all (``ENOLCK``), a holder on this host is
checked by its pid instead.
"""
import errno
import fcntl
import json
import logging
import os
import socket
import time
from typing import Optional

from dino import distributed

logger = logging.getLogger("dino")

LOCK_NAME = ".run.lock"


class RunLockError(RuntimeError):
    """Another run holds the output directory."""


def _describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}{job}"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError) as e:
        return isinstance(e, PermissionError)  # exists, owned by someone else
    return True


class RunLock:
    """Exclusive ownership of ``output_dir`` by this process; :meth:`release` (or exit) gives it up."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_NAME)
        self._fd: Optional[int] = None

    def _read_holder(self, fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode("utf-8", "replace").strip()
        try:
            holder = json.loads(text) if text else {}
        except ValueError:
            holder = {"host": "?", "pid": "?", "started": f"? (unreadable lock text {text[:60]!r})"}
        return holder if isinstance(holder, dict) else {}

    def _busy(self, holder: dict) -> RunLockError:
        return RunLockError(
            f"output dir {self.output_dir} is in use by another training ({_describe(holder)}; lock file {self.path}). "
            "Wait for it to finish, stop it, or pass another --output-dir"
        )

    def acquire(self) -> "RunLock":
        os.makedirs(self.output_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                stale = self._read_holder(fd)
            except BlockingIOError:
                raise self._busy(self._read_holder(fd)) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                stale = self._read_holder(fd)  # no locking here: judge the recorded holder
                if stale and (stale.get("host") != socket.gethostname() or _pid_alive(stale.get("pid"))):
                    raise self._busy(stale) from None
            if stale:
                logger.warning("stale lock %s from a run that is gone (%s): taking over", self.path, _describe(stale))
            me = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(me) + "\n").encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Clear the holder text and unlock. The file stays: unlinking it would let a run that opened
        the old file and one that creates a new one both think they hold the lock."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)  # drops the flock
            self._fd = None


def lock_output_dir(output_dir: str) -> Optional[RunLock]:
    """Collective: rank 0 takes the lock; every rank raises :class:`RunLockError` if it could not."""
    lock, error = None, None
    if distributed.is_main_process():
        try:
            lock = RunLock(output_dir).acquire()
        except RunLockError as e:
            error = str(e)
    first = distributed.all_gather_object(error)[0]
    if first:
        raise RunLockError(first)
    return lock
