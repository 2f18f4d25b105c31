"""Issue 15, item 9: bad eval inputs get errors naming the file, split or class; degenerate results get a
warning in the console and in the report."""
import json
import logging

import numpy as np
import pytest

from eval import common
from eval import gene_expression as ge
from eval import linear_probe as lp
from eval import retrieval as rt
from eval.common import save_features_h5

from test_gene_expression import make_hest_task  # noqa: E402  (tests/eval is on sys.path under pytest)


def _classes(n=60, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.array(["a", "b", "c"]), n // 3)
    x = rng.normal(size=(n, dim)).astype(np.float32) + (np.arange(n) % 3 == 0)[:, None]
    split = np.array(["train", "val", "test"])[np.arange(n) % 3]
    return x, y, split


def _report(out_dir, name):
    return open(f"{out_dir}/{name}.md").read(), json.load(open(f"{out_dir}/{name}.json"))


@pytest.fixture
def eval_log(caplog):
    common.setup_logging()
    common.LOG.propagate = True  # let caplog see the eval logger
    caplog.set_level(logging.WARNING, logger="eval")
    yield caplog
    common.LOG.propagate = False


# ------------------------------------------------------------------------------------------ errors
def test_gene_expression_nan_features_name_the_file(tmp_path):
    task, feats, _, _ = make_hest_task(str(tmp_path))
    f = common.load_features_h5(f"{feats}/S1_0.h5")
    x = f["features"].copy()
    x[3, 2] = np.nan
    x[7, 0] = np.inf
    save_features_h5(f"{feats}/S1_0.h5", x, barcode=f["barcode"])
    with pytest.raises(ValueError, match=r"S1_0.h5: features contain NaN or inf in 2 of 60 rows \(first rows \[3, 7\]\)"):
        ge.main(["--task-dir", task, "--features-dir", feats, "--out-dir", str(tmp_path / "o")])


def test_gene_expression_mismatched_widths_name_the_samples(tmp_path):
    task, feats, _, _ = make_hest_task(str(tmp_path))
    f = common.load_features_h5(f"{feats}/S2_1.h5")
    save_features_h5(f"{feats}/S2_1.h5", f["features"][:, :10], barcode=f["barcode"])
    with pytest.raises(ValueError, match=r"feature files of different widths \(width 10: S2_1; width 24: S0_0"):
        ge.main(["--task-dir", task, "--features-dir", feats, "--out-dir", str(tmp_path / "o")])


def test_linear_probe_nan_features_and_one_class_training_split(tmp_path):
    x, y, split = _classes()
    bad = x.copy()
    bad[5] = np.nan
    save_features_h5(str(tmp_path / "nan.h5"), bad, label=y, split=split)
    with pytest.raises(ValueError, match=r"nan.h5: features contain NaN or inf in 1 of 60 rows"):
        lp.main(["--features", str(tmp_path / "nan.h5"), "--out-dir", str(tmp_path / "o")])
    y1 = np.where(split == "train", "a", y)
    save_features_h5(str(tmp_path / "one.h5"), x, label=y1, split=split)
    with pytest.raises(ValueError, match=r"one.h5: the training split holds only class 'a' \(20 rows\)"):
        lp.main(["--features", str(tmp_path / "one.h5"), "--out-dir", str(tmp_path / "o")])


def test_retrieval_width_mismatch_names_both_files(tmp_path):
    x, y, _ = _classes()
    save_features_h5(str(tmp_path / "q.h5"), x, label=y)
    save_features_h5(str(tmp_path / "d.h5"), x[:, :4], label=y)
    with pytest.raises(ValueError, match=r"q.h5 vs .*d.h5: query features are 8-wide, database features 4-wide"):
        rt.main(["--query", str(tmp_path / "q.h5"), "--database", str(tmp_path / "d.h5"), "--out-dir", str(tmp_path / "o")])


def test_output_folder_that_is_a_file_is_named(tmp_path):
    x, y, split = _classes()
    save_features_h5(str(tmp_path / "f.h5"), x, label=y, split=split)
    (tmp_path / "taken").write_text("x")
    with pytest.raises(NotADirectoryError, match="output folder .*taken exists and is a file"):
        lp.main(["--features", str(tmp_path / "f.h5"), "--out-dir", str(tmp_path / "taken")])


# ------------------------------------------------------------------------------------------ warnings
def test_all_zero_features_warn_in_console_and_report(tmp_path, eval_log):
    x, y, split = _classes()
    save_features_h5(str(tmp_path / "z.h5"), np.zeros_like(x), label=y, split=split)
    out = str(tmp_path / "o")
    rt.main(["--features", str(tmp_path / "z.h5"), "--split-key", "split", "--out-dir", out])
    md, js = _report(out, "retrieval")
    assert "every feature is zero" in md and any("every feature is zero" in w for w in js["warnings"])
    assert "every feature is zero" in eval_log.text


def test_constant_features_warn(tmp_path, eval_log):
    x, y, split = _classes()
    save_features_h5(str(tmp_path / "c.h5"), np.ones_like(x), label=y, split=split)
    lp.main(["--features", str(tmp_path / "c.h5"), "--out-dir", str(tmp_path / "o"), "--c-grid", "1"])
    md, _ = _report(str(tmp_path / "o"), "linear_probe")
    assert "feature rows are identical (constant features)" in md and "constant features" in eval_log.text


def test_query_equal_database_warns(tmp_path, eval_log):
    x, y, _ = _classes()
    save_features_h5(str(tmp_path / "q.h5"), x, label=y)
    out = str(tmp_path / "o")
    res = rt.main(["--query", str(tmp_path / "q.h5"), "--database", str(tmp_path / "q.h5"), "--out-dir", out])
    assert res["knn"]["overall"]["top1_acc"] == 1.0
    md, js = _report(out, "retrieval")
    assert "same file" in md and "query and database are the same rows" in md
    assert "every query retrieves itself" in eval_log.text


def test_class_missing_from_test_and_nan_auroc_warn(tmp_path, eval_log):
    x, y, split = _classes()
    y2 = y.copy()
    y2[(split == "test") & (y == "c")] = "a"  # class c only in train/val
    save_features_h5(str(tmp_path / "m.h5"), x, label=y2, split=split)
    lp.main(["--features", str(tmp_path / "m.h5"), "--out-dir", str(tmp_path / "o")])
    md, js = _report(str(tmp_path / "o"), "linear_probe")
    assert "class(es) ['c'] absent from the test split" in md
    y3 = y.copy()
    y3[split == "test"] = "b"  # one-class test split: AUROC undefined
    save_features_h5(str(tmp_path / "n.h5"), x, label=y3, split=split)
    lp.main(["--features", str(tmp_path / "n.h5"), "--out-dir", str(tmp_path / "o2")])
    md, js = _report(str(tmp_path / "o2"), "linear_probe")
    assert js["summary"]["macro_auroc"] is None and "AUROC undefined (nan)" in md
    assert "AUROC undefined" in eval_log.text
