"""SLURM launch: sbatch scripts, the submitit Trainer, preemption/requeue resume, 2-"node" torchrun."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAIN_SCRIPT = REPO / "dino" / "Train_MVHybrid_DINOv2_SLURM.sh"
BACKBONES = ["mv_hybrid", "vit_12", "vit_24", "vim_einfft", "hydra_einfft", "hydra_hybrid"]

# A tiny CPU training: 2 epochs x 3 iterations, a 2-block ViT at 32 px (fast and deterministic).
TINY = [
    "--config-file", str(REPO / "configs" / "demo" / "mv_hybrid_cpu.yaml"),
    "student.arch=vit_12", "student.patch_size=8", "student.model_kwargs.embed_dim=32",
    "student.model_kwargs.depth=2", "student.model_kwargs.num_heads=2",
    "train.batch_size_per_gpu=2", "train.OFFICIAL_EPOCH_LENGTH=3", "optim.epochs=2", "optim.warmup_epochs=1",
    "train.num_workers=0", "train.dataset_path=Synthetic:length=64:image_size=32",
    "crops.global_crops_size=32", "crops.local_crops_size=16", "crops.local_crops_number=2",
    "dino.head_n_prototypes=64", "ibot.head_n_prototypes=64", "dino.head_hidden_dim=32", "ibot.head_hidden_dim=32",
    "dino.head_bottleneck_dim=16", "ibot.head_bottleneck_dim=16", "dino.head_nlayers=2", "ibot.head_nlayers=2",
    "train.log_freq=1", "train.saveckp_freq=100", "evaluation.eval_period_iterations=0",
]
N_ITERS = 6


def sbatch_header(path):
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", Path(path).read_text(), flags=re.M))


def tiny_argv(output_dir):
    # Options first: argparse sends everything after the first key=value to the overrides.
    return TINY[:2] + ["--output-dir", str(output_dir)] + TINY[2:]


def child_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"):
        env.pop(k, None)
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


def losses(output_dir):
    with open(Path(output_dir) / "training_metrics.json") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["iteration"]: r["total_loss"] for r in rows}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --------------------------------------------------------------------------- sbatch scripts
@pytest.mark.parametrize("script", [MAIN_SCRIPT], ids=lambda p: p.name)
def test_sbatch_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-S", "warning", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


def test_sbatch_headers_match_the_paper_and_each_other():
    main = sbatch_header(MAIN_SCRIPT)
    assert (main["nodes"], main["ntasks-per-node"], main["gpus-per-node"]) == ("3", "8", "8")
    assert "requeue" in main and main["signal"] == "B:USR1@120" and main["output"].startswith("logs/")
    # One launcher for every backbone: ARCH picks configs/train/$ARCH.yaml (mv_hybrid by default).
    assert 'configs/train/${ARCH:-mv_hybrid}.yaml' in MAIN_SCRIPT.read_text()
    import mambavision

    for backbone in BACKBONES:
        assert (REPO / "configs" / "train" / f"{backbone}.yaml").is_file()
        assert backbone in mambavision.list_models()


@pytest.mark.parametrize("script", [MAIN_SCRIPT], ids=lambda p: p.name)
def test_missing_settings_are_clear_errors(script, tmp_path):
    env = child_env(REPO_DIR=str(REPO))
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "DATASET_PATH is not set" in proc.stderr
    env["DATASET_PATH"] = "Folder:root=/data"
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "OUTPUT_DIR is not set" in proc.stderr
    env.update(OUTPUT_DIR=str(tmp_path / "out"), ARCH="nope")
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "config file not found: configs/train/nope.yaml" in proc.stderr
    env.update(CONFIG="configs/train/other.yaml")  # CONFIG wins over ARCH
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "config file not found: configs/train/other.yaml" in proc.stderr


def _write_exe(path, text):
    path.write_text(text)
    path.chmod(0o755)


def test_usr1_is_forwarded_to_the_trainer_and_the_shell_waits_for_it(tmp_path):
    """Fake srun/scontrol/python: the batch shell relays USR1 and waits for the trainer to exit; it does not
    requeue by itself (the trainer does, after its save: test_signal_saves_then_requeues_the_slurm_job)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    out = tmp_path / "out"
    _write_exe(bin_dir / "srun", '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    _write_exe(bin_dir / "scontrol", '#!/bin/bash\necho "$*" >> "$OUTPUT_DIR/scontrol.log"\n')
    _write_exe(bin_dir / "fake-python", (
        "#!/bin/bash\n"
        'printf "%s\\n" "$@" > "$OUTPUT_DIR/argv"\n'
        "trap 'sleep 0.3; echo saved > \"$OUTPUT_DIR/checkpoint\"; exit 3' USR1\n"
        'touch "$OUTPUT_DIR/started"\n'
        "while true; do sleep 0.05; done\n"
    ))
    env = child_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON="fake-python", REPO_DIR=str(REPO), OUTPUT_DIR=str(out),
        CONFIG=str(REPO / "configs" / "demo" / "mv_hybrid_cpu.yaml"), DATASET_PATH="Folder:root=/data/pngs",
        SLURM_JOB_ID="4242",
    )
    proc = subprocess.Popen(["bash", str(MAIN_SCRIPT), "optim.epochs=3"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (out / "started").exists(), 20, "the fake trainer to start")
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 3, stderr  # the trainer's own status, after its save
    assert (out / "checkpoint").read_text().strip() == "saved"
    assert "caught USR1: asking the trainer to checkpoint and requeue the job" in stdout
    assert "training finished with status 3" in stdout
    assert not (out / "scontrol.log").exists(), "the shell leaves requeueing to the trainer"
    argv = (out / "argv").read_text().split("\n")
    assert argv[:3] == ["-m", "dino.train", "--config-file"] and "train.dataset_path=Folder:root=/data/pngs" in argv
    assert argv[-2] == "optim.epochs=3", "extra arguments reach the trainer as overrides"


def fake_scontrol(bin_dir, out_dir, kill_caller=False):
    """An ``scontrol`` that logs its arguments and whether the checkpoint was on disk when it ran. With
    ``kill_caller`` it then ends its caller with SIGTERM, as SLURM ends a job that ``scontrol requeue`` requeues."""
    bin_dir.mkdir(exist_ok=True)
    _write_exe(bin_dir / "scontrol", (
        "#!/bin/bash\n"
        f'saved=$([[ -f "{out_dir}/checkpoint.pth" ]] && echo saved || echo unsaved)\n'
        f'echo "$* $saved" >> "{out_dir.parent}/scontrol.log"\n'
        + ('[[ "$1" == requeue ]] && kill -TERM "$PPID"\n' if kill_caller else "")
    ))
    return bin_dir / ".." / "scontrol.log"


# --------------------------------------------------------------------------- submitit
def test_submitit_executor_parameters(tmp_path, monkeypatch):
    from dino.run import submit

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="--local"):
        submit.build_executor(submit.get_args_parser().parse_args([]), tmp_path)
    _write_exe(tmp_path / "srun", "#!/bin/sh\nexit 1\n")  # submitit only checks that srun exists

    args = submit.get_args_parser().parse_args(
        ["--nodes", "3", "--ngpus", "8", "--partition", "gpu", "--timeout", "600", "--qos", "high"])
    executor = submit.build_executor(args, tmp_path / "%j")
    text = executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in ["--nodes=3", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--time=600",
                 "--signal=USR2@120", "--qos=high", "--cpus-per-task=10"]:
        assert f"#SBATCH {line}" in text, line
    local = submit.get_args_parser().parse_args(["--local", "--ngpus", "0"])
    assert submit.tasks_per_node(local) == 1
    with pytest.raises(ValueError, match="one node"):
        submit.build_executor(submit.get_args_parser().parse_args(["--local", "--nodes", "2"]), tmp_path)


def test_launcher_checks_its_arguments():
    from dino.run.train import main

    with pytest.raises(SystemExit):
        main(["--output-dir", "/tmp/x", "--config-file", "missing.yaml"])


def test_submitit_trainer_saves_then_requeues_through_the_trainer(tmp_path, monkeypatch):
    """submitit's USR2 reaches the trainer (not submitit's handler, which would requeue before the save);
    the trainer saves, rank 0 requeues the SLURM job, and the task leaves without a submitit result."""
    import submitit
    import torch

    from dino.run.train import Trainer

    out = tmp_path / "run"
    log = tmp_path / "scontrol.log"
    fake_scontrol(tmp_path / "bin", out)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    for k, v in dict(SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_JOB_ID="77", SUBMITIT_LOCAL_NTASKS="1",
                     SUBMITIT_LOCAL_JOB_NUM_NODES="1", SUBMITIT_LOCAL_NODEID="0", SUBMITIT_LOCAL_GLOBALID="0",
                     SUBMITIT_LOCAL_LOCALID="0", RANK="", WORLD_SIZE="", LOCAL_RANK="", LOCAL_WORLD_SIZE="",
                     GROUP_RANK="", MASTER_ADDR="", MASTER_PORT=str(free_port()), SLURM_JOB_ID="77").items():
        monkeypatch.setenv(k, v)
    sig = submitit.JobEnvironment._usr_sig()
    requeued_by_submitit = []
    previous = signal.signal(sig, lambda *a: requeued_by_submitit.append(a))  # stands for submitit's handler

    def send_when_training():
        wait_for(lambda: (out / "training_metrics.json").exists(), 60, "the first iteration")
        os.kill(os.getpid(), sig)

    sender = threading.Thread(target=send_when_training, daemon=True)
    try:
        sender.start()
        with pytest.raises(SystemExit) as exit_info:
            Trainer(tiny_argv(out))()
    finally:
        signal.signal(sig, previous)
        sender.join(5)
    assert exit_info.value.code == 0 and not requeued_by_submitit
    assert log.read_text().split() == ["requeue", "77", "saved"], "requeued once, after the checkpoint"
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] < N_ITERS - 1


# --------------------------------------------------------------------------- resume and multi-node
@pytest.mark.parametrize("sig, requeues", [(signal.SIGUSR1, True), (signal.SIGTERM, False)], ids=["USR1", "TERM"])
def test_signal_saves_then_requeues_the_slurm_job_and_the_requeued_run_resumes_exactly(tmp_path, sig, requeues):
    """The one requeue path: on the time-limit signal the trainer saves, then rank 0 runs ``scontrol requeue``;
    SIGTERM (scancel) saves without requeueing. The requeued start resumes exactly, even with --no-resume."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    log = fake_scontrol(tmp_path / "bin", cut, kill_caller=True)
    cmd = [sys.executable, "-m", "dino.train"]
    env = child_env()
    slurm = dict(env, PATH=f"{tmp_path / 'bin'}:{env['PATH']}", SLURM_JOB_ID="4242")
    # The uninterrupted reference and the run to interrupt share the two cores.
    ref = subprocess.Popen(cmd + tiny_argv(full), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = subprocess.Popen(cmd + tiny_argv(cut), env=slurm, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (cut / "training_metrics.json").exists() or run.poll() is not None, 120, "the first iteration")
    run.send_signal(sig)
    _, err = run.communicate(timeout=120)
    # A requeued job is ended by SLURM right after `scontrol requeue` returns.
    assert run.returncode == (-signal.SIGTERM if requeues else 0), err[-3000:]
    saved = max(losses(cut))
    assert saved < N_ITERS - 1, "the run stopped early"
    assert (cut / "checkpoint.pth").exists()
    if not requeues:
        assert not log.exists(), "SIGTERM (scancel) must not requeue"
        ref.kill()
        ref.communicate()
        return
    assert log.read_text().split() == ["requeue", "4242", "saved"], "requeued once, after the save"
    # Logged before the requeue: SLURM may end the job before anything after it is written (the CI flake).
    assert "requeueing SLURM job 4242" in (cut / "log.txt").read_text()

    # The requeued job: same command (here with --no-resume, which a requeue ignores), same output dir.
    argv = tiny_argv(cut)
    argv.insert(argv.index("--output-dir") + 2, "--no-resume")
    resumed = subprocess.run(cmd + argv, env=dict(slurm, SLURM_RESTART_COUNT="1"), cwd=REPO, capture_output=True,
                             text=True, timeout=180)
    assert "--no-resume applies to the first start only" in resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log_text = (cut / "log.txt").read_text()
    assert f"at iteration {saved + 1}" in log_text
    _, err = ref.communicate(timeout=180)
    assert ref.returncode == 0, err[-3000:]
    expected, got = losses(full), losses(cut)
    assert sorted(expected) == sorted(got) == list(range(N_ITERS))
    assert [got[i] for i in range(N_ITERS)] == [expected[i] for i in range(N_ITERS)]


def test_two_node_torchrun_on_localhost(tmp_path):
    port = free_port()
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import json, os, sys\n"
        "from dino.train import main\n"
        "r = main(sys.argv[1:])\n"
        "json.dump({'metrics': r['metrics'], 'iteration': r['iteration'], 'world': os.environ['WORLD_SIZE']},\n"
        "          open(os.path.join(sys.argv[sys.argv.index('--output-dir') + 1], f\"rank{os.environ['RANK']}.json\"), 'w'))\n"
    )
    out = tmp_path / "out"
    argv = tiny_argv(out) + ["optim.epochs=1"]  # 3 iterations
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port), str(driver), *argv],
            env=child_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for node in (0, 1)
    ]
    errs = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-2000:] for e in errs)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == "2" and r0["iteration"] == r1["iteration"] == 2
    assert r0["metrics"]["total_loss"] == r1["metrics"]["total_loss"]
    assert losses(out)[2] == pytest.approx(r0["metrics"]["total_loss"], rel=1e-12)
