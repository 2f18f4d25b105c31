import json
import os

import numpy as np
import pandas as pd
import pytest

from eval.common import save_features_h5
from eval.slide_cv import validate_survival
from eval.survival import bootstrap_ci, coxnet_cv, gmm_stratify, logrank, main
from eval.slide_cv import cindex


def planted(n=150, d=12, seed=0, censor_rate=0.3):
    """Slide embeddings linear in a latent risk; times exponential with hazard exp(risk), random censoring."""
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    w = rng.normal(size=d)
    X = risk[:, None] * w[None] + 0.5 * rng.normal(size=(n, d))
    t_event = rng.exponential(1.0 / np.exp(risk))
    t_cens = rng.exponential(1.0 / censor_rate, size=n)
    return X, np.minimum(t_event, t_cens), (t_event <= t_cens).astype(int), risk


def harrell_bruteforce(time, event, risk):
    """Independent O(n^2) Harrell's C: pairs (i, j) with event_i and time_i < time_j; ties in risk count 1/2."""
    num = den = 0.0
    for i in range(len(time)):
        if not event[i]:
            continue
        for j in range(len(time)):
            if time[i] < time[j]:
                den += 1
                num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return num / den


def test_cindex_matches_bruteforce():
    X, t, e, risk = planted(n=40, seed=1)
    noisy = risk + np.random.default_rng(2).normal(size=40)
    assert cindex(t, e, noisy) == pytest.approx(harrell_bruteforce(t, e, noisy), abs=1e-12)
    assert cindex(t, e, -t) == pytest.approx(1.0)  # higher risk = earlier time


def test_coxnet_planted_risk_beats_shuffled():
    X, t, e, _ = planted()
    patients = np.arange(len(t)) // 2  # two slides per patient
    res = coxnet_cv(lambda tr, k: X, t, e, patients, alphas=(0.02,), n_folds=4, n_boot=50, seed=0)["alphas"][0.02]
    assert res["c_index_mean"] > 0.65 and res["pooled_c_index"] > 0.65
    assert res["bootstrap_ci95"]["low"] <= res["pooled_c_index"] <= res["bootstrap_ci95"]["high"]
    assert res["bootstrap_ci95"]["low"] > 0.55
    perm = np.random.default_rng(3).permutation(len(t))
    null = coxnet_cv(lambda tr, k: X, t[perm], e[perm], patients, alphas=(0.02,), n_folds=4, n_boot=10, seed=0)
    assert abs(null["alphas"][0.02]["pooled_c_index"] - 0.5) < 0.12


def test_folds_group_patients():
    X, t, e, _ = planted(n=60)
    patients = np.arange(60) // 3
    seen = []

    def embed(tr, k):
        seen.append(set(patients[tr]))
        return X

    coxnet_cv(embed, t, e, patients, alphas=(0.07,), n_folds=3, n_boot=5)
    assert len(seen) == 3
    all_pat = set(patients)
    for s in seen:  # each fold's test patients are exactly the complement of its training patients
        assert len(all_pat - s) > 0 and s.isdisjoint(all_pat - s)


def test_bootstrap_ci_degenerates_on_perfect_risk():
    _, t, e, _ = planted(n=50)
    ci = bootstrap_ci(t, e, -t, n_boot=30, seed=0)
    assert ci["low"] == pytest.approx(1.0) and ci["high"] == pytest.approx(1.0) and ci["n"] == 30


def test_gmm_logrank_on_planted_groups_and_matches_lifelines():
    from lifelines.statistics import logrank_test

    rng = np.random.default_rng(0)
    g = np.repeat([0, 1], 60)
    X = rng.normal(size=(120, 8)) + 6.0 * g[:, None]
    t = rng.exponential(1.0 / np.where(g == 1, 4.0, 1.0))
    e = (rng.random(120) < 0.8).astype(int)
    res = gmm_stratify(X, n_components=None, component_range=(2, 3), pca_components=4, seed=0)
    assert res["n_components"] == 2
    agree = (res["labels"] == g).mean()
    assert agree in (0.0, 1.0)  # clusters recover the planted groups exactly (up to naming)
    lr = logrank(t, e, res["labels"])
    assert lr["p_value"] < 1e-4
    ref = logrank_test(t[g == 0], t[g == 1], event_observed_A=e[g == 0], event_observed_B=e[g == 1])
    assert lr["p_value"] == pytest.approx(ref.p_value, rel=1e-9)
    assert lr["statistic"] == pytest.approx(ref.test_statistic, rel=1e-9)


def test_validate_survival_errors():
    df = pd.DataFrame({"slide_id": ["a", "b", "c"], "time": [1.0, 2.0, 3.0], "event": [1, 0, 1]})
    assert validate_survival(df, "time", "event")["event"].tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match=r"negative 'time'.*\['b'\]"):
        validate_survival(df.assign(time=[1.0, -2.0, 3.0]), "time", "event")
    with pytest.raises(ValueError, match=r"missing or non-numeric 'time'.*\['c'\]"):
        validate_survival(df.assign(time=[1.0, 2.0, None]), "time", "event")
    with pytest.raises(ValueError, match="all 3 slides are censored"):
        validate_survival(df.assign(event=[0, 0, 0]), "time", "event")
    with pytest.raises(ValueError, match=r"must be 0/1.*\['a'\]"):
        validate_survival(df.assign(event=[2, 0, 1]), "time", "event")


def _write_slides(tmp_path, n=60, patches=6, d=8, seed=0):
    X, t, e, _ = planted(n=n, d=d, seed=seed)
    rng = np.random.default_rng(seed)
    fdir = tmp_path / "feats"
    fdir.mkdir()
    ids = [f"slide{i:03d}" for i in range(n)]
    for i, sid in enumerate(ids):
        feats = X[i][None] + 0.3 * rng.normal(size=(patches, d))
        save_features_h5(str(fdir / f"{sid}.h5"), feats, coords=np.zeros((patches, 2), int))
    csv = tmp_path / "clin.csv"
    pd.DataFrame({"slide_id": ids, "patient_id": [f"p{i // 2}" for i in range(n)], "time": t, "event": e}).to_csv(csv, index=False)
    return fdir, csv


def test_cli_end_to_end_and_partial(tmp_path):
    fdir, csv = _write_slides(tmp_path)
    out = tmp_path / "out"
    res = main(["--features-dir", str(fdir), "--clinical", str(csv), "--out-dir", str(out), "--folds", "3",
                "--bootstraps", "20", "--gmm-range", "2", "3", "--pca-components", "3"])
    assert res["n_slides"] == 60
    assert res["coxnet"]["alphas"]["0.02"]["pooled_c_index"] > 0.6
    assert 0 <= res["gmm"]["logrank"]["p_value"] <= 1
    for f in ("survival.json", "survival.md", "km_gmm.png", "coxnet_cindex.png"):
        assert (out / f).stat().st_size > 0
    saved = json.loads((out / "survival.json").read_text())
    assert set(saved["coxnet"]["alphas"]) == {"0.01", "0.02", "0.07"}

    os.remove(fdir / "slide007.h5")
    with pytest.raises(ValueError, match="slide007"):
        main(["--features-dir", str(fdir), "--clinical", str(csv), "--out-dir", str(out)])
    res = main(["--features-dir", str(fdir), "--clinical", str(csv), "--out-dir", str(out), "--allow-partial",
                "--analyses", "gmm", "--gmm-components", "2"])
    assert res["n_slides"] == 59 and res["gmm"]["n_components"] == 2


def test_cli_abmil_pooling(tmp_path):
    fdir, csv = _write_slides(tmp_path, n=40, patches=5, d=8)
    res = main(["--features-dir", str(fdir), "--clinical", str(csv), "--out-dir", str(tmp_path / "o"), "--analyses", "coxnet",
                "--pooling", "abmil", "--abmil-epochs", "2", "--abmil-hidden", "8", "--folds", "2", "--bootstraps", "5",
                "--alphas", "0.02"])
    c = res["coxnet"]["alphas"]["0.02"]["pooled_c_index"]
    assert res["coxnet"]["pooling"] == "abmil" and 0.0 <= c <= 1.0
