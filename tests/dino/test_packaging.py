"""A plain (non-editable) install of the built wheel trains: the configs ship inside the package."""
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv holding only the built wheel; the heavy dependencies (torch, ...) come from this
    interpreter's site-packages through a .pth line, where the editable install's hook is not run."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources it builds.
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".gpu", ".whl", "build", "dist", "outputs", "*.egg-info", "__pycache__", ".pytest_cache"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
          str(src)])
    wheel = next((tmp / "dist").glob("mvhybrid-*.whl"))
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    deps = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if os.path.isdir(p)]
    with open(os.path.join(purelib, "deps.pth"), "w") as f:
        f.write("\n".join(dict.fromkeys(deps)) + "\n")
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", purelib, str(wheel)])
    return py, tmp


def test_wheel_install_runs_the_tiny_training_from_any_folder(installed):
    py, tmp = installed
    work = tmp / "elsewhere"  # no checkout here: configs must come from the installed package
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE")}
    where = _run([str(py), "-c", "import dino, dino.configs as c; print(dino.__file__); print(c.DEFAULT_CONFIG_PATH)"],
                 cwd=work, env=env).stdout.split()
    assert all(str(tmp / "venv") in p for p in where), where  # the installed copy, not the checkout
    _run([str(py), "-m", "dino.train", "--config-file", "configs/demo/tiny.yaml", "--output-dir", "out"],
         cwd=work, env=dict(env, OMP_NUM_THREADS="1"))
    rows = [json.loads(line) for line in open(work / "out" / "training_metrics.json")]
    assert rows[-1]["iteration"] == 3 and (work / "out" / "eval" / "training_3" / "teacher_checkpoint.pth").is_file()


def test_missing_dataset_path_fails_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dino.train", "--output-dir", str(tmp_path / "out"),
                        "--config-file", os.path.join(REPO, "configs", "demo", "tiny.yaml"), "train.dataset_path="],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode != 0 and "train.dataset_path is not set" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out" / "checkpoint.pth").exists()
