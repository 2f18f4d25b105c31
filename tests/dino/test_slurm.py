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


def test_usr1_forwards_to_trainer_then_requeues(tmp_path):
    """Fake srun/scontrol/python: the batch shell relays USR1, waits for the save, then requeues."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    out = tmp_path / "out"
    _write_exe(bin_dir / "srun", '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    _write_exe(bin_dir / "scontrol", '#!/bin/bash\n[[ -f "$OUTPUT_DIR/checkpoint" ]] && echo "$*" >> "$OUTPUT_DIR/scontrol.log"\n')
    _write_exe(bin_dir / "fake-python", (
        "#!/bin/bash\n"
        'printf "%s\\n" "$@" > "$OUTPUT_DIR/argv"\n'
        "trap 'sleep 0.3; echo saved > \"$OUTPUT_DIR/checkpoint\"; exit 0' USR1\n"
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
    assert proc.returncode == 0, stderr
    assert (out / "checkpoint").read_text().strip() == "saved"
    assert (out / "scontrol.log").read_text().split() == ["requeue", "4242"], "requeued only after the save"
    argv = (out / "argv").read_text().split("\n")
    assert argv[:3] == ["-m", "dino.train", "--config-file"] and "train.dataset_path=Folder:root=/data/pngs" in argv
    assert argv[-2] == "optim.epochs=3", "extra arguments reach the trainer as overrides"


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


def test_trainer_checkpoint_returns_delayed_submission_of_itself():
    import submitit

    from dino.run.train import Trainer, main
    from dino.train.train import _PREEMPT

    trainer = Trainer(["--config-file", "c.yaml", "--output-dir", "/o", "--no-resume", "optim.epochs=1"])
    try:
        delayed = trainer.checkpoint()
        assert isinstance(delayed, submitit.helpers.DelayedSubmission)
        assert delayed.function is trainer
        assert trainer.train_argv == ["--config-file", "c.yaml", "--output-dir", "/o", "optim.epochs=1"]
        assert _PREEMPT.is_set(), "checkpoint() asks a running trainer to save"
    finally:
        _PREEMPT.clear()
    with pytest.raises(SystemExit):
        main(["--output-dir", "/tmp/x", "--config-file", "missing.yaml"])


def test_trainer_saves_before_submitit_requeues(tmp_path, monkeypatch):
    """submitit's USR2 handler must run only after the trainer wrote its checkpoint."""
    import submitit
    import torch

    from dino.run.train import Trainer

    out = tmp_path / "run"
    for k, v in dict(SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_JOB_ID="77", SUBMITIT_LOCAL_NTASKS="1",
                     SUBMITIT_LOCAL_JOB_NUM_NODES="1", SUBMITIT_LOCAL_NODEID="0", SUBMITIT_LOCAL_GLOBALID="0",
                     SUBMITIT_LOCAL_LOCALID="0", RANK="", WORLD_SIZE="", LOCAL_RANK="", LOCAL_WORLD_SIZE="",
                     GROUP_RANK="", MASTER_ADDR="", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    trainer = Trainer(tiny_argv(out))
    seen = {}

    def fake_submitit_handler(signum, frame):  # what submitit does on rank 0: checkpoint, then requeue
        seen["checkpoint_on_disk"] = (out / "checkpoint.pth").exists()
        seen["delayed"] = trainer.checkpoint()

    sig = submitit.JobEnvironment._usr_sig()
    previous = signal.signal(sig, fake_submitit_handler)

    def send_when_training():
        wait_for(lambda: (out / "training_metrics.json").exists(), 60, "the first iteration")
        os.kill(os.getpid(), sig)

    sender = threading.Thread(target=send_when_training, daemon=True)
    try:
        sender.start()
        result = trainer()
    finally:
        signal.signal(sig, previous)
        sender.join(5)
        from dino.train.train import _PREEMPT

        _PREEMPT.clear()
    assert result["preempted"] and result["iteration"] < N_ITERS - 1
    assert seen["checkpoint_on_disk"], "checkpoint written before submitit's requeue"
    assert seen["delayed"].function is trainer
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == result["iteration"]


# --------------------------------------------------------------------------- resume and multi-node
def test_sigusr1_checkpoint_and_exact_resume(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    cmd = [sys.executable, "-m", "dino.train"]
    env = child_env()
    # The uninterrupted reference and the run to interrupt share the two cores.
    ref = subprocess.Popen(cmd + tiny_argv(full), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = subprocess.Popen(cmd + tiny_argv(cut), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (cut / "training_metrics.json").exists() or run.poll() is not None, 120, "the first iteration")
    run.send_signal(signal.SIGUSR1)  # what the sbatch script forwards before the time limit
    _, err = run.communicate(timeout=120)
    assert run.returncode == 0, err[-3000:]
    saved = max(losses(cut))
    assert saved < N_ITERS - 1, "the run stopped early"
    assert (cut / "checkpoint.pth").exists()

    # Requeued job: same command, same output dir -> continues after the saved iteration.
    resumed = subprocess.run(cmd + tiny_argv(cut), env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (cut / "log.txt").read_text()
    assert f"at iteration {saved + 1}" in log
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
