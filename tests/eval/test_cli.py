"""Every eval script runs as a file and as a module, with the same ``--help``."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ("compare", "extract_features", "frequency_bias", "gene_expression", "linear_probe", "mil", "retrieval", "survival")


def test_every_eval_cli_is_listed():
    has_main = {p.stem for p in (REPO / "eval").glob("*.py") if 'if __name__ == "__main__":' in p.read_text()}
    assert has_main == set(SCRIPTS)


@pytest.mark.parametrize("form", ["file", "module"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_runs_as_file_and_module(script, form):
    cmd = [sys.executable, f"eval/{script}.py"] if form == "file" else [sys.executable, "-m", f"eval.{script}"]
    # PYTHONPATH: this checkout's packages, as an editable install would give (not another copy on sys.path).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([*cmd, "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage: ") and "--out-dir" in r.stdout, r.stdout[:500]
