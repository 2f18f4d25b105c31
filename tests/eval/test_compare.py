"""eval.compare: N models x every task in one command, one table, resumable, through the per-task scripts."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from eval import compare, linear_probe

REPO = Path(__file__).resolve().parents[2]
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def _demo_data_module():
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "scripts" / "make_demo_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import mambavision

    root = tmp_path_factory.mktemp("cmp")
    mdd = _demo_data_module()
    mdd.make_demo_data(root / "data", image_size=32, seed=0, n_studies=2, workers=1, n_per_class=6,
                       samples_per_study=2, spots_per_sample=30, n_genes=60, n_slides=20, patches_per_slide=4)
    tasks = mdd.write_tasks_file(root / "data")
    torch.manual_seed(5)
    ckpt = root / "ckpt.pth"
    torch.save(mambavision.create_model("mv_hybrid", **TINY).state_dict(), ckpt)
    argv = ["--tasks", str(tasks), "--model", f"trained=mv_hybrid:{ckpt}", "--random-init", "random=mv_hybrid",
            "--model-kwargs", json.dumps(TINY), "--out-dir", str(root / "out")]
    first = compare.main(argv)
    return root, argv, first


def test_one_row_per_model_in_the_papers_layout(setup):
    root, _, res = setup
    assert [r["backbone"] for r in res["table"]] == ["trained", "random"]
    cols = list(res["table"][0])
    want = ["gene_expression: PCC random", "gene_expression: PCC loso", "gene_expression: PCC drop",
            "linear_probe: bal. acc", "retrieval: top-1", "retrieval: mAP@5", "mil: AUROC"]
    assert all(c in cols for c in want) and any(c.startswith("survival: c-index") for c in cols)
    assert cols.index(want[0]) < cols.index(want[3]) < cols.index(want[4])  # task order of the tasks file
    md = (root / "out" / "compare.md").read_text()
    assert "| backbone |" in md and "| trained |" in md and "| random |" in md
    assert (root / "out" / "compare.png").stat().st_size > 0
    # the cells are the per-task reports' numbers
    ge = json.loads((root / "out" / "eval" / "random" / "gene_expression" / "gene_expression.json").read_text())
    assert res["models"]["random"]["gene_expression"]["metrics"]["PCC loso"][0] == ge["modes"]["loso"]["summary"]["pcc_mean"]


def test_features_extracted_once_per_model_and_task_scripts_still_run_alone(setup):
    root, _, res = setup
    feats = root / "out" / "features"
    assert sorted(os.listdir(feats)) == ["random", "trained"]
    assert sorted(os.listdir(feats / "trained")) == ["hest", "patches.h5", "patches_mean.h5", "slides"]
    # linear_probe and retrieval share one feature file; the script run by hand gives the same number
    alone = linear_probe.main(["--features", str(feats / "trained" / "patches.h5"), "--out-dir", str(root / "alone")])
    assert alone["summary"]["balanced_accuracy"] == res["models"]["trained"]["linear_probe"]["metrics"]["bal. acc"][0]


def test_rerun_skips_finished_work_and_reruns_a_changed_task(setup):
    root, argv, first = setup
    again = compare.main(argv)
    assert all(e["skipped"] for per in again["models"].values() for e in per.values())
    assert again["table"] == first["table"]
    tasks = root / "data" / "compare_tasks.yaml"
    text = tasks.read_text()
    tasks.write_text(text.replace("- --split-key", "- --metric\n    - l2\n    - --split-key", 1))
    try:
        third = compare.main(argv)
    finally:
        tasks.write_text(text)
    skipped = {t: e["skipped"] for t, e in third["models"]["random"].items()}
    assert skipped == {"gene_expression": True, "linear_probe": True, "retrieval": False, "retrieval_mean_tokens": True,
                       "survival": True, "mil": True}


def test_a_different_checkpoint_under_the_same_label_is_refused(setup, tmp_path):
    import mambavision

    root, argv, _ = setup
    torch.manual_seed(6)
    other = tmp_path / "other.pth"
    torch.save(mambavision.create_model("mv_hybrid", **TINY).state_dict(), other)
    bad = [a.replace(str(root / "ckpt.pth"), str(other)) for a in argv]
    with pytest.raises(ValueError, match="was extracted differently"):
        compare.main(bad)


def test_bad_specs_are_named(tmp_path):
    with pytest.raises(ValueError, match="expected LABEL=ARCH:CHECKPOINT"):
        compare.parse_model("x=mv_hybrid", False, {})
    (tmp_path / "t.yaml").write_text("features: {f: {csv: a.csv, images: b}}\ntasks: {linear_probe: {features: f}}\n")
    with pytest.raises(ValueError, match="features.f needs exactly one of"):
        compare.load_tasks_file(str(tmp_path / "t.yaml"))
    (tmp_path / "t.yaml").write_text("features: {f: {csv: a.csv}}\ntasks: {x: {script: nope, features: f}}\n")
    with pytest.raises(ValueError, match="unknown script 'nope'"):
        compare.load_tasks_file(str(tmp_path / "t.yaml"))
