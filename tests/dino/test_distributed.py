"""Distributed environment parsing, and a real 2-process gloo run that resumes on 1 process."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dino import distributed
from dino.distributed import parse_slurm_nodelist, read_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- environment parsing (pure) ---------------------------------------------------------------
@pytest.mark.parametrize("nodelist, hosts", [
    ("node07", ["node07"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu[8-10],cpu5", ["gpu8", "gpu9", "gpu10", "cpu5"]),
    ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
    ("rack1-n[001-002]", ["rack1-n001", "rack1-n002"]),
])
def test_slurm_nodelist(nodelist, hosts):
    assert parse_slurm_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "node[1-", "node[5-3]"])
def test_slurm_nodelist_errors(bad):
    with pytest.raises(ValueError):
        parse_slurm_nodelist(bad)


def test_torchrun_env():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    e = read_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.node_rank, e.master_addr, e.master_port, e.source) == (
        5, 8, 1, 1, "10.0.0.1", 1234, "torchrun")


def test_slurm_env(monkeypatch):
    # No scontrol on this machine: the pure-python parser gives the first host.
    monkeypatch.setenv("PATH", "/nonexistent")
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "24", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_JOB_NUM_NODES": "3", "SLURM_JOB_NODELIST": "gpu[12-14]", "SLURM_JOB_ID": "4242"}
    e = read_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size, e.node_rank, e.master_addr, e.source) == (
        9, 24, 1, 8, 1, "gpu12", "slurm")
    assert e.master_port == read_env(dict(env, SLURM_PROCID="0")).master_port  # same port on every task
    assert read_env(dict(env, MASTER_PORT="2222")).master_port == 2222


def test_torchrun_wins_over_slurm_and_single_default():
    env = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n1"}
    assert read_env(env).source == "torchrun"
    assert read_env({}).source == "single" and read_env({}).world_size == 1
    with pytest.raises(RuntimeError, match="WORLD_SIZE"):
        read_env({"RANK": "0", "WORLD_SIZE": "two"})


def test_single_process_cpu_creates_no_group():
    de = distributed.enable(use_cuda=False, env={})
    try:
        assert de.world_size == 1 and not distributed.is_enabled()
        assert distributed.get_global_rank() == 0 and distributed.get_global_size() == 1
        assert distributed.is_main_process() and distributed.get_device().type == "cpu"
    finally:
        distributed.disable()


# -- a real torchrun run ----------------------------------------------------------------------
TINY = ["--config-file", os.path.join(REPO, "configs", "demo", "tiny.yaml"), "train.centering=sinkhorn_knopp"]
# Each rank trains (FSDP2 over gloo), then dumps how its parameters are sharded and the gathered weights.
WORKER = r"""
import os, sys, torch
from dino import distributed, fsdp
from dino.utils.checkpoint import full_model_state_dict
import dino.train.train as T
out = os.environ["DUMP_DIR"]
real = T.do_train
def capture(cfg, model, resume=True):
    res = real(cfg, model, resume)
    params = list(model.parameters())
    torch.save({"full": full_model_state_dict(model), "world": distributed.get_global_size(),
                "all_dtensors": all(isinstance(p, fsdp.DTensor) for p in params),
                "local_numel": sum(fsdp.local_tensor(p).numel() for p in params),
                "full_numel": sum(p.numel() for p in params)},
               os.path.join(out, f"rank{distributed.get_global_rank()}.pt"))
    return res
T.do_train = capture
T.main(sys.argv[1:])
"""


def _env(**kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, **kw)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def test_torchrun_two_processes_then_resume_on_one(tmp_path):
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "--output-dir", str(out)] + TINY + ["optim.epochs=2"]
    r = subprocess.run(cmd, cwd=REPO, env=_env(DUMP_DIR=str(dump)), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    d0, d1 = (torch.load(dump / f"rank{i}.pt", weights_only=True) for i in range(2))
    assert d0["world"] == d1["world"] == 2
    # Sharded on CPU too: every parameter is a DTensor and each rank holds about half of the weights.
    assert d0["all_dtensors"] and d1["all_dtensors"]
    assert d0["local_numel"] + d1["local_numel"] == d0["full_numel"]
    assert 0.3 < d1["local_numel"] / d0["full_numel"] < 0.7
    s0 = d0["full"]  # gathered on rank 0 only
    assert s0 and not d1["full"]
    # the EMA teacher moved away from the student (it follows it on the local shards)
    assert any(not torch.equal(s0[k], s0[k.replace("student.", "teacher.", 1)]) for k in s0 if k.startswith("student."))

    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["iteration"] == 3 and len(ckpt["rng"]) == 2
    for k, v in ckpt["model"].items():
        assert torch.equal(v, s0[k]), k
    with open(out / "training_metrics.json") as f:
        rows = [json.loads(line) for line in f]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3] and rows[0]["current_batch_size"] == 4

    # Saved on 2 processes, resumed on 1 for two more iterations.
    cmd = [sys.executable, "-m", "dino.train", "--output-dir", str(out)] + TINY + ["optim.epochs=3"]
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "saved on 2 process(es) on 1" in r.stdout
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["world_size"] == 1 and ckpt["iteration"] == 5
    with open(out / "training_metrics.json") as f:
        rows2 = [json.loads(line) for line in f]
    assert [r["iteration"] for r in rows2] == list(range(6)) and rows2[:4] == rows


def test_one_job_port_rule_for_srun_and_submitit():
    from dino.distributed import job_port, read_env

    assert job_port("123456") == 20000 + 123456 % 20000
    assert job_port("1234_5") != job_port("1234_6")  # array tasks: all the digits count
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
           "SLURM_JOB_NODELIST": "gpu01", "SLURM_JOB_ID": "1234_5"}
    assert read_env(env).master_port == job_port("1234_5")


def test_one_process_stays_unwrapped_unless_a_half_param_dtype_asks_for_fsdp(monkeypatch):
    """Regression (H200, 92dc0f3): a one-GPU run wrapped in a one-rank FSDP2 group copied every parameter in and
    out around each pass and paid DTensor dispatch per optimiser op: 193 images/s against 270 unwrapped. One
    process now stays plain; buffers still take buffer_dtype; a half param_dtype (an FSDP2 policy) needs a group."""
    from omegaconf import OmegaConf

    from dino import fsdp

    monkeypatch.setattr(distributed, "is_enabled", lambda: True)
    monkeypatch.setattr(distributed, "get_global_size", lambda: 1)
    assert not fsdp.uses_fsdp()
    mod = torch.nn.Linear(3, 2)
    mod.register_buffer("running", torch.zeros(2))
    cfg = OmegaConf.create({"sharding_strategy": "FULL_SHARD",
                            "mixed_precision": {"param_dtype": "fp32", "reduce_dtype": "fp16", "buffer_dtype": "fp16"}})
    out = fsdp.wrap_module(mod, cfg, torch.device("cuda"))  # builds nothing on the device: no GPU needed
    assert out is mod and not isinstance(mod.weight, fsdp.DTensor) and mod.running.dtype == torch.float16
    monkeypatch.setattr(distributed, "get_global_size", lambda: 2)
    assert fsdp.uses_fsdp()

    monkeypatch.setattr(distributed, "is_enabled", lambda: False)
    cfg.mixed_precision.param_dtype = "bf16"
    with pytest.raises(RuntimeError, match="param_dtype=bf16 is an FSDP2 policy"):
        fsdp.wrap_module(torch.nn.Linear(3, 2), cfg, torch.device("cuda"))


FUSED_ADAMW_ON_DTENSORS = '''
import os, sys
import torch, torch.distributed as dist, torch.multiprocessing as mp

def run(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
    from dino.train.train import AdamW
    weights = []
    for fused in (False, True):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 3))
        fully_shard(m)
        opt = AdamW(m.parameters(), lr=1e-2, fused=fused or None, foreach=None if fused else True)
        scaler = ShardedGradScaler(device="cpu")
        for it in range(3):  # as optimizer_step: unscale, clip, scaled step
            opt.zero_grad()
            torch.manual_seed(10 + it + rank)
            scaler.scale(m(torch.randn(4, 8)).sum()).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(list(m.parameters()), 1.0)
            scaler.step(opt)
            scaler.update()
        weights.append(torch.cat([p.full_tensor().flatten() for p in m.parameters()]))
    if rank == 0:
        torch.save(weights, out)
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(run, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2)
'''


def test_fused_adamw_on_sharded_parameters_matches_foreach(tmp_path):
    """The trainer's CUDA optimizer (fused AdamW) on FSDP2's DTensor shards, with the sharded grad scaler and
    clipping, over 2 gloo processes (the CPU has the fused kernel too): the same weights as foreach."""
    script, out = tmp_path / "fused.py", tmp_path / "weights.pt"
    script.write_text(FUSED_ADAMW_ON_DTENSORS)
    port = str(29000 + (os.getpid() % 2000))
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(script), port, str(out)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    foreach, fused = torch.load(out, weights_only=True)
    torch.testing.assert_close(fused, foreach, rtol=1e-6, atol=1e-6)
