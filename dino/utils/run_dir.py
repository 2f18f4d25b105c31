"""Housekeeping of a training output directory, done by rank 0 while it holds the run lock.

* Temporary files of atomic writes (``.checkpoint.pth.<random>.tmp`` and the like) that a killed save
  left behind are removed at start: with the lock held, nobody else can be writing them.
* ``--no-resume`` never destroys a previous run: its files are moved to
  ``<output_dir>/previous_runs/<UTC time>/`` first.
"""
import glob
import logging
import os
import re
import shutil
import time
from typing import List, Optional

logger = logging.getLogger("dino")

# `.name.<random>.tmp` (dino.atomic, every atomic write), and `.name.tmp.<pid>` / `name.tmp` left by
# runs of earlier versions.
_TEMP = re.compile(r"\.tmp(\.\d+)?$")
# What a training writes, apart from its logs (kept in place: the new run appends to them).
RUN_ARTEFACTS = ("checkpoint.pth", "checkpoint_*.pth", "checkpoints.json", "training_metrics.json",
                 "config.yaml", "eval", "tb")
PREVIOUS_RUNS = "previous_runs"


def remove_stale_temp_files(output_dir: str) -> List[str]:
    """Delete leftover temporary files in ``output_dir`` and ``output_dir/eval/*/``; returns their paths."""
    removed, freed = [], 0
    for directory in [output_dir] + sorted(glob.glob(os.path.join(output_dir, "eval", "*"))):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            path = os.path.join(directory, name)
            if _TEMP.search(name) and os.path.isfile(path) and not os.path.islink(path):
                try:
                    size = os.path.getsize(path)
                    os.remove(path)
                except OSError as e:
                    logger.warning("cannot remove stale temporary file %s: %s", path, e)
                    continue
                removed.append(path)
                freed += size
    if removed:
        logger.warning("removed %d temporary file(s) left by killed saves (%.1f MB): %s",
                       len(removed), freed / 2**20, ", ".join(os.path.relpath(p, output_dir) for p in removed))
    return removed


def previous_run_files(output_dir: str) -> List[str]:
    found = []
    for pattern in RUN_ARTEFACTS:
        found += sorted(glob.glob(os.path.join(output_dir, pattern)))
    return found


def move_previous_run_aside(output_dir: str) -> Optional[str]:
    """Move an earlier run's files (checkpoints, metrics, config, eval/) into ``previous_runs/<time>/``;
    returns that folder, or None when there was nothing to move."""
    files = previous_run_files(output_dir)
    if not files:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = os.path.join(output_dir, PREVIOUS_RUNS, stamp)
    n = 1
    while os.path.exists(dest):  # two restarts within a second
        dest = os.path.join(output_dir, PREVIOUS_RUNS, f"{stamp}-{n}")
        n += 1
    os.makedirs(dest)
    for path in files:
        shutil.move(path, os.path.join(dest, os.path.basename(path)))
    logger.warning("--no-resume: moved the previous run's %d file(s) to %s", len(files), dest)
    return dest


def prepare_output_dir(output_dir: str, fresh: bool = False):
    """Collective, at the start of a run: lock ``output_dir`` (fails at once if another run holds it),
    remove stale temporary files and, for ``fresh`` (``--no-resume``), move the previous run aside.
    Returns the lock (rank 0) or None; release it when the run ends."""
    from dino import distributed
    from dino.utils.run_lock import lock_output_dir

    lock = lock_output_dir(output_dir)
    if lock is not None:
        remove_stale_temp_files(output_dir)
        if fresh:
            move_previous_run_aside(output_dir)
    distributed.barrier()
    return lock
