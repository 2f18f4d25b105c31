"""``--ridge exact`` against an independent transcription of HEST-Benchmark's code path.

The reference below is written from mahmoodlab/HEST's source (src/hest/bench/benchmark.py::
predict_single_split and merge_fold_results, trainer.py::train_test_reg, st_dataset.py::load_adata,
BenchmarkConfig's defaults: seed 1, latent_dim 256, normalize True, method 'ridge'), not from
eval/gene_expression.py: it reads the task the way HEST does (split CSV rows, ``embeddings`` and
``barcodes`` of each embedding h5, ``adata[barcodes][:, genes]`` then log1p in float64), runs the
scaler+PCA ``Pipeline.fit_transform``, wraps the result in ``torch.Tensor`` and hands the tensors to
``Ridge``, then scores each gene with ``scipy.stats.pearsonr``.

The task is large enough (600 training spots, 384 features) that PCA(256) takes scikit-learn's
randomized solver, where ``fit_transform`` and ``fit().transform()`` differ.
"""
import json
import os

import h5py
import numpy as np
import pandas as pd
import pytest

from eval import gene_expression as ge

torch = pytest.importorskip("torch")
anndata = pytest.importorskip("anndata")
sc = pytest.importorskip("scanpy")

DIM, SPOTS, SAMPLES = 384, 300, 3


def _hest_save_hdf5(path, asset_dict, mode):
    """HEST's utils/file_utils.py::save_hdf5 behaviour: 1-D assets become (N, 1); resizable, chunked datasets;
    later batches appended."""
    with h5py.File(path, mode) as f:
        for key, val in asset_dict.items():
            if val.ndim == 1:
                val = val[:, None]
            if key not in f:
                dtype = h5py.string_dtype("utf-8") if val.dtype == object else val.dtype
                dset = f.create_dataset(key, shape=val.shape, chunks=True, maxshape=(None,) + val.shape[1:], dtype=dtype)
                dset[:] = val
            else:
                dset = f[key]
                dset.resize(len(dset) + len(val), axis=0)
                dset[-len(val):] = val


def write_hest_task(root):
    """A HEST-Benchmark task folder as HEST ships it, plus HEST-written embedding files."""
    rng = np.random.default_rng(7)
    task, emb = os.path.join(root, "bench_data", "TASK"), os.path.join(root, "ST_data_emb", "TASK", "enc")
    for d in ("adata", "splits", "patches"):
        os.makedirs(os.path.join(task, d))
    os.makedirs(emb)
    genes = [f"G{i}" for i in range(60)]
    mix, w = rng.normal(size=(4, DIM)), rng.normal(size=(4, 60)) * 0.5
    ids = [f"SMP{i}" for i in range(SAMPLES)]
    for sid in ids:
        z = rng.normal(size=(SPOTS, 4))
        counts = rng.poisson(np.exp(0.7 + z @ w)).astype(np.float32)
        barcodes = np.array([f"{sid}_{i:04d}" for i in range(SPOTS)])
        anndata.AnnData(X=counts, obs=pd.DataFrame(index=barcodes), var=pd.DataFrame(index=genes)).write_h5ad(
            os.path.join(task, "adata", f"{sid}.h5ad"))
        x = (z @ mix + rng.normal(size=(SPOTS, DIM))).astype(np.float32)
        perm = rng.permutation(SPOTS)  # HEST's patch (and embedding) order is not the expression's
        path = os.path.join(emb, f"{sid}.h5")
        for k, rows in enumerate(np.array_split(perm, 3)):  # embed_tiles writes batch by batch
            _hest_save_hdf5(path, {"embeddings": x[rows], "barcodes": np.array([b.encode() for b in barcodes[rows]]),
                                   "coords": np.stack([rows, rows], 1)}, mode="w" if k == 0 else "a")
    for k in range(SAMPLES):  # leave one sample out; CSV rows deliberately not sorted
        test = [ids[k]]
        train = [s for s in reversed(ids) if s not in test]
        for name, part in (("train", train), ("test", test)):
            pd.DataFrame({"sample_id": part, "patches_path": [f"patches/{s}.h5" for s in part],
                          "expr_path": [f"adata/{s}.h5ad" for s in part]}).to_csv(
                os.path.join(task, "splits", f"{name}_{k}.csv"), index=False)
    with open(os.path.join(task, "var_50genes.json"), "w") as f:
        json.dump({"genes": genes[5:55]}, f)
    return task, emb


# ------------------------------------------------------------------ transcription of HEST's code path
def hest_reference(bench_data_root, embedding_dir, seed=1, latent_dim=256):
    """Per split: HEST's ``train_test_reg`` results; plus ``merge_fold_results``' mean/std."""
    from scipy.stats import pearsonr
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    with open(os.path.join(bench_data_root, "var_50genes.json")) as f:
        genes = json.load(f)["genes"]
    n_splits = len(os.listdir(os.path.join(bench_data_root, "splits"))) // 2
    per_split = []
    for i in range(n_splits):
        assets = {}
        for key in ("train", "test"):
            df = pd.read_csv(os.path.join(bench_data_root, "splits", f"{key}_{i}.csv"))
            xs, ys = [], []
            for j in range(len(df)):
                with h5py.File(os.path.join(embedding_dir, f"{df.iloc[j]['sample_id']}.h5"), "r") as f:
                    emb, bc = f["embeddings"][:], f["barcodes"][:]
                barcodes = bc.flatten().astype(str).tolist()
                adata = sc.read_h5ad(os.path.join(bench_data_root, df.iloc[j]["expr_path"]))
                adata = adata[barcodes][:, genes].copy()
                adata.X = adata.X.astype(np.float64)
                sc.pp.log1p(adata)
                xs.append(emb)
                ys.append(adata.to_df().values)
            assets[key] = (np.concatenate(xs, axis=0), np.concatenate(ys, axis=0))
        (x_train, y_train), (x_test, y_test) = assets["train"], assets["test"]
        pipe = Pipeline([("scaler", StandardScaler()), ("PCA", PCA(n_components=latent_dim, random_state=seed))])
        x_train, x_test = torch.Tensor(pipe.fit_transform(x_train)), torch.Tensor(pipe.transform(x_test))
        alpha = 100 / (x_train.shape[1] * y_train.shape[1])
        reg = Ridge(solver="lsqr", alpha=alpha, random_state=seed, fit_intercept=False, max_iter=1000)
        reg.fit(x_train, y_train)
        preds_all = reg.predict(x_test)
        corrs = [pearsonr(y_test[:, t], preds_all[:, t])[0] for t in range(y_test.shape[1])]
        per_split.append({"genes": genes, "pearson_corrs": np.array(corrs), "pearson_mean": float(np.mean(corrs)),
                          "solver": pipe.named_steps["PCA"]._fit_svd_solver})
    means = [s["pearson_mean"] for s in per_split]
    return per_split, float(np.mean(means)), float(np.std(means))


@pytest.fixture(scope="module")
def hest_task(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hest"))
    task, emb = write_hest_task(root)
    return root, task, emb, hest_reference(task, emb)


def _ours(root, task, emb, *extra):
    out = os.path.join(root, "out_" + "_".join(extra).replace("-", ""))
    res = ge.main(["--task-dir", task, "--features-dir", emb, "--split", "hest", "--genes", "var50", "--out-dir", out,
                   *extra])
    return res, pd.read_csv(os.path.join(out, "gene_expression_per_gene.csv"))


def test_exact_equals_hest_per_gene_to_1e10(hest_task):
    root, task, emb, (ref, ref_mean, ref_std) = hest_task
    assert {s["solver"] for s in ref} == {"randomized"}  # the case where fit_transform matters
    res, rows = _ours(root, task, emb)  # defaults: --ridge exact, --seed 1
    assert res["protocol"]["seed"] == 1 and res["protocol"]["ridge_mode"] == "exact"
    for k, split in enumerate(ref):
        got = rows[rows["fold"] == f"split{k}"].set_index("gene").loc[split["genes"], "pearson"].to_numpy()
        assert np.abs(got - split["pearson_corrs"]).max() <= 1e-10
    summary = res["modes"]["hest"]["summary"]
    assert abs(summary["pcc_mean"] - ref_mean) <= 1e-10 and abs(summary["pcc_std"] - ref_std) <= 1e-10


def test_fit_then_transform_and_float32_ridge_would_not_match(hest_task):
    """The regression the issue found: PCA fit + transform, float32 into Ridge, seed 0 differ from HEST by far more."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    root, task, emb, (ref, _, _) = hest_task
    data = ge.load_hest_task(task, emb, fixed_genes=ref[0]["genes"])
    name, tr, te = ge.make_splits(data, "hest", task_dir=task)[0]
    y = np.log1p(data.counts[:, :].toarray().astype(np.float64))
    gi = [list(data.genes).index(g) for g in ref[0]["genes"]]
    s = StandardScaler().fit(data.features[tr])
    pca = PCA(n_components=256, random_state=1).fit(s.transform(data.features[tr]))
    a, b = (pca.transform(s.transform(data.features[i])).astype(np.float32) for i in (tr, te))
    pred = Ridge(solver="lsqr", alpha=100 / (256 * 50), fit_intercept=False, max_iter=1000, random_state=1).fit(
        a, y[tr][:, gi]).predict(b)
    old = ge.pearson_per_column(y[te][:, gi], pred)
    assert np.abs(old - ref[0]["pearson_corrs"]).max() > 1e-6


def test_fast_ridge_close_to_exact(hest_task):
    root, task, emb, (ref, ref_mean, _) = hest_task
    res, rows = _ours(root, task, emb, "--ridge", "fast")
    diffs = [np.abs(rows[rows["fold"] == f"split{k}"].set_index("gene").loc[s["genes"], "pearson"].to_numpy()
                    - s["pearson_corrs"]).max() for k, s in enumerate(ref)]
    assert max(diffs) < 2e-3
    assert abs(res["modes"]["hest"]["summary"]["pcc_mean"] - ref_mean) < 5e-4
