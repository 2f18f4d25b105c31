"""Pre-emption and requeue on a real one-node SLURM cluster (slurmctld + slurmd + munged).

The tiny training is submitted through ``dino/Train_MVHybrid_DINOv2_SLURM.sh`` with a two-minute
time limit: SLURM signals the batch shell (``B:USR1``), which relays the signal to the trainer; the
trainer saves its checkpoint and requeues the job (the one requeue path); the requeued job resumes, and its losses equal an
uninterrupted run's. The submitit launcher (``python -m dino.run.train``) is run against the same
cluster. ``.ci/run`` installs slurm-wlm and munge; without them these tests are skipped, and say why.

A requeued job waits in ``PENDING (BeginTime)`` until its old credential expires; the cluster
shortens that from 120 s to 10 s (``cred_expire``). SLURM checks time limits only every 30 s, so a job's
signal (110 s before its end) comes 10 to 40 s after its start: not before the trainer has imported torch
and installed its handlers (until then USR1 would kill it), and the number of iterations is set from a
short timed run so that the training outlasts that on any machine, and is surely caught.
"""
import json
import math
import os
import subprocess
import sys
import time
import warnings

import pytest

from slurm_cluster import SlurmCluster, missing
from test_slurm import MAIN_SCRIPT, REPO, TINY, child_env, losses, tiny_argv

ABSENT = missing()
REASON = f"no SLURM cluster test: {', '.join(ABSENT)} not installed (Debian: apt-get install slurm-wlm munge)"
SIGNAL_BY_S = 40  # latest arrival of the time-limit signal after the job's start (30 s check period)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if ABSENT:
        if os.environ.get("MVHYBRID_REQUIRE_SLURM"):  # set by .ci/run, which installs them
            pytest.fail(REASON)
        warnings.warn(REASON)  # shown in the summary of a plain `make test`
        pytest.skip(REASON)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield c
    finally:
        c.stop()


def reference(out_dir, extra):
    """The same training, uninterrupted, outside SLURM (started in the background)."""
    return subprocess.Popen([sys.executable, "-m", "dino.train"] + tiny_argv(out_dir) + extra, env=child_env(),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_job(cluster, job_id, predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = cluster.job_field(job_id, "JobState")
        if predicate(state):
            return state
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for job {job_id} to {what} "
                         f"(state {cluster.job_field(job_id, 'JobState')}):\n{cluster.logs()}")


def wait_requeued(cluster, job_id, timeout=90):
    """Wait until the job has requeued itself; let its next instance run to the end (no time limit)."""
    wait_job(cluster, job_id, lambda s: s == "PENDING" and cluster.job_field(job_id, "Restarts") not in ("", "0"),
             timeout, "requeue itself")
    cluster.scontrol("update", f"JobId={job_id}", "TimeLimit=10")


def assert_saved_requeued_resumed(out, job_output):
    """The trainer's log shows the three steps of a pre-emption; on failure, names the missing ones."""
    log = (out / "log.txt").read_text()
    missing = [m for m in ("pre-emption requested: saved", "requeueing SLURM job", "resuming from") if m not in log]
    job_text = job_output if isinstance(job_output, str) else "\n".join(p.read_text() for p in job_output)
    assert not missing, f"{missing} not in {out / 'log.txt'}:\n{log[-6000:]}\n--- job output:\n{job_text[-3000:]}"


def iterations_lasting(seconds, tmp_path):
    """Iterations (a multiple of 100) of the tiny training that take about ``seconds`` here."""
    out = tmp_path / "timing"
    r = subprocess.run([sys.executable, "-m", "dino.train"] + tiny_argv(out) + [
        "train.OFFICIAL_EPOCH_LENGTH=30", "optim.epochs=1"], env=child_env(), cwd=REPO, capture_output=True,
        text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]
    per_iteration = rows[-1]["iter_time"]
    return int(min(max(math.ceil(seconds / per_iteration / 100), 4), 60)) * 100


def test_sbatch_script_signal_save_requeue_resume(cluster, tmp_path):
    out, ref_out = tmp_path / "out", tmp_path / "ref"
    n = iterations_lasting(SIGNAL_BY_S + 10, tmp_path)  # the parallel reference slows both further
    extra = ["train.OFFICIAL_EPOCH_LENGTH=100", f"optim.epochs={n // 100}", "train.saveckp_freq=400",
             "train.num_workers=1"]
    ref = reference(ref_out, extra)
    overrides = [a for a in TINY[2:] if not a.startswith("train.dataset_path=")] + extra
    env = dict(child_env(), SLURM_CONF=cluster.env["SLURM_CONF"], PYTHON=sys.executable, REPO_DIR=str(REPO),
               OUTPUT_DIR=str(out), CONFIG=TINY[1], DATASET_PATH="Synthetic:length=64:image_size=32")
    r = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
         "--time=2", "--signal=B:USR1@110", f"--output={tmp_path / 'job.out'}", f"--error={tmp_path / 'job.err'}",
         str(MAIN_SCRIPT)] + overrides, env=env, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    wait_requeued(cluster, job)
    wait_job(cluster, job, lambda s: s == "COMPLETED", 240, "complete")
    text = (tmp_path / "job.out").read_text()
    assert "caught USR1: asking the trainer to checkpoint and requeue the job" in text  # the time-limit signal
    assert "(restart 1)" in text and "training finished with status 0" in text
    assert_saved_requeued_resumed(out, text)
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]
    got, expected = losses(out), losses(ref_out)
    assert sorted(got) == list(range(n)) and got == expected  # bit-exact across the requeue


def test_submitit_launcher_requeues_and_resumes(cluster, tmp_path):
    out, ref_out = tmp_path / "out", tmp_path / "ref"
    extra = ["train.OFFICIAL_EPOCH_LENGTH=50", "optim.epochs=4", "train.saveckp_freq=400"]  # 200 iterations
    ref = reference(ref_out, extra)
    env = dict(child_env(), SLURM_CONF=cluster.env["SLURM_CONF"])
    r = subprocess.run(
        [sys.executable, "-m", "dino.run.train", "--nodes", "1", "--ngpus", "0", "--cpus-per-task", "1",
         "--timeout", "10", "--partition", "ci", "--job-dir", str(tmp_path / "submitit"), "--job-name", "ci-submitit"]
        + tiny_argv(out) + extra, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    job = next(line.split()[-1] for line in r.stdout.splitlines() if line.startswith("Submitted job_id:"))
    wait_job(cluster, job, lambda s: s == "RUNNING" and (out / "training_metrics.json").exists(), 120, "train")
    # What SLURM sends before a time limit or a pre-emption (submitit asks for USR2 to the tasks).
    subprocess.run(["scancel", "--signal=USR2", job], env=cluster.env, check=True, timeout=30)
    wait_requeued(cluster, job)
    wait_job(cluster, job, lambda s: s == "COMPLETED", 240, "complete")
    assert_saved_requeued_resumed(out, (tmp_path / "submitit").glob("*_log.out"))
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]
    assert losses(out) == losses(ref_out) and sorted(losses(out)) == list(range(200))
