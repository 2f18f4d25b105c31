"""Submit DINOv2 training through submitit, with checkpoint-and-requeue at the time limit.

    python -m dino.run.train --nodes 3 --ngpus 8 --partition gpu --timeout 2800 \
        --config-file configs/train/mv_hybrid.yaml --output-dir /scratch/me/mv_hybrid \
        train.dataset_path=WSICoords:slides=/data/slides:coords=/data/patches/coords

``key=value`` overrides come last (everything after the first one goes to the trainer).
``--local`` runs the same callable on this machine with ``submitit.LocalExecutor``.
"""
import logging
import os
import signal
import sys
from typing import List, Optional

from dino import distributed
from dino.run.submit import get_args_parser, submit
from dino.train.train import get_args_parser as get_train_args_parser

logger = logging.getLogger("dino")


class Trainer:
    """The submitit callable: one instance per task, resubmitted as-is after a requeue.

    ``train_argv`` is the argument list of ``python -m dino.train``. The trainer resumes from
    ``--output-dir`` on its own, so the requeued job continues at the saved iteration.
    """

    def __init__(self, train_argv: List[str]):
        self.train_argv = list(train_argv)

    def __call__(self):
        import submitit

        from dino.train import train as train_mod

        self._setup_env(submitit.JobEnvironment())
        # submitit's handler for its signal (USR2 by default) calls checkpoint() and requeues
        # at once, which would kill the job before the trainer has saved. Instead, every rank
        # asks the trainer to stop; after the collective save returns, submitit's handler runs.
        sig = submitit.JobEnvironment._usr_sig()
        submitit_handler = signal.getsignal(sig)
        caught = []

        def on_signal(signum, frame):
            caught.append(signum)
            train_mod.request_preemption()

        signal.signal(sig, on_signal)
        try:
            result = train_mod.main(self.train_argv)
        finally:
            signal.signal(sig, submitit_handler)
        if result.get("preempted") and caught and callable(submitit_handler):
            submitit_handler(caught[0], None)  # rank 0: checkpoint(), requeue, exit
        return result

    @staticmethod
    def _setup_env(job_env) -> None:
        """torchrun-style variables from the submitit job environment, read by dino.distributed."""
        nodes = max(1, job_env.num_nodes)
        hosts = list(job_env.hostnames)
        os.environ.update(
            RANK=str(job_env.global_rank),
            WORLD_SIZE=str(job_env.num_tasks),
            LOCAL_RANK=str(job_env.local_rank),
            LOCAL_WORLD_SIZE=str(job_env.num_tasks // nodes),
            GROUP_RANK=str(job_env.node),
            MASTER_ADDR=hosts[0] if nodes > 1 and hosts else "127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT") or str(distributed.job_port(job_env.job_id)),
        )
        logger.info("submitit task: %s", job_env)

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on its preemption/time-out signal: make sure the trainer saves
        (a no-op if it already has), and resubmit this same callable, resuming from the
        output directory (hence without ``--no-resume``)."""
        import submitit

        from dino.train.train import request_preemption

        request_preemption()
        self.train_argv = [a for a in self.train_argv if a != "--no-resume"]
        return submitit.helpers.DelayedSubmission(self)


def train_argv_from_args(args) -> List[str]:
    """Rebuild ``python -m dino.train``'s argument list from the parsed launcher arguments."""
    argv = ["--config-file", args.config_file, "--output-dir", args.output_dir]
    if args.no_resume:
        argv.append("--no-resume")
    return argv + list(args.opts)


def main(argv: Optional[List[str]] = None):
    parser = get_args_parser(parents=[get_train_args_parser(add_help=False)])
    args = parser.parse_args(argv)
    if not args.output_dir:
        parser.error("--output-dir is required: checkpoints, logs and the requeue state live there")
    if not args.config_file:
        parser.error("--config-file is required, e.g. configs/train/mv_hybrid.yaml")
    if not os.path.isfile(args.config_file):
        parser.error(f"config file not found: {args.config_file}")
    args.output_dir = os.path.abspath(args.output_dir)
    os.makedirs(args.output_dir, exist_ok=True)
    logging.basicConfig(level=logging.INFO)
    return submit(Trainer(train_argv_from_args(args)), args, args.output_dir)


if __name__ == "__main__":
    main()
    sys.exit(0)
