import json
import os

import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from scipy.stats import pearsonr

from eval import gene_expression as ge
from eval.common import save_features_h5


def make_hest_task(root, n_studies=3, samples_per_study=2, spots=60, dim=24, n_informative=6, n_noise=4,
                   n_extra=10, batch=0.0, signal=0.8, seed=0):
    """Write ``root/task`` (adata, splits, var_50genes.json, meta.csv) and ``root/feats`` ({sample}.h5).

    Informative genes have log-rate linear in a latent z that is also (noisily) mixed into the
    features; noise genes are Poisson with a constant rate. ``batch`` adds a per-study offset to
    both the features and the informative genes' log-rate (a study batch effect).
    Returns (task_dir, feats_dir, informative gene names, noise gene names).
    """
    import anndata

    rng = np.random.default_rng(seed)
    task, feats = os.path.join(root, "task"), os.path.join(root, "feats")
    os.makedirs(os.path.join(task, "adata"))
    os.makedirs(os.path.join(task, "splits"))
    os.makedirs(feats)
    latent = 3
    mix = rng.normal(size=(latent, dim))
    w = rng.normal(size=(latent, n_informative)) * signal
    informative = [f"INF{i}" for i in range(n_informative)]
    noise = [f"NOISE{i}" for i in range(n_noise)]
    extra = [f"EXTRA{i}" for i in range(n_extra)]
    genes = informative + noise + extra
    meta, samples = [], []
    for s in range(n_studies):
        study = f"study{s}"
        f_shift = rng.normal(size=dim) * 2.0 * batch
        g_shift = rng.normal(size=n_informative) * batch
        for j in range(samples_per_study):
            sid = f"S{s}_{j}"
            z = rng.normal(size=(spots, latent))
            x = z @ mix + 0.5 * rng.normal(size=(spots, dim)) + f_shift
            rate_inf = np.exp(1.0 + z @ w + g_shift)
            rate = np.concatenate([rate_inf, np.full((spots, n_noise), 3.0), np.full((spots, n_extra), 0.5)], axis=1)
            counts = rng.poisson(rate).astype(np.float32)
            barcodes = np.array([f"{sid}-bc{i}" for i in range(spots)])
            ad = anndata.AnnData(X=counts, obs=pd.DataFrame({"study": study, "sample_id": sid}, index=barcodes),
                                 var=pd.DataFrame(index=genes))
            ad.write_h5ad(os.path.join(task, "adata", f"{sid}.h5ad"))
            perm = rng.permutation(spots)  # feature rows in another order than expression rows
            save_features_h5(os.path.join(feats, f"{sid}.h5"), x[perm].astype(np.float32), barcode=barcodes[perm],
                             coords=np.stack([perm, perm], 1))
            meta.append({"sample_id": sid, "study": study})
            samples.append(sid)
    pd.DataFrame(meta).to_csv(os.path.join(task, "meta.csv"), index=False)
    # two HEST-style patient splits: hold out the first / last sample of each study
    for k, pick in enumerate((0, samples_per_study - 1)):
        test = [s for s in samples if s.endswith(f"_{pick}")]
        for name, ids in (("train", [s for s in samples if s not in test]), ("test", test)):
            pd.DataFrame({"sample_id": ids, "patches_path": [f"patches/{i}.h5" for i in ids],
                          "expr_path": [f"adata/{i}.h5ad" for i in ids]}).to_csv(
                os.path.join(task, "splits", f"{name}_{k}.csv"), index=False)
    with open(os.path.join(task, "var_50genes.json"), "w") as f:
        json.dump({"genes": informative + noise}, f)
    return task, feats, informative, noise


# ---------------------------------------------------------------- the protocol's building blocks
def test_vectorised_pearson_equals_scipy_and_flags_constant_columns():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(50, 5))
    p = y + rng.normal(size=(50, 5))
    y[:, 3] = 2.0  # constant gene on the test fold
    r = ge.pearson_per_column(y, p)
    for j in (0, 1, 2, 4):
        assert abs(r[j] - pearsonr(y[:, j], p[:, j])[0]) < 1e-12
    assert np.isnan(r[3])


def test_compressed_ridge_lsqr_equals_sklearn_on_full_data():
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 20)) * np.linspace(3, 0.3, 20)
    y = 2.0 + x[:, :3] @ rng.normal(size=(3, 7)) + rng.normal(size=(400, 7))  # uncentred, like log1p targets
    alpha = 100 / (20 * 7)
    ref = Ridge(solver="lsqr", alpha=alpha, fit_intercept=False, max_iter=1000, random_state=0).fit(x, y).coef_
    ours = ge.ridge_lsqr(x, y, alpha, seed=0)
    exact = np.linalg.solve(x.T @ x + alpha * np.eye(20), x.T @ y).T
    # same LSQR iterates up to rounding: far closer to sklearn's answer than either is to the exact ridge
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref - exact).max()


def load_h5(path):
    import h5py

    with h5py.File(path, "r") as f:
        return {"features": f["features"][()], "barcode": [b.decode() for b in f["barcode"][()]]}


def test_hest_fold_caps_pcs_at_256_and_reduces_on_small_folds():
    """(Equality with HEST's own code path: tests/eval/test_hest_transcription.py.)"""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 260)).astype(np.float32)
    y = np.log1p(rng.poisson(np.exp(0.5 + 0.3 * x[:, :5] @ rng.normal(size=(5, 8)) / 3)).astype(np.float64))
    res = ge.hest_fold(x[:320], x[320:], y[:320], y[320:])
    assert res["n_components"] == 256 and res["alpha"] == pytest.approx(100 / (256 * 8))
    small = ge.hest_fold(x[:100, :40], x[320:, :40], y[:100], y[320:])
    assert small["n_components"] == 40 and small["alpha"] == pytest.approx(100 / (40 * 8))
    fast = ge.hest_fold(x[:320], x[320:], y[:320], y[320:], ridge="fast")
    np.testing.assert_allclose(fast["pearson"], res["pearson"], atol=2e-3)


# ---------------------------------------------------------------- protocol behaviour on planted signal
def test_planted_signal_informative_above_noise(tmp_path):
    task, feats, inf, noise = make_hest_task(str(tmp_path), spots=80)
    res = ge.main(["--task-dir", task, "--features-dir", feats, "--split", "random", "--folds", "3",
                   "--genes", "var50", "--out-dir", str(tmp_path / "o")])
    means = pd.read_csv(tmp_path / "o" / "gene_expression_per_gene_mean.csv").set_index("gene")
    assert means.loc[inf, "pearson_mean"].min() > 0.3
    assert means.loc[noise, "pearson_mean"].abs().max() < 0.15
    s = res["modes"]["random"]["summary"]
    assert s["n_folds"] == 3 and s["pcc10_mean"] >= s["pcc_mean"]
    assert res["modes"]["random"]["folds"][0]["pca_solver"]


def test_loso_lower_than_random_with_batch_effect_and_drop(tmp_path):
    # study offsets shared by features and expression: predictable across pooled studies (random
    # split) but not within a held-out study (LOSO)
    task, feats, inf, _ = make_hest_task(str(tmp_path), batch=1.5, signal=0.3, spots=50)
    out = str(tmp_path / "o")
    res = ge.main(["--task-dir", task, "--features-dir", feats, "--compare", "random,loso", "--folds", "3",
                   "--genes", ",".join(inf), "--study-key", "study", "--out-dir", out])
    r, l = res["modes"]["random"]["summary"], res["modes"]["loso"]["summary"]
    assert res["modes"]["loso"]["summary"]["n_folds"] == 3
    assert l["pcc_mean"] < r["pcc_mean"] - 0.1
    assert res["drop"]["pcc"] == pytest.approx(1 - l["pcc_mean"] / r["pcc_mean"])
    assert res["drop"]["mse"] == pytest.approx(l["mse_mean"] / r["mse_mean"] - 1)
    for f in ("gene_expression.json", "gene_expression.md", "gene_expression_compare.png",
              "gene_expression_pearson_loso.png", "gene_expression_best_genes_random.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    assert "drop" in open(os.path.join(out, "gene_expression.md")).read()
    assert json.load(open(os.path.join(out, "gene_expression.json")))["drop"]["pcc"] == pytest.approx(res["drop"]["pcc"])


def test_hvg_and_hmhvg_chosen_on_training_fold():
    rng = np.random.default_rng(0)
    n, n_bg = 300, 400
    counts = np.concatenate([
        # highly variable, at increasing expression levels (one per mean bin: seurat normalises within bins)
        rng.poisson(np.exp(rng.normal(np.arange(5.0) - 0.5, 1.5, size=(n, 5)))),
        rng.poisson(np.exp(np.linspace(-1, 5.0, n_bg)), size=(n, n_bg)),  # Poisson only, all expression levels
    ], axis=1).astype(np.float32)
    genes = np.array([f"G{i}" for i in range(counts.shape[1])])
    hvg = ge.select_genes(sparse.csr_matrix(counts), genes, "hvg", 5)
    assert set(hvg.tolist()) == {0, 1, 2, 3, 4}
    hm = ge.select_genes(sparse.csr_matrix(counts), genes, "hmhvg", 2, hvg_pool=5)
    assert set(hm.tolist()) == {3, 4}
    # chosen from the rows it is given: where G1..G4 are flat, they are not selected
    flat = counts.copy()
    flat[:, 1:5] = rng.poisson(2.0, size=(n, 4))
    assert 0 in ge.select_genes(sparse.csr_matrix(flat), genes, "hvg", 2).tolist()
    assert not set(ge.select_genes(sparse.csr_matrix(flat), genes, "hvg", 5).tolist()) & {1, 2, 3, 4}


def test_hvg_mode_runs_end_to_end(tmp_path):
    task, feats, inf, _ = make_hest_task(str(tmp_path), n_studies=2, spots=40)
    ge.main(["--task-dir", task, "--features-dir", feats, "--split", "hest", "--genes", "hvg:6",
            "--out-dir", str(tmp_path / "o")])
    rows = pd.read_csv(tmp_path / "o" / "gene_expression_per_gene.csv")
    assert rows.groupby("fold").size().tolist() == [6, 6]
    assert set(rows["gene"]) & set(inf)


# ---------------------------------------------------------------- clear errors
def test_barcode_mismatch_errors_name_counts_and_allow_partial(tmp_path):
    task, feats, inf, _ = make_hest_task(str(tmp_path), n_studies=2, spots=30)
    f = load_h5(os.path.join(feats, "S0_0.h5"))
    save_features_h5(os.path.join(feats, "S0_0.h5"), f["features"][:25], barcode=np.array(f["barcode"][:25] ))
    with pytest.raises(ValueError, match=r"sample S0_0.*5 of 30 expression barcodes have no features"):
        ge.load_hest_task(task, feats)
    data = ge.load_hest_task(task, feats, allow_partial=True)
    assert len(data.features) == 4 * 30 - 5 and any("S0_0" in n for n in data.notes)
    save_features_h5(os.path.join(feats, "S0_0.h5"), np.vstack([f["features"], f["features"][:2]]),
                     barcode=np.array(f["barcode"] + ["ghost-1", "ghost-2"]))
    with pytest.raises(ValueError, match=r"2 of 32 feature barcodes have no expression \(e.g. ghost-1, ghost-2\)"):
        ge.load_hest_task(task, feats)


def test_missing_genes_are_named(tmp_path):
    task, feats, _, _ = make_hest_task(str(tmp_path), n_studies=2, spots=20)
    with pytest.raises(ValueError, match="NOT_A_GENE"):
        ge.main(["--task-dir", task, "--features-dir", feats, "--genes", "INF0,NOT_A_GENE", "--out-dir", str(tmp_path / "o")])


def test_constant_gene_on_test_fold_is_nan_and_counted(tmp_path):
    import anndata

    task, feats, inf, _ = make_hest_task(str(tmp_path), n_studies=2, spots=30)
    test_ids = pd.read_csv(os.path.join(task, "splits", "test_0.csv"))["sample_id"]
    for sid in test_ids:  # INF0 is zero on every test spot of split 0
        p = os.path.join(task, "adata", f"{sid}.h5ad")
        ad = anndata.read_h5ad(p)
        ad.X[:, 0] = 0
        ad.write_h5ad(p)
    res = ge.main(["--task-dir", task, "--features-dir", feats, "--split", "hest", "--genes", ",".join(inf),
                   "--out-dir", str(tmp_path / "o")])
    folds = {f["name"]: f for f in res["modes"]["hest"]["folds"]}
    assert folds["split0"]["n_nan_genes"] == 1 and np.isfinite(folds["split0"]["pcc"])
    assert res["modes"]["hest"]["summary"]["n_nan_genes_total"] >= 1


def test_loso_needs_two_studies_and_folds_at_least_two(tmp_path):
    task, feats, _, _ = make_hest_task(str(tmp_path), n_studies=1, samples_per_study=3, spots=20)
    with pytest.raises(ValueError, match="at least 2 studies"):
        ge.main(["--task-dir", task, "--features-dir", feats, "--split", "loso", "--study-key", "study",
                 "--genes", "INF0", "--out-dir", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--study-key"):
        ge.main(["--task-dir", task, "--features-dir", feats, "--split", "loso", "--genes", "INF0",
                 "--out-dir", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="at least 2"):
        ge.main(["--task-dir", task, "--features-dir", feats, "--split", "random", "--folds", "1",
                 "--genes", "INF0", "--out-dir", str(tmp_path / "o")])


def test_single_h5ad_input_with_feature_file(tmp_path):
    import anndata

    task, feats, inf, _ = make_hest_task(str(tmp_path), n_studies=2, spots=40)
    ads = [anndata.read_h5ad(os.path.join(task, "adata", f)) for f in sorted(os.listdir(os.path.join(task, "adata")))]
    big = anndata.concat(ads)
    big.write_h5ad(tmp_path / "all.h5ad")
    fs = [load_h5(os.path.join(feats, f)) for f in sorted(os.listdir(feats))]
    save_features_h5(str(tmp_path / "all.h5"), np.concatenate([f["features"] for f in fs]),
                     barcode=np.concatenate([f["barcode"] for f in fs]))
    res = ge.main(["--h5ad", str(tmp_path / "all.h5ad"), "--features", str(tmp_path / "all.h5"), "--split", "loso",
                   "--study-key", "study", "--genes", ",".join(inf), "--out-dir", str(tmp_path / "o")])
    assert [f["name"] for f in res["modes"]["loso"]["folds"]] == ["loso:study0", "loso:study1"]
    assert res["protocol"]["n_samples"] == 4
