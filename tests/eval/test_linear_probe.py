import json
import os

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from eval import linear_probe as lp
from eval.common import save_features_h5


def _blobs(n_per_class=40, n_classes=3, dim=16, sep=4.0, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim)) * sep
    y = np.repeat(np.arange(n_classes), n_per_class)
    x = centers[y] + rng.normal(size=(len(y), dim))
    names = np.array(["adenoma", "normal", "serrated", "tumor"])[:n_classes]
    split = np.array(["train", "val", "test"])[np.arange(len(y)) % 3]
    return x.astype(np.float32), names[y], split


def test_separable_features_high_accuracy_and_outputs(tmp_path):
    x, y, split = _blobs()
    f = str(tmp_path / "f.h5")
    save_features_h5(f, x, label=y, split=split, path=np.array([f"p{i}.png" for i in range(len(y))]))
    out = lp.main(["--features", f, "--out-dir", str(tmp_path / "o"), "--c-grid", "0.01,1,100"])
    assert out["summary"]["balanced_accuracy"] > 0.95 and out["summary"]["macro_auroc"] > 0.99
    assert out["classes"] == ["adenoma", "normal", "serrated"]
    for name in ("linear_probe.json", "linear_probe.md", "linear_probe_confusion.png", "linear_probe_predictions.csv"):
        assert os.path.getsize(tmp_path / "o" / name) > 0
    pred = pd.read_csv(tmp_path / "o" / "linear_probe_predictions.csv")
    assert len(pred) == (split == "test").sum() and pred["path"].str.startswith("p").all()
    assert json.load(open(tmp_path / "o" / "linear_probe.json"))["seed"] == 0


def test_shuffled_labels_are_at_chance():
    x, y, split = _blobs(n_per_class=60)
    y = np.random.default_rng(1).permutation(y)
    res = lp.run_probe(x, y, split, c_grid=[0.01, 1.0])
    assert abs(res["summary"]["balanced_accuracy"] - 1 / 3) < 0.15
    assert abs(res["summary"]["macro_auroc"] - 0.5) < 0.15


@pytest.mark.parametrize("n_classes", [2, 3])
def test_metrics_equal_direct_sklearn(n_classes):
    x, y, split = _blobs(n_classes=n_classes, sep=0.6, seed=n_classes)  # overlapping: imperfect predictions
    res = lp.run_probe(x, y, split, c_grid=[0.001, 0.1, 10.0])
    c = res["folds"][0]["C"]
    # the C picked is the best on val, computed directly
    best = max([0.001, 0.1, 10.0], key=lambda cc: (balanced_accuracy_score(
        y[split == "val"], LogisticRegression(C=cc, class_weight="balanced", max_iter=10000, random_state=0)
        .fit(x[split == "train"], y[split == "train"]).predict(x[split == "val"])), -abs(np.log10(cc))))
    assert c == best
    m = LogisticRegression(C=c, class_weight="balanced", max_iter=10000, random_state=0).fit(x[split == "train"], y[split == "train"])
    yt, pred, proba = y[split == "test"], m.predict(x[split == "test"]), m.predict_proba(x[split == "test"])
    s = res["summary"]
    assert s["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(yt, pred), abs=1e-12)
    assert s["macro_f1"] == pytest.approx(f1_score(yt, pred, average="macro"), abs=1e-12)
    assert s["weighted_f1"] == pytest.approx(f1_score(yt, pred, average="weighted"), abs=1e-12)
    auc = roc_auc_score(yt, proba[:, 1]) if n_classes == 2 else roc_auc_score(yt, proba, multi_class="ovr", average="macro")
    assert s["macro_auroc"] == pytest.approx(auc, abs=1e-9)
    assert 0.4 < s["balanced_accuracy"] < 1.0


def test_cv_modes(tmp_path):
    x, y, split = _blobs(n_per_class=18, dim=8)
    # C by stratified CV on train, evaluated on test
    res = lp.run_probe(x, y, split, cv=3, c_grid=[0.01, 1.0])
    assert len(res["folds"]) == 1 and len(res["folds"][0]["c_search"]) == 2 and res["summary"]["balanced_accuracy"] > 0.9
    # no split column: outer stratified K-fold, every sample tested once
    f = str(tmp_path / "f.h5")
    save_features_h5(f, x, label=y)
    out = lp.main(["--features", f, "--cv", "3", "--c-grid", "0.1,1", "--out-dir", str(tmp_path / "o")])
    assert len(out["folds"]) == 3 and sum(r["n_test"] for r in out["folds"]) == len(y)
    assert "mean ± std" in open(tmp_path / "o" / "linear_probe.md").read()


def test_clear_errors(tmp_path):
    x, y, split = _blobs()
    with pytest.raises(ValueError, match="at least 2 classes"):
        lp.run_probe(x, np.zeros(len(y)), split)
    with pytest.raises(ValueError, match="other than train/val/test"):
        lp.run_probe(x, y, np.where(split == "val", "valid", split))
    with pytest.raises(ValueError, match="--cv K"):
        lp.run_probe(x, y, None)
    with pytest.raises(ValueError, match="no 'val' rows"):
        lp.run_probe(x, y, np.where(split == "val", "train", split))
    f = str(tmp_path / "f.h5")
    save_features_h5(f, x, target=y)
    with pytest.raises(KeyError, match="no 'label' dataset"):
        lp.main(["--features", f, "--out-dir", str(tmp_path / "o")])


# ---------------------------------------------------------------- named protocols
def test_patho_bench_protocol_is_one_balanced_c_fitted_on_train():
    x, y, split = _blobs(n_per_class=30, sep=1.0)
    res = lp.run_probe(x, y, split, protocol="patho-bench")
    tr, te = split == "train", split == "test"
    codes = np.unique(y, return_inverse=True)[1]
    ref = LogisticRegression(C=0.5, max_iter=10000, random_state=0, class_weight="balanced").fit(
        x[tr].astype(np.float64), codes[tr])
    assert res["folds"][0]["C"] == 0.5 and res["folds"][0]["n_train"] == tr.sum()
    np.testing.assert_allclose(res["test_proba"], ref.predict_proba(x[te].astype(np.float64)), atol=1e-12)


def test_dinov2_protocol_sweeps_45_c_by_top1_and_refits_on_train_val():
    x, y, split = _blobs(n_per_class=24, sep=0.8, seed=2)
    res = lp.run_probe(x, y, split, protocol="dinov2")
    grid = 10.0 ** np.linspace(-6, 5, 45)
    np.testing.assert_allclose(res["c_grid"], grid)
    codes = np.unique(y, return_inverse=True)[1]
    tr, va, te = (split == s for s in ("train", "val", "test"))
    acc = [np.mean(LogisticRegression(C=c, max_iter=1000, tol=1e-12).fit(x[tr].astype(np.float64), codes[tr])
                   .predict(x[va].astype(np.float64)) == codes[va]) for c in grid]
    best = grid[int(np.argmax(acc))]
    assert res["folds"][0]["C"] == pytest.approx(best)
    assert res["folds"][0]["n_train"] == tr.sum() + va.sum()  # refit on train + the tuning set
    ref = LogisticRegression(C=best, max_iter=1000, tol=1e-12).fit(x[tr | va].astype(np.float64), codes[tr | va])
    np.testing.assert_allclose(res["test_proba"], ref.predict_proba(x[te].astype(np.float64)), atol=1e-8)


def test_dinov2_without_val_tunes_on_a_tenth_of_train():
    x, y, split = _blobs(n_per_class=30)
    split = np.where(split == "val", "train", split)
    res = lp.run_probe(x, y, split, protocol="dinov2")
    assert res["folds"][0]["n_train"] == (split == "train").sum()  # tuning tenth folded back in for the refit


def test_protocol_is_stated_in_help_and_report(tmp_path, capsys):
    with pytest.raises(SystemExit):
        lp.main(["--help"])
    assert "sweep (default" in " ".join(capsys.readouterr().out.split())
    x, y, split = _blobs()
    f = str(tmp_path / "f.h5")
    save_features_h5(f, x, label=y, split=split)
    lp.main(["--features", f, "--out-dir", str(tmp_path / "o"), "--protocol", "patho-bench"])
    md = open(tmp_path / "o" / "linear_probe.md").read()
    assert "Protocol 'patho-bench' (default 'sweep'; follows mahmoodlab/Patho-Bench" in md
    assert json.load(open(tmp_path / "o" / "linear_probe.json"))["protocol"] == "patho-bench"
