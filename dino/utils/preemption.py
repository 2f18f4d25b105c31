"""Pre-emption: save a resumable checkpoint when SLURM says the job must stop, and requeue it.

This is the one requeue path of both launchers. SLURM warns a job shortly before its time limit:
``dino/Train_MVHybrid_DINOv2_SLURM.sh`` receives ``USR1`` and forwards it to the training tasks;
submitit's jobs (``python -m dino.run.train``) get ``USR2``. On either, the trainer finishes the
current iteration, saves a checkpoint on every rank and returns; only then, and only inside a SLURM
job, rank 0 puts the job back in the queue (``scontrol requeue``), and the requeued job resumes from the
output directory. ``SIGTERM`` (``scancel``, a node shutting down, SLURM's own pre-emption, which
requeues by itself) saves and exits without requeueing. A trainer that fails is never requeued.
"""
import logging
import os
import signal
import subprocess
import threading
from typing import Dict, Optional

logger = logging.getLogger("dino")

REQUEUE_SIGNALS = ("SIGUSR1", "SIGUSR2")  # the time-limit warnings: save, then requeue
PREEMPTION_SIGNALS = REQUEUE_SIGNALS + ("SIGTERM",)  # every signal that makes the trainer save and stop

_STOP = threading.Event()
_REQUEUE = threading.Event()


def request_preemption(requeue: bool = False) -> None:
    """Ask the running training loop to save a resumable checkpoint after the current iteration and return;
    with ``requeue``, the SLURM job is then requeued."""
    if requeue:
        _REQUEUE.set()
    _STOP.set()


def preemption_requested() -> bool:
    return _STOP.is_set()


def requeue_requested() -> bool:
    return _REQUEUE.is_set()


def clear() -> None:
    _STOP.clear()
    _REQUEUE.clear()


def _on_signal(signum, frame) -> None:
    request_preemption(requeue=signal.Signals(signum).name in REQUEUE_SIGNALS)


def install_handlers() -> Dict[int, object]:
    """Route the pre-emption signals to :func:`request_preemption`; returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for name in PREEMPTION_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            previous[sig] = signal.signal(sig, _on_signal)
    return previous


def restore_handlers(previous: Dict[int, object]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def is_requeued_run() -> bool:
    """True in a SLURM job that has been requeued (the new start of a pre-empted job)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def requeue_slurm_job() -> Optional[str]:
    """``scontrol requeue`` this SLURM job (SLURM then stops it and starts it again); None outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        logger.warning("pre-emption checkpoint saved; not in a SLURM job, so nothing to requeue")
        return None
    # Logged first: once the requeue is accepted SLURM ends this job, often before another line is written.
    logger.warning("requeueing SLURM job %s; the new start resumes from the saved checkpoint", job)
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"scontrol requeue {job} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}; "
                           "the checkpoint is saved, resubmit the same command to resume")
    return job
