"""submitit plumbing shared by the ``dino.run`` launchers: cluster arguments, executor, submission.

The SLURM job runs one task per GPU (``tasks_per_node = gpus per node``); each task reads its
rank from :class:`submitit.JobEnvironment`. submitit asks SLURM to send ``USR2`` to the tasks
``--slurm-signal-delay-s`` seconds before the time limit; the trainer then saves and requeues the
job itself (:mod:`dino.utils.preemption`, as under the sbatch script), so the job requeues for as long
as it is stopped by its time limit.
"""
import argparse
import logging
import os
import shutil
from pathlib import Path
from typing import List, Optional

logger = logging.getLogger("dino")


def get_args_parser(parents: Optional[List[argparse.ArgumentParser]] = None, add_help: bool = True) -> argparse.ArgumentParser:
    """Cluster arguments; ``parents`` adds the launched program's own arguments."""
    p = argparse.ArgumentParser("python -m dino.run.train", parents=parents or [], add_help=add_help)
    p.add_argument("--nodes", type=int, default=1, help="number of nodes")
    p.add_argument("--ngpus", "--gpus-per-node", dest="ngpus", type=int, default=8, help="GPUs (= tasks) per node")
    p.add_argument("--cpus-per-task", type=int, default=10, help="CPU cores per task (data loading workers)")
    p.add_argument("--mem-gb", type=int, default=None, help="memory per node in GB (default: the partition's)")
    p.add_argument("--timeout", type=int, default=2800, help="job time limit in minutes; the job requeues itself")
    p.add_argument("--partition", default=os.environ.get("SLURM_PARTITION"), help="SLURM partition")
    p.add_argument("--account", default=None, help="SLURM account")
    p.add_argument("--qos", default=None, help="SLURM quality of service")
    p.add_argument("--constraint", default=None, help="SLURM node constraint, e.g. a100")
    p.add_argument("--exclude", default=None, help="nodes to exclude")
    p.add_argument("--comment", default=None, help="SLURM comment")
    p.add_argument("--slurm-signal-delay-s", type=int, default=120,
                   help="seconds before the time limit at which the tasks get the checkpoint signal")
    p.add_argument("--job-dir", default=None, help="submitit logs and pickles (default: <output-dir>/submitit/%%j)")
    p.add_argument("--job-name", default="dinov2", help="SLURM job name")
    p.add_argument("--local", action="store_true", help="run on this machine through submitit.LocalExecutor")
    return p


def tasks_per_node(args) -> int:
    """One task per GPU; at least one (CPU-only local runs)."""
    return max(1, int(args.ngpus))


def build_executor(args, folder):
    """A submitit executor configured from ``args`` (SLURM through AutoExecutor, or local)."""
    import submitit

    folder = str(folder)
    if args.local:
        if args.nodes != 1:
            raise ValueError(f"--local runs on one node, got --nodes {args.nodes}")
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=args.timeout, tasks_per_node=tasks_per_node(args),
                                   gpus_per_node=max(0, args.ngpus), signal_delay_s=args.slurm_signal_delay_s)
        return executor
    if shutil.which("srun") is None:
        raise RuntimeError("no 'srun' on PATH: submit from a SLURM login node, or pass --local to run here")
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    extra = {k: v for k, v in (("account", args.account), ("qos", args.qos), ("exclude", args.exclude)) if v}
    params = dict(
        name=args.job_name,
        nodes=args.nodes,
        tasks_per_node=tasks_per_node(args),
        gpus_per_node=args.ngpus,
        cpus_per_task=args.cpus_per_task,
        timeout_min=args.timeout,
        slurm_signal_delay_s=args.slurm_signal_delay_s,
        slurm_additional_parameters=extra,
    )
    if args.mem_gb is not None:
        params["mem_gb"] = args.mem_gb
    if args.partition:
        params["slurm_partition"] = args.partition
    if args.constraint:
        params["slurm_constraint"] = args.constraint
    if args.comment:
        params["slurm_comment"] = args.comment
    executor.update_parameters(**params)
    return executor


def default_job_dir(output_dir) -> Path:
    return Path(output_dir) / "submitit" / "%j"


def submit(task, args, output_dir):
    """Submit the callable ``task``; returns the submitit job."""
    folder = Path(args.job_dir) if args.job_dir else default_job_dir(output_dir)
    executor = build_executor(args, folder)
    job = executor.submit(task)
    logger.info("submitted job %s (logs: %s)", job.job_id, str(folder).replace("%j", str(job.job_id)))
    print(f"Submitted job_id: {job.job_id}")
    print(f"Logs and checkpoints: {output_dir}; submitit files: {str(folder).replace('%j', str(job.job_id))}")
    return job
