"""Exact resume after SIGKILL, atomic checkpoints, NaN guard, pre-emption, resumable data."""
import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

from dino.data.loaders import make_data_loader, make_dataset, parse_dataset_str
from dino.data.samplers import ShardedInfiniteSampler
from dino.train import train as train_mod
from dino.utils import checkpoint as ckpt_mod

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ITERS = 10  # OFFICIAL_EPOCH_LENGTH 5 x 2 epochs
TINY = [
    "--config-file", os.path.join(REPO, "configs", "demo", "tiny.yaml"),
    # softmax centring: the loss centres are state that must survive the restart
    "train.centering=softmax_center", "train.dataset_path=Synthetic:length=24:image_size=32",
    "train.OFFICIAL_EPOCH_LENGTH=5", "train.seed=3",
]
# Dies by SIGKILL right after logging iteration KILL_AT, i.e. past the last checkpoint when KILL_AT is even.
KILLER = """
import os, signal, sys
from dino.utils.logging import MetricsWriter
kill_at = int(os.environ["KILL_AT"])
write = MetricsWriter.write
def write_then_die(self, iteration, *a, **k):
    write(self, iteration, *a, **k)
    if iteration == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
MetricsWriter.write = write_then_die
from dino.train.train import main
main(sys.argv[1:])
"""


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=REPO)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _run(args, env=None, code=None):
    cmd = [sys.executable] + (["-c", code] if code else ["-m", "dino.train"]) + args
    return subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=120)


def _losses(out_dir):
    with open(os.path.join(out_dir, "training_metrics.json")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["iteration"], r["total_loss"], r["dino_local_crops_loss"], r["dino_global_crops_loss"],
             r["koleo_loss"], r["ibot_loss"], r["lr"], r["mom"]) for r in rows]


def test_sigkill_then_resume_is_bit_exact(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    # The uninterrupted run reads data with 2 workers, the killed/resumed one in-process: batches
    # must not depend on worker scheduling.
    r = _run(["--output-dir", str(full)] + TINY + ["train.num_workers=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    kill_at = random.Random().choice([3, 4, 5, 6, 7])
    env = dict(_env(), KILL_AT=str(kill_at))
    r = _run(["--output-dir", str(killed)] + TINY + ["train.num_workers=0"], env=env, code=KILLER)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    saved = torch.load(killed / "checkpoint.pth", weights_only=True)["iteration"]
    assert saved == (kill_at - 1 if kill_at % 2 == 0 else kill_at - 2)  # checkpoints after odd iterations
    assert len(_losses(killed)) == kill_at + 1  # lines beyond the checkpoint exist before resuming
    r = _run(["--output-dir", str(killed)] + TINY + ["train.num_workers=0"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {killed / 'checkpoint.pth'} at iteration {saved + 1}" in r.stdout
    a, b = _losses(full), _losses(killed)
    assert [x[0] for x in a] == list(range(ITERS))
    diff = [(x, y) for x, y in zip(a, b) if x != y]
    assert not diff and len(a) == len(b), f"kill_at={kill_at}, first difference: {diff[:1]}"  # bit-exact
    fa = torch.load(full / "checkpoint.pth", weights_only=True)["model"]
    fb = torch.load(killed / "checkpoint.pth", weights_only=True)["model"]
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    assert "dino_loss.center" in fa and fa["dino_loss.center"].abs().sum() > 0


# -- in-process runs --------------------------------------------------------------------------
def _main(out_dir, *extra):
    return train_mod.main(["--output-dir", str(out_dir)] + TINY + ["train.num_workers=0", "train.saveckp_freq=1"] + list(extra))


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def crashing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the third checkpoint write dies half way
            f.write(b"PK\x03\x04 partial checkpoint")
            raise KeyboardInterrupt("killed during save")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        _main(tmp_path)
    ckpt = ckpt_mod.load_file(str(tmp_path / "checkpoint.pth"))
    assert ckpt["iteration"] == 1  # saves at iterations 0, 1; the one at 2 crashed
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    result = _main(tmp_path)  # and training resumes from it
    assert result["iteration"] == ITERS - 1 and not result["preempted"]


def test_nan_loss_stops_with_iteration_and_keeps_checkpoint(tmp_path, monkeypatch):
    from dino.train.ssl_meta_arch import SSLMetaArch

    real = SSLMetaArch.forward_backward
    state = {"it": -1}

    def poisoned(self, images, teacher_temp):
        state["it"] += 1
        out = real(self, images, teacher_temp)
        if state["it"] == 4:
            out["ibot_loss"] = out["ibot_loss"] * float("nan")
        return out

    monkeypatch.setattr(SSLMetaArch, "forward_backward", poisoned)
    with pytest.raises(train_mod.NonFiniteLossError, match=r"non-finite loss at iteration 4\b.*iteration 3"):
        _main(tmp_path)
    ckpt = ckpt_mod.load_file(str(tmp_path / "checkpoint.pth"))
    assert ckpt["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_sigusr1_saves_and_exits_then_resumes(tmp_path, monkeypatch):
    from dino.train.ssl_meta_arch import SSLMetaArch

    real = SSLMetaArch.forward_backward
    state = {"it": -1}

    def signalling(self, images, teacher_temp):
        state["it"] += 1
        if state["it"] == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # what SLURM sends before the time limit
        return real(self, images, teacher_temp)

    monkeypatch.setattr(SSLMetaArch, "forward_backward", signalling)
    result = _main(tmp_path, "train.saveckp_freq=100")
    assert result["preempted"] and result["iteration"] == 2
    assert ckpt_mod.load_file(str(tmp_path / "checkpoint.pth"))["iteration"] == 2
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored after training
    result = _main(tmp_path, "train.saveckp_freq=100")
    assert not result["preempted"] and result["iteration"] == ITERS - 1
    assert [r[0] for r in _losses(tmp_path)] == list(range(ITERS))


# -- data -------------------------------------------------------------------------------------
def test_sampler_is_a_pure_function_of_position():
    s = ShardedInfiniteSampler(7, shuffle=True, seed=5)
    it = iter(s)
    stream = [next(it) for _ in range(30)]
    assert [p for p, _ in stream] == list(range(30))
    for epoch in range(4):  # each epoch is a permutation
        assert sorted(i for p, i in stream[epoch * 7 : epoch * 7 + 7]) == list(range(7))
    resumed = iter(ShardedInfiniteSampler(7, shuffle=True, seed=5, start=13))
    assert [next(resumed) for _ in range(17)] == stream[13:]
    r0 = iter(ShardedInfiniteSampler(7, seed=5, rank=0, world_size=2))
    r1 = iter(ShardedInfiniteSampler(7, seed=5, rank=1, world_size=2))
    merged = [x for pair in zip([next(r0) for _ in range(15)], [next(r1) for _ in range(15)]) for x in pair]
    assert merged == stream
    other = iter(ShardedInfiniteSampler(7, shuffle=True, seed=6))
    assert [next(other) for _ in range(30)] != stream  # the seed matters
    with pytest.raises(ValueError, match="empty"):
        ShardedInfiniteSampler(0)


def test_loader_resumes_on_the_same_batches():
    from torch.utils.data import Dataset

    class Noisy(Dataset):  # draws from the global RNGs, like an augmentation
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.rand(2) + i, random.random()

    def batches(start, n, workers):
        it = iter(make_data_loader(Noisy(), 3, num_workers=workers, seed=1, start_iteration=start))
        return [next(it) for _ in range(n)]

    full = batches(0, 5, workers=0)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    resumed = batches(2, 3, workers=0)
    assert torch.equal(before, torch.random.get_rng_state())  # the trainer's RNG is untouched
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1], b[0][1])
    for a, b in zip(full, batches(0, 5, workers=2)):
        assert torch.equal(a[0][0], b[0][0])


def test_dataset_strings():
    assert parse_dataset_str("Synthetic:length=8:seed=2") == ("Synthetic", {"length": 8, "seed": 2})
    assert len(make_dataset("Synthetic:length=5:image_size=32")) == 5
    with pytest.raises(ValueError, match="unknown dataset kind 'ImageNet'"):
        make_dataset("ImageNet:split=TRAIN")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lenght'\]"):
        make_dataset("Synthetic:lenght=5")
    with pytest.raises(ValueError, match="not key=value"):
        parse_dataset_str("Folder:/data")


def test_resume_keeps_this_process_optimizer_kernel(tmp_path):
    """A param group saved by a foreach (CPU, or older) run must not switch a fused run back to foreach: the
    kernel choice belongs to the resuming process; the moments and step counts come from the file."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    saved = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    model(torch.randn(2, 4)).sum().backward()
    saved.step()
    path = str(tmp_path / "checkpoint.pth")
    ckpt_mod.save_checkpoint(path, model, saved, None, iteration=1)
    model.zero_grad(set_to_none=True)  # as in a fresh process
    resumed = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)  # CPU has the fused kernel too
    ckpt_mod.load_checkpoint(path, model, resumed, restore_rng=False)
    group = resumed.param_groups[0]
    assert group["fused"] is True and group["foreach"] is None
    for p in model.parameters():
        assert torch.equal(resumed.state[p]["exp_avg"], saved.state[p]["exp_avg"])
        assert float(resumed.state[p]["step"]) == 1.0
    model(torch.randn(2, 4)).sum().backward()
    resumed.step()  # runs on the fused kernel with the loaded state
    assert float(resumed.state[model.weight]["step"]) == 2.0


def test_build_optimizer_is_fused_only_on_cuda():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"optim": {"adamw_beta1": 0.9, "adamw_beta2": 0.999}})
    opt = train_mod.build_optimizer(cfg, [{"params": list(torch.nn.Linear(2, 2).parameters())}])
    assert not opt.param_groups[0]["fused"]  # CPU: torch's default (for-loop or foreach)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)


@pytest.fixture
def one_rank_group(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29531")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("poison", [False, True])
def test_fused_adamw_takes_the_sharded_grad_scaler(poison, one_rank_group):
    """ShardedGradScaler + fused AdamW (torch's raises 'output with shape [] doesn't match the broadcast shape
    [1]'): the update equals the foreach one, and an inf gradient skips the step, step count included."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = train_mod.AdamW(model.parameters(), lr=1e-2, fused=fused or None, foreach=None if fused else True)
        scaler = ShardedGradScaler(device="cpu")
        scaler.scale(model(torch.randn(2, 4)).sum()).backward()
        if poison:
            model.bias.grad[0] = float("inf")
        scaler.unscale_(opt)  # as optimizer_step does before clipping
        scaler.step(opt)
        scaler.update()
        step = float(opt.state[model.weight].get("step", 0))
        results.append((model.weight.detach().clone(), step, scaler.get_scale()))
    (w0, s0, sc0), (w1, s1, sc1) = results
    torch.testing.assert_close(w1, w0)
    assert s0 == s1 == (0.0 if poison else 1.0) and sc0 == sc1


# A one-GPU run has a one-rank process group and plain modules; on CPU the same pair is a one-rank gloo group.
ONE_RANK_GROUP = """
import os, sys, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
""" + KILLER.replace("import os, signal, sys", "import signal")


def test_one_rank_group_trains_checkpoints_and_resumes_like_one_process(tmp_path):
    """The trainer as it runs on one GPU (a one-rank group, unwrapped sub-networks): the same losses as a plain
    single process, bit for bit, and a kill and resume (checkpoint save and load with the group) stay exact."""
    plain, grouped = tmp_path / "plain", tmp_path / "grouped"
    r = _run(["--output-dir", str(plain)] + TINY + ["train.num_workers=0"])
    assert r.returncode == 0, r.stderr[-3000:]
    env = dict(_env(), KILL_AT="5", PORT=str(29000 + random.Random().randrange(2000)))
    r = _run(["--output-dir", str(grouped)] + TINY + ["train.num_workers=0"], env=env, code=ONE_RANK_GROUP)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    env["KILL_AT"] = "-1"
    r = _run(["--output-dir", str(grouped)] + TINY + ["train.num_workers=0"], env=env, code=ONE_RANK_GROUP)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout
    assert _losses(plain) == _losses(grouped)
    ckpt = torch.load(grouped / "checkpoint.pth", weights_only=True)
    assert ckpt["world_size"] == 1 and not any("_fsdp" in k or "_orig_mod" in k for k in ckpt["model"])
