import json

import numpy as np
import pandas as pd
import pytest
import torch

from eval.abmil import ABMILConfig, GatedABMIL, class_weights, cox_ph_loss, predict_abmil, train_abmil
from eval.common import load_features_h5, save_features_h5
from eval.mil import main, run_mil_cv
from eval.slide_cv import BagStore



@pytest.fixture(autouse=True)
def _one_thread():
    """Thousands of tiny optimiser steps: intra-op threads only add contention on a shared 2-core box."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


TINY = ABMILConfig(hidden=16, dropout=0.0, epochs=10, lr=1e-2, bag_size=64)


def synthetic_bags(n=48, d=8, seed=0):
    """Negative bags: N(0,1) instances. Positive bags: the same plus 3 instances shifted along one direction."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    bags = []
    for y in labels:
        bag = rng.normal(size=(int(rng.integers(20, 40)), d))
        if y:
            bag[:3, 0] += 4.0
        bags.append(torch.tensor(rng.permutation(bag), dtype=torch.float32))
    return bags, labels


def test_attention_is_a_distribution_and_pool_shape():
    m = GatedABMIL(8, 3, hidden=16, n_heads=2).eval()
    logits, attn = m(torch.randn(1, 11, 8))
    assert logits.shape == (3,) and attn.shape == (2, 11)
    torch.testing.assert_close(attn.sum(1), torch.ones(2))
    assert m.pool(torch.randn(11, 8)).shape == (32,)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        m(torch.randn(5, 7))


def test_cox_loss_matches_bruteforce():
    g = torch.Generator().manual_seed(0)
    risk = torch.randn(9, generator=g, dtype=torch.float64)
    time = torch.tensor([5.0, 3, 3, 8, 1, 9, 2, 7, 4], dtype=torch.float64)
    event = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0, 1], dtype=torch.float64)
    ref = 0.0
    for i in range(9):
        if event[i]:
            ref -= risk[i] - torch.log(torch.exp(risk[time >= time[i]]).sum())
    assert cox_ph_loss(risk, time, event).item() == pytest.approx((ref / event.sum()).item(), rel=1e-12)
    assert cox_ph_loss(risk, time, torch.zeros(9)).item() == 0.0


def test_class_weights_balance():
    w = class_weights(np.array([0, 0, 0, 1]), 2)
    np.testing.assert_allclose(w, [4 / 6, 2.0])
    assert (np.bincount([0, 0, 0, 1]) * w).tolist() == pytest.approx([2.0, 2.0])


def test_abmil_learns_planted_instances_and_not_shuffled():
    bags, labels = synthetic_bags()
    res = run_mil_cv(lambda i: bags[i], len(bags), "classification", labels=labels, n_classes=2, n_folds=3, cfg=TINY, seed=0)
    assert res["summary"]["auroc"]["mean"] > 0.9
    # attention concentrates on the planted positive instances
    pos = [i for i in range(len(bags)) if labels[i] == 1]
    top_is_planted = [bags[i][int(np.argmax(res["attention"][i][0])), 0].item() > 2.0 for i in pos]
    assert np.mean(top_is_planted) > 0.8

    shuffled = np.random.default_rng(1).permutation(labels)
    quick = ABMILConfig(hidden=16, dropout=0.0, epochs=5, lr=1e-2, bag_size=64)  # enough to fit the real signal above
    null = run_mil_cv(lambda i: bags[i], len(bags), "classification", labels=shuffled, n_classes=2, n_folds=3, cfg=quick, seed=0)
    assert abs(null["summary"]["auroc"]["mean"] - 0.5) < 0.25


def test_training_is_deterministic_for_a_seed():
    bags, labels = synthetic_bags(n=12)
    outs = []
    for _ in range(2):
        m = train_abmil(lambda i: bags[i], range(12), 8, "classification", labels=labels, cfg=TINY, seed=5)
        outs.append(predict_abmil(m, lambda i: bags[i], range(12))[0])
    np.testing.assert_array_equal(outs[0], outs[1])


def test_subnormals_are_flushed_while_training_and_predicting_only(monkeypatch):
    """Regression: subnormal arithmetic made ABMIL folds on the demo's slides 50x slower on CPU."""
    bags, labels = synthetic_bags(n=6)
    flushed = []
    forward = GatedABMIL.attend

    def spy(self, bag):
        flushed.append((torch.tensor([1e-39]) * 1.0).item() == 0.0)
        return forward(self, bag)

    monkeypatch.setattr(GatedABMIL, "attend", spy)
    m = train_abmil(lambda i: bags[i], range(6), 8, "classification", labels=labels, cfg=TINY, seed=0)
    predict_abmil(m, lambda i: bags[i], range(6))
    assert flushed and all(flushed)
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0  # the process default is back afterwards


def test_survival_head_learns_planted_risk():
    rng = np.random.default_rng(0)
    n = 60
    risk = rng.normal(size=n)
    bags = [torch.tensor(rng.normal(size=(10, 6)) + risk[i] * np.eye(6)[0], dtype=torch.float32) for i in range(n)]
    t = rng.exponential(1 / np.exp(1.5 * risk))
    e = (rng.random(n) < 0.85).astype(int)
    cfg = ABMILConfig(hidden=16, dropout=0.0, epochs=8, lr=3e-3, cox_batch=16)
    res = run_mil_cv(lambda i: bags[i], len(bags), "survival", times=t, events=e, n_folds=3, cfg=cfg, seed=0)
    assert res["summary"]["c_index"]["mean"] > 0.65


def _write(tmp_path, bags, labels, patients):
    fdir = tmp_path / "feats"
    fdir.mkdir()
    ids = [f"s{i:02d}" for i in range(len(bags))]
    for sid, b in zip(ids, bags):
        save_features_h5(str(fdir / f"{sid}.h5"), b.numpy(), coords=np.arange(2 * len(b)).reshape(-1, 2))
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"slide_id": ids, "label": np.where(labels == 1, "MSI", "MSS"), "patient_id": patients}).to_csv(csv, index=False)
    return fdir, csv, ids


def test_cli_end_to_end_with_attention(tmp_path):
    bags, labels = synthetic_bags(n=24)
    fdir, csv, ids = _write(tmp_path, bags, labels, [f"p{i // 2}" for i in range(24)])
    out = tmp_path / "out"
    res = main(["--features-dir", str(fdir), "--csv", str(csv), "--out-dir", str(out), "--folds", "3", "--epochs", "4",
                "--hidden", "16", "--dropout", "0", "--lr", "3e-3", "--save-attention"])
    assert res["classes"] == ["MSI", "MSS"] and res["n_patients"] == 12
    assert 0.0 <= res["summary"]["auroc"]["mean"] <= 1.0
    assert json.loads((out / "mil.json").read_text())["summary"]["balanced_acc"]["mean"] is not None
    assert (out / "mil.md").read_text().startswith("# ABMIL classification")
    assert (out / "mil_roc.png").stat().st_size > 0
    att = load_features_h5(str(out / "attention" / f"{ids[3]}.h5"))
    assert att["features"].shape == (len(bags[3]), 1) and att["coords"].shape == (len(bags[3]), 2)
    np.testing.assert_allclose(att["features"].sum(), 1.0, rtol=1e-5)


def test_cli_mismatch_and_bad_file_errors(tmp_path):
    bags, labels = synthetic_bags(n=8)
    fdir, csv, ids = _write(tmp_path, bags, labels, [f"p{i}" for i in range(8)])
    save_features_h5(str(fdir / "stray.h5"), np.zeros((2, 8)))
    with pytest.raises(ValueError, match="stray"):
        main(["--features-dir", str(fdir), "--csv", str(csv), "--out-dir", str(tmp_path / "o")])
    (fdir / "stray.h5").unlink()
    (fdir / f"{ids[0]}.h5").write_bytes(b"not an h5 file")
    with pytest.raises(OSError, match=ids[0]):
        BagStore([str(fdir / f"{ids[0]}.h5")])
    with pytest.raises(KeyError, match="label_x"):
        main(["--features-dir", str(fdir), "--csv", str(csv), "--label-key", "label_x", "--out-dir", str(tmp_path / "o")])


def test_training_bags_are_subsampled_to_bag_size():
    from eval.abmil import _subsample

    bag = torch.arange(50, dtype=torch.float32)[:, None].repeat(1, 3)
    sub = _subsample(bag, 8, torch.Generator().manual_seed(0))
    assert sub.shape == (8, 3) and len(set(sub[:, 0].tolist())) == 8
    assert torch.equal(_subsample(bag, 0, torch.Generator()), bag) and torch.equal(_subsample(bag, 64, torch.Generator()), bag)


def test_cli_survival_task(tmp_path):
    rng = np.random.default_rng(0)
    bags = [torch.tensor(rng.normal(size=(6, 4)), dtype=torch.float32) for _ in range(16)]
    fdir, csv, ids = _write(tmp_path, bags, np.zeros(16, int), [f"p{i}" for i in range(16)])
    df = pd.read_csv(csv).assign(time=rng.exponential(size=16), event=np.arange(16) % 2)
    df.to_csv(csv, index=False)
    res = main(["--features-dir", str(fdir), "--csv", str(csv), "--task", "survival", "--folds", "2", "--epochs", "1",
                "--hidden", "8", "--out-dir", str(tmp_path / "o")])
    assert res["task"] == "survival" and len(res["folds"]) == 2 and 0 <= res["summary"]["c_index"]["mean"] <= 1
    df.assign(event=0).to_csv(csv, index=False)
    with pytest.raises(ValueError, match="censored"):
        main(["--features-dir", str(fdir), "--csv", str(csv), "--task", "survival", "--out-dir", str(tmp_path / "o")])
