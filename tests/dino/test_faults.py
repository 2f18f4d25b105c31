"""Fault injection (issue 15): bad tiles and images, a second run, kills at any point, scheduler
signals to the process group, bad configs, changed resumes, divergence, reused output folders.

Each case reproduces a failure found in the issue and checks the behaviour that replaced it.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from dino.configs import ConfigError
from dino.data.unreadable import UnreadableSampleError
from dino.train import train as train_mod
from dino.utils import checkpoint as ckpt_mod
from dino.utils.resume_checks import ResumeMismatchError
from dino.utils.run_lock import RunLockError
from test_train_resume import ITERS, REPO, TINY, _env, _losses

# Runs the trainer as `python -m dino.train` does, after an optional fault: KILL_AT=i sends KILL_SIG
# (default SIGKILL) right after iteration i is logged, to the process group with KILL_GROUP=1 (what a
# scheduler's kill does, DataLoader workers included). PIL's pixel limit is lowered so that a 64x64
# "bomb.png" raises DecompressionBombError, as a 14000x14000 image does with the default limit.
RUNNER = """
import os, runpy, signal, sys
import PIL.Image
PIL.Image.MAX_IMAGE_PIXELS = 2000
from dino.utils.logging import MetricsWriter
kill_at = int(os.environ.get("KILL_AT", "-1"))
sig = getattr(signal, os.environ.get("KILL_SIG", "SIGKILL"))
write = MetricsWriter.write
def write_then_signal(self, iteration, *a, **k):
    write(self, iteration, *a, **k)
    if iteration == kill_at:
        if os.environ.get("KILL_GROUP"):
            os.killpg(os.getpgid(0), sig)
        else:
            os.kill(os.getpid(), sig)
MetricsWriter.write = write_then_signal
if os.environ.get("DIE_IN_TEACHER_SAVE"):  # SIGKILL half way through writing the final teacher checkpoint
    import dino.utils.checkpoint as c
    real = c.atomic_save
    def dying(obj, path):
        if path.endswith("teacher_checkpoint.pth"):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".a1b2c3.tmp")  # dino.atomic's name
            with open(tmp, "wb") as f:
                f.write(b"PK partial teacher")
            os.kill(os.getpid(), signal.SIGKILL)
        real(obj, path)
    c.atomic_save = dying
sys.argv = ["dino.train"] + sys.argv[1:]
runpy.run_module("dino.train", run_name="__main__")
"""


def run(out_dir, *opts, **env):
    """The trainer in a new session (its own process group), with the tiny config."""
    args = ["--output-dir", str(out_dir)] + TINY + list(opts)
    return subprocess.run([sys.executable, "-c", RUNNER] + args, cwd=REPO, env=dict(_env(), **env),
                          capture_output=True, text=True, timeout=180, start_new_session=True)


def main_in_process(out_dir, *opts, flags=()):
    return train_mod.main(list(flags) + ["--output-dir", str(out_dir)] + TINY + ["train.num_workers=0"] + list(opts))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted tiny run: losses, checkpoint and final teacher to compare with."""
    out = tmp_path_factory.mktemp("reference")
    r = run(out, "train.num_workers=0")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


# -- data faults -------------------------------------------------------------------------------
@pytest.fixture
def bad_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MVHYBRID_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "patches"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(14):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "bomb.png")  # over the lowered pixel limit
    (root / "empty.png").write_bytes(b"")
    os.symlink(root, root / "sub" / "loop")  # a folder loop
    os.symlink("self.png", root / "self.png")  # a file loop
    return root


def test_bad_images_and_symlink_loops_never_stop_and_resume_stays_exact(bad_folder, tmp_path):
    data = [f"train.dataset_path=Folder:root={bad_folder}", "train.max_unreadable_fraction=0.5"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = run(full, *data, "train.num_workers=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DecompressionBombError" in r.stdout and "bomb.png" in r.stdout  # named in the log
    assert "symlink back to a folder already listed" in r.stdout
    r = run(killed, *data, "train.num_workers=0", KILL_AT="5")
    assert r.returncode == -signal.SIGKILL
    r = run(killed, *data, "train.num_workers=0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(full) == _losses(killed) and len(_losses(full)) == ITERS  # bit-exact despite the substitutes
    a = torch.load(full / "checkpoint.pth", weights_only=True)
    b = torch.load(killed / "checkpoint.pth", weights_only=True)
    assert a["unreadable_samples"] == b["unreadable_samples"] > 0  # counted, also across the resume


def test_too_many_unreadable_samples_stop_with_a_clear_message(bad_folder, tmp_path):
    for i in range(10):  # now 13 of 27 files are unreadable
        (bad_folder / f"z{i}.png").write_bytes(b"not a png")
    r = run(tmp_path / "out", f"train.dataset_path=Folder:root={bad_folder}", "train.max_unreadable_fraction=0.05")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "unreadable samples by iteration" in r.stderr and "train.max_unreadable_fraction=0.05" in r.stderr


def _slide_with_corrupt_tile(root):
    """A 1024 px tiled TIFF whose level-0 tile 19 (x 384, y 256, 128 px) does not decode (ZIPDecode)."""
    pytest.importorskip("openslide", reason="the wsi extra (openslide-python, openslide-bin) is part of the test install")
    import tifffile

    from dino.data.wsi.pyramid_tiff import write_pyramidal_tiff

    (root / "slides").mkdir(parents=True)
    rgb = np.full((1024, 1024, 3), 255, np.uint8)  # tissue on glass
    rgb[128:896, 256:1024] = np.random.default_rng(1).integers(60, 230, (768, 768, 3), dtype=np.uint8)
    path = root / "slides" / "garbled.tif"
    write_pyramidal_tiff(path, rgb, tile=128, n_levels=2)
    with tifffile.TiffFile(path) as t:
        offset = t.pages[0].dataoffsets[19]
    with open(path, "r+b") as f:
        f.seek(offset + 10)
        f.write(b"\x00garbage" * 20)
    return path


def test_corrupt_wsi_tile_is_named_skipped_and_training_completes(tmp_path):
    from dino.data.datasets.wsi_coords import WSICoordsDataset
    from dino.data.wsi.patching import PatchingConfig, patch_slide

    slide = _slide_with_corrupt_tile(tmp_path)
    # 128-px patches: 36 of them, so the 40 samples of the run read the bad one at least once.
    assert patch_slide(slide, tmp_path / "p", PatchingConfig(patch_size=128, save_thumbnail=False)).status == "done"
    ds = WSICoordsDataset(tmp_path / "slides", tmp_path / "p" / "coords")
    bad = [i for i, (x, y) in enumerate(ds.coords) if 384 <= x < 512 and 256 <= y < 384]
    assert len(bad) == 1 and len(ds) < ITERS * 4
    with pytest.raises(UnreadableSampleError, match=r"at \(384, 256\) of .*garbled.tif.*ZIPDecode"):
        ds[bad[0]]
    ds[0]  # the slide stays readable after a failed tile (OpenSlide handles stick in an error state)
    result = main_in_process(tmp_path / "out", f"train.dataset_path=WSICoords:slides={tmp_path / 'slides'}"
                             f":coords={tmp_path / 'p' / 'coords'}", "train.max_unreadable_fraction=0.5")
    assert result["iteration"] == ITERS - 1
    assert ckpt_mod.load_file(str(tmp_path / "out" / "checkpoint.pth"))["unreadable_samples"] > 0


def test_create_patches_verify_and_recorded_parameters(tmp_path):
    _slide_with_corrupt_tile(tmp_path)
    script = [sys.executable, os.path.join(REPO, "scripts", "create_patches.py"), "--source", str(tmp_path / "slides"),
              "--save-dir", str(tmp_path / "p"), "--no-progress", "--no-thumbnails"]
    r = subprocess.run(script + ["--patch-size", "64", "--verify"], capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 3, r.stdout + r.stderr  # done, but with unreadable patches
    rows = (tmp_path / "p" / "verify.csv").read_text().splitlines()
    assert rows[0] == "slide_id,x,y,error" and len(rows) == 1 + 4  # the 4 patches of the bad 128-px tile
    assert all(row.startswith("garbled,") and "ZIPDecode" in row for row in rows[1:])
    assert "verify: read" in r.stdout and "4 unreadable" in r.stdout
    r = subprocess.run(script + ["--patch-size", "32"], capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 1 and "patch_size=64 there, 32 asked" in r.stderr
    assert json.loads((tmp_path / "p" / "patching_params.json").read_text())["patch_size"] == 64
    r = subprocess.run(script + ["--patch-size", "32", "--overwrite"], capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "p" / "patching_params.json").read_text())["patch_size"] == 32


# -- one run per output dir --------------------------------------------------------------------
HOLDER = """
import sys, time
from dino.utils.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_second_run_fails_at_once_naming_the_holder_and_stale_locks_are_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        r = run(out)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert f"host {socket.gethostname()}, pid {holder.pid}, started " in r.stderr and "in use" in r.stderr
        with pytest.raises(RunLockError, match=f"pid {holder.pid}"):
            main_in_process(out)
        assert time.monotonic() - start < 60
        assert not (out / "config.yaml").exists() and not (out / "training_metrics.json").exists()
    finally:
        holder.kill()
        holder.wait()
    result = main_in_process(out, "optim.epochs=1")  # the holder died: its lock is stale
    assert result["iteration"] == 4
    assert f"stale lock {out / '.run.lock'} from a run that is gone (host {socket.gethostname()}, pid {holder.pid}" \
        in capsys.readouterr().out
    assert (out / ".run.lock").read_text() == ""  # released


# -- kills and signals ---------------------------------------------------------------------------
def test_kill_during_final_teacher_save_is_recovered_and_temp_files_removed(tmp_path, reference):
    out = tmp_path / "out"
    r = run(out, DIE_IN_TEACHER_SAVE="1")
    assert r.returncode == -signal.SIGKILL
    (out / ".checkpoint.pth.tmp.999999").write_bytes(b"x" * 1000)  # as left by a killed save of an earlier version
    teacher = out / "eval" / f"training_{ITERS - 1}" / "teacher_checkpoint.pth"
    assert not teacher.exists() and list(teacher.parent.glob(".teacher_checkpoint.pth.*.tmp"))
    r = run(out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training already complete" in r.stdout and "removed 2 temporary file(s)" in r.stdout
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    got = ckpt_mod.load_file(str(teacher))["teacher"]
    ref = ckpt_mod.load_file(str(reference / "eval" / f"training_{ITERS - 1}" / "teacher_checkpoint.pth"))["teacher"]
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_signal_to_the_process_group_with_workers_saves_and_exits(tmp_path, reference, sig):
    out = tmp_path / "out"
    r = run(out, "train.num_workers=2", KILL_AT="4", KILL_SIG=sig, KILL_GROUP="1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "killed by signal" not in r.stderr and "pre-emption requested" in r.stdout
    assert ckpt_mod.load_file(str(out / "checkpoint.pth"))["iteration"] in (4, 5)
    r = run(out, "train.num_workers=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(out) == _losses(reference)


# -- configuration -------------------------------------------------------------------------------
@pytest.mark.parametrize("opt, message", [
    ("optim.base_lr=abc", "optim.base_lr='abc' in command line: expected a number"),
    ("train.num_workers=abc", "train.num_workers='abc' in command line: expected an integer"),
    ("optim.base_lr=-0.001", "optim.base_lr=-0.001 is out of range (0, inf] (set in command line)"),
    ("LIST_YAML", "expected a mapping of config keys at the top level, got a list"),
])
def test_bad_config_values_fail_before_any_work(tmp_path, opt, message):
    out = tmp_path / "out"
    if opt == "LIST_YAML":
        bad = tmp_path / "list.yaml"
        bad.write_text("- optim\n- train\n")
        opts = ["--config-file", str(bad)]  # a second --config-file wins over TINY's
        r = subprocess.run([sys.executable, "-m", "dino.train", "--output-dir", str(out)] + opts, cwd=REPO,
                           env=_env(), capture_output=True, text=True, timeout=120)
        message = f"{bad}: {message}"
    else:
        r = run(out, opt)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert message in r.stderr
    assert not (out / "config.yaml").exists() and not (out / "checkpoint.pth").exists()


def test_bare_run_does_not_write_into_the_current_folder(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dino.train"], cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "pass --output-dir" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_resume_with_another_architecture_or_schedule(tmp_path, capsys):
    out = tmp_path / "out"
    main_in_process(out, "optim.epochs=1")
    config = (out / "config.yaml").read_bytes()
    with pytest.raises(ResumeMismatchError) as err:
        main_in_process(out, "optim.epochs=1", "student.model_kwargs.embed_dim=64", "dino.head_hidden_dim=48")
    text = str(err.value)
    assert "\n" not in text and "student.model_kwargs.embed_dim: 32 in the checkpoint, 64 now" in text
    assert "dino.head_hidden_dim: 32 in the checkpoint, 48 now" in text
    assert (out / "config.yaml").read_bytes() == config  # not overwritten by the refused run
    capsys.readouterr()
    result = main_in_process(out, "optim.epochs=2", "train.batch_size_per_gpu=2")
    assert result["iteration"] == ITERS - 1
    warned = " ".join(line for line in capsys.readouterr().out.splitlines() if "changed settings" in line)
    assert "optim.epochs 1 -> 2" in warned and "train.batch_size_per_gpu 4 -> 2" in warned
    assert "batch_size_per_gpu: 2" in (out / "config.yaml").read_text()


def test_no_resume_moves_the_old_run_aside(tmp_path):
    out = tmp_path / "out"
    main_in_process(out)
    before = (out / "training_metrics.json").read_text()
    main_in_process(out, "optim.epochs=1", flags=["--no-resume"])
    moved = list((out / "previous_runs").iterdir())
    assert len(moved) == 1
    assert (moved[0] / "training_metrics.json").read_text() == before and len(before.splitlines()) == ITERS
    assert ckpt_mod.load_file(str(moved[0] / "checkpoint.pth"))["iteration"] == ITERS - 1
    assert (moved[0] / "eval" / f"training_{ITERS - 1}" / "teacher_checkpoint.pth").is_file()
    assert len((out / "training_metrics.json").read_text().splitlines()) == 5  # the new run


# -- divergence ----------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [5, 3])
def test_nan_names_a_checkpoint_that_precedes_the_divergence(tmp_path, monkeypatch, keep):
    from dino.train.ssl_meta_arch import SSLMetaArch

    real = SSLMetaArch.forward_backward
    state = {"it": -1}

    def diverging(self, images, teacher_temp):
        state["it"] += 1
        if state["it"] == 3:  # weights blow up (finite, so still saved), the loss goes NaN later
            with torch.no_grad():
                self.student.backbone.norm.weight.mul_(1e6)
        out = real(self, images, teacher_temp)
        if state["it"] == 6:
            out["ibot_loss"] = out["ibot_loss"] * float("nan")
        return out

    monkeypatch.setattr(SSLMetaArch, "forward_backward", diverging)
    with pytest.raises(train_mod.NonFiniteLossError) as err:
        main_in_process(tmp_path, "train.saveckp_freq=1", f"train.keep_checkpoints={keep}")
    text = str(err.value)
    assert "non-finite loss at iteration 6" in text and "weights up to 1e+06 and are already diverged" in text
    kept = sorted(p.name for p in tmp_path.glob("checkpoint_*.pth"))
    assert kept == [ckpt_mod.history_name(i) for i in range(6 - keep, 6)]
    if keep == 3:  # all three kept ones were saved after the weights blew up
        assert "every kept checkpoint is already diverged" in text and "raise train.keep_checkpoints" in text
        return
    healthy = tmp_path / ckpt_mod.history_name(2)
    assert f"the newest checkpoint before the divergence is {healthy} (iteration 2" in text
    assert "iterations [3, 4, 5]" in text and f"cp {healthy} {tmp_path / 'checkpoint.pth'}" in text
    sd = ckpt_mod.load_file(str(healthy))["model"]
    assert max(float(v.abs().max()) for v in sd.values() if v.is_floating_point()) < ckpt_mod.DIVERGED_ABS_WEIGHT


def test_keep_last_k_checkpoints_as_hard_links(tmp_path):
    main_in_process(tmp_path, "train.saveckp_freq=1", "train.keep_checkpoints=3")
    kept = sorted(p.name for p in tmp_path.glob("checkpoint_*.pth"))
    assert kept == [ckpt_mod.history_name(i) for i in (ITERS - 3, ITERS - 2, ITERS - 1)]
    assert os.path.samefile(tmp_path / "checkpoint.pth", tmp_path / kept[-1])  # no extra space for the newest
    history = json.loads((tmp_path / "checkpoints.json").read_text())
    assert [e["iteration"] for e in history] == [ITERS - 3, ITERS - 2, ITERS - 1]


def test_a_non_finite_state_is_never_saved(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    path = str(tmp_path / "checkpoint.pth")
    ckpt_mod.save_checkpoint(path, model, opt, None, 0)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(ckpt_mod.NonFiniteStateError, match="iteration 1: model weight is not finite"):
        ckpt_mod.save_checkpoint(path, model, opt, None, 1)
    assert ckpt_mod.load_file(path)["iteration"] == 0


def test_load_pretrained_of_another_architecture_says_so(reference):
    import mambavision

    teacher = reference / "eval" / f"training_{ITERS - 1}" / "teacher_checkpoint.pth"
    assert mambavision.load_pretrained(str(teacher)).embed_dim == 32
    with pytest.raises(ValueError, match="holds a 'mv_hybrid' backbone, not 'vit_12': the architectures differ"):
        mambavision.load_pretrained(str(teacher), name="vit_12")


def test_refused_checkpoint_gives_no_advice_to_unpickle(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this would run",))

    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(RuntimeError) as err:
        ckpt_mod.load_file(str(tmp_path / "evil.pth"))
    assert "holds a Python object (print)" in str(err.value) and "weights_only" not in str(err.value)
    (tmp_path / "garbage.pth").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="not a valid torch checkpoint") as err:
        ckpt_mod.load_file(str(tmp_path / "garbage.pth"))
    assert "weights_only" not in str(err.value)


def test_output_dir_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        main_in_process(tmp_path / "out")


def test_lock_without_file_locking_judges_the_holder_by_pid(tmp_path, monkeypatch):
    import errno
    import fcntl

    from dino.utils import run_lock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = {"host": socket.gethostname(), "pid": sleeper.pid, "started": "then"}
        (tmp_path / run_lock.LOCK_NAME).write_text(json.dumps(holder))
        with pytest.raises(RunLockError, match=f"pid {sleeper.pid}, started then"):
            run_lock.RunLock(str(tmp_path)).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = run_lock.RunLock(str(tmp_path)).acquire()  # the holder is gone: stale
    assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
