"""Distributed mode from torchrun or SLURM environment variables, or a single process.

``enable()`` reads, in order of preference:

* torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
* SLURM (``srun``): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_NODEID`` and the
  first host of ``SLURM_JOB_NODELIST`` as the master address;
* neither: a single process. On CPU no process group is created; on CUDA a one-rank NCCL group
  is created, so collectives and barriers run as in a multi-GPU job (the sub-networks stay unwrapped
  there: ``dino.fsdp``).

The backend is NCCL when CUDA is available, gloo otherwise; the device is ``cuda:LOCAL_RANK``.
"""
import datetime
import logging
import os
import random
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import List, Mapping, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger("dino")

_DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


_STATE = {"env": None, "device": torch.device("cpu"), "owns_group": False}


# -- SLURM nodelist ----------------------------------------------------------------------------
def _split_top_level(s: str, sep: str = ",") -> List[str]:
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced brackets in SLURM nodelist {s!r}")
    parts.append("".join(cur))
    return [p for p in parts if p]


def parse_slurm_nodelist(nodelist: str) -> List[str]:
    """Expand a SLURM nodelist, e.g. ``"gpu[01-03,07],cpu5"`` -> gpu01, gpu02, gpu03, gpu07, cpu5.

    Zero padding of ranges is kept. Several bracket groups in one name (``a[1-2]b[3-4]``) expand
    as a cartesian product, as ``scontrol show hostnames`` does.
    """
    if not nodelist or not nodelist.strip():
        raise ValueError("empty SLURM nodelist")
    hosts: List[str] = []
    for item in _split_top_level(nodelist.strip()):
        m = re.match(r"^([^\[]*)\[([^\]]+)\](.*)$", item)
        if not m:
            hosts.append(item)
            continue
        prefix, ranges, rest = m.groups()
        suffixes = parse_slurm_nodelist(rest) if rest else [""]
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-", 1)
                if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
                    raise ValueError(f"bad range {r!r} in SLURM nodelist {nodelist!r}")
                width = len(lo)
                names = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
            else:
                names = [r]
            hosts.extend(prefix + n + s for n in names for s in suffixes)
    return hosts


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass  # no scontrol on this host: parse it ourselves
    return parse_slurm_nodelist(nodelist)[0]


# -- environment -------------------------------------------------------------------------------
def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except KeyError:
        raise RuntimeError(f"distributed launch: environment variable {key} is not set") from None
    except ValueError:
        raise RuntimeError(f"distributed launch: {key}={env[key]!r} is not an integer") from None


def job_port(job_id: str) -> int:
    """The rendezvous port for a SLURM job: the same on every task of the job, and unlikely to collide with
    another job's on a node. Array and submitit ids (``1234_5``) count all their digits, so the tasks of
    an array do not share one port."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit())
    return 20000 + (int(digits) if digits else 0) % 20000


def read_env(env: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Rank/world size/local rank/master address from torchrun or SLURM variables (pure function)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        return DistEnv(
            rank=_int(env, "RANK"),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=local_world,
            node_rank=int(env.get("GROUP_RANK", _int(env, "RANK") // max(local_world, 1))),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", _DEFAULT_PORT)),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_NODELIST" in env:
        world = _int(env, "SLURM_NTASKS")
        nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", 1)))
        return DistEnv(
            rank=_int(env, "SLURM_PROCID"),
            world_size=world,
            local_rank=_int(env, "SLURM_LOCALID"),
            local_world_size=max(world // max(nodes, 1), 1),
            node_rank=int(env.get("SLURM_NODEID", 0)),
            master_addr=env.get("MASTER_ADDR") or _first_slurm_host(env["SLURM_JOB_NODELIST"]),
            master_port=int(env.get("MASTER_PORT") or job_port(env.get("SLURM_JOB_ID", ""))),
            source="slurm",
        )
    return DistEnv(0, 1, 0, 1, 0, "127.0.0.1", _DEFAULT_PORT, "single")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def enable(*, use_cuda: Optional[bool] = None, timeout_minutes: int = 30, env: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Start distributed mode (idempotent) and return the environment it used.

    ``use_cuda`` defaults to ``torch.cuda.is_available()``; it selects NCCL and ``cuda:LOCAL_RANK``.
    """
    if _STATE["env"] is not None:
        return _STATE["env"]
    de = read_env(env)
    use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    if use_cuda:
        torch.cuda.set_device(de.local_rank)
        _STATE["device"] = torch.device("cuda", de.local_rank)
    else:
        _STATE["device"] = torch.device("cpu")
    if (de.world_size > 1 or use_cuda) and not dist.is_initialized():
        port = de.master_port if de.source != "single" else _free_port()
        os.environ.update(
            MASTER_ADDR=de.master_addr, MASTER_PORT=str(port), RANK=str(de.rank), WORLD_SIZE=str(de.world_size),
            LOCAL_RANK=str(de.local_rank),
        )
        backend = "nccl" if use_cuda else "gloo"
        kwargs = {"device_id": _STATE["device"]} if use_cuda else {}
        dist.init_process_group(
            backend=backend, rank=de.rank, world_size=de.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs,
        )
        _STATE["owns_group"] = True
        logger.info("distributed: %s rank %d/%d (%s, local rank %d)", backend, de.rank, de.world_size, de.source, de.local_rank)
    _STATE["env"] = de
    return de


def disable() -> None:
    """Tear down what :func:`enable` created (tests, and clean exit)."""
    if _STATE["owns_group"] and dist.is_initialized():
        dist.destroy_process_group()
    _STATE.update(env=None, device=torch.device("cpu"), owns_group=False)


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_global_rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def get_global_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def get_local_rank() -> int:
    env = _STATE["env"]
    return env.local_rank if env is not None else 0


def is_main_process() -> bool:
    return get_global_rank() == 0


def get_device() -> torch.device:
    """The device chosen by :func:`enable` (CPU before it is called)."""
    return _STATE["device"]


def barrier() -> None:
    if is_enabled():
        dist.barrier()


def all_gather_object(obj) -> list:
    if not is_enabled():
        return [obj]
    out = [None] * get_global_size()
    dist.all_gather_object(out, obj)
    return out


def seed_for_rank(seed: int) -> int:
    """DINOv2 seeds each rank with ``seed + rank`` so drop-path noise differs between ranks."""
    return seed + get_global_rank()


def fix_random_seeds(seed: int) -> None:
    random.seed(seed)
    import numpy as np

    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
