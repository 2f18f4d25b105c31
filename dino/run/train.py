"""Submit DINOv2 training through submitit; at the time limit the trainer saves and requeues the job.

    python -m dino.run.train --nodes 3 --ngpus 8 --partition gpu --timeout 2800 \
        --config-file configs/train/mv_hybrid.yaml --output-dir /scratch/me/mv_hybrid \
        train.dataset_path=WSICoords:slides=/data/slides:coords=/data/patches/coords

``key=value`` overrides come last (everything after the first one goes to the trainer).
``--local`` runs the same callable on this machine with ``submitit.LocalExecutor``.
"""
import logging
import os
import sys
from typing import List, Optional

from dino import distributed
from dino.run.submit import get_args_parser, submit
from dino.train.train import get_args_parser as get_train_args_parser

logger = logging.getLogger("dino")


class Trainer:
    """The submitit callable: one instance per task, run again as-is when the job is requeued.

    ``train_argv`` is the argument list of ``python -m dino.train``. Requeueing is the trainer's own
    (:mod:`dino.utils.preemption`, the same path as the sbatch script's): submitit's ``USR2`` before the
    time limit makes every rank save, then rank 0 requeues the job, and the requeued job resumes from
    ``--output-dir`` (a requeued run ignores ``--no-resume``).
    """

    def __init__(self, train_argv: List[str]):
        self.train_argv = list(train_argv)

    def __call__(self):
        import submitit

        from dino.train import train as train_mod

        self._setup_env(submitit.JobEnvironment())
        # The trainer takes USR2 over from submitit's handler, which would requeue before the save.
        result = train_mod.main(self.train_argv)
        if result["requeued"]:
            # Leave as submitit does after requeueing: no result file, so the requeued job is still pending.
            sys.exit(0)
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
