"""Spatial gene-expression regression from frozen patch features (HEST-Benchmark protocol).

Per fold, as HEST-Benchmark's ``predict_single_split`` and ``train_test_reg`` do it
(mahmoodlab/HEST, src/hest/bench/benchmark.py, trainer.py): targets ``log1p(counts)`` in float64
(no total-count normalisation); ``Pipeline([StandardScaler, PCA(n_components=256, random_state=seed)])``
with ``fit_transform`` on the training spots and ``transform`` on the test spots; both rounded to
float32 (HEST wraps them in ``torch.Tensor``), the training set handed to
``Ridge(solver='lsqr', alpha=100/(n_pcs*n_genes), fit_intercept=False, max_iter=1000, random_state=seed)``
in float64 as scikit-learn converts a tensor; per-gene ``scipy.stats.pearsonr`` on the test fold, averaged
over genes; mean ± (population) std over folds. Spots are ordered as HEST orders them: samples in the
order of the split CSV, spots in the order of the feature file's barcodes. The seed defaults to 1,
HEST's ``BenchmarkConfig.seed``.

Split modes: the task's own ``splits/*.csv`` (``hest``), random K-fold (``random``; over spots, or over
samples with ``--group-by sample``) and leave-one-study-out (``loso``). ``--compare random,loso``
runs both and reports the drop.

Examples::

    python -m eval.gene_expression --task-dir hest --features-dir feats/ --split hest --genes var50
    python -m eval.gene_expression --task-dir hest --features-dir feats/ --compare random,loso \\
        --folds 10 --genes hvg:200 --study-key study
    python -m eval.gene_expression --h5ad all.h5ad --features feats.h5 --split loso --study-key study
"""
import argparse
import csv
import glob
import io
import json
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from scipy import linalg as sla
from scipy import sparse

from eval.common import (
    LOG, Warnings, add_common_args, atomic_write_text, check_features, ensure_dir, load_features_h5, parse_cli, pyplot, save_figure, write_report,
)

MAX_PCS = 256  # HEST-Benchmark's latent_dim
SPLIT_MODES = ("hest", "random", "loso")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
@dataclass
class SpotData:
    """All spots of an evaluation, aligned row by row."""

    features: np.ndarray  # (N, D) float32
    counts: sparse.csr_matrix  # (N, G) raw counts
    genes: np.ndarray  # (G,) str
    sample: np.ndarray  # (N,) str
    barcode: np.ndarray  # (N,) str
    study: Optional[np.ndarray] = None  # (N,) str
    notes: List[str] = field(default_factory=list)


def _examples(items, k: int = 5) -> str:
    items = sorted(items)
    return ", ".join(map(str, items[:k])) + (", ..." if len(items) > k else "")


def align_barcodes(
    expr_barcodes: Sequence[str], feat_barcodes: Sequence[str], where: str, allow_partial: bool,
) -> Tuple[np.ndarray, np.ndarray, Dict[str, int]]:
    """Index arrays ``(expr_idx, feat_idx)`` pairing equal barcodes, in the feature file's order (HEST's).

    Raises a ``ValueError`` naming counts and examples when the two sets differ, unless
    ``allow_partial`` (then the intersection is used and the counts are returned).
    """
    expr_barcodes = np.asarray(expr_barcodes).astype(str)
    feat_barcodes = np.asarray(feat_barcodes).astype(str)
    for name, arr in (("expression", expr_barcodes), ("features", feat_barcodes)):
        if len(np.unique(arr)) != len(arr):
            raise ValueError(f"{where}: duplicate barcodes in the {name} ({len(arr) - len(np.unique(arr))} repeated)")
    feat_pos = {b: i for i, b in enumerate(feat_barcodes)}
    expr_pos = {b: i for i, b in enumerate(expr_barcodes)}
    only_expr = [b for b in expr_barcodes if b not in feat_pos]
    only_feat = sorted(set(feat_barcodes) - set(expr_barcodes))
    stats = {"n_expression": len(expr_barcodes), "n_features": len(feat_barcodes),
             "only_in_expression": len(only_expr), "only_in_features": len(only_feat)}
    if (only_expr or only_feat) and not allow_partial:
        msg = [f"{where}: barcodes of expression and features differ"]
        if only_expr:
            msg.append(f"{len(only_expr)} of {len(expr_barcodes)} expression barcodes have no features (e.g. {_examples(only_expr)})")
        if only_feat:
            msg.append(f"{len(only_feat)} of {len(feat_barcodes)} feature barcodes have no expression (e.g. {_examples(only_feat)})")
        msg.append("pass --allow-partial to use the intersection")
        raise ValueError("; ".join(msg))
    feat_idx = np.array([i for i, b in enumerate(feat_barcodes) if b in expr_pos], dtype=np.int64)
    expr_idx = np.array([expr_pos[b] for b in feat_barcodes[feat_idx]], dtype=np.int64)
    if len(expr_idx) == 0:
        raise ValueError(f"{where}: no barcode is shared by expression and features")
    return expr_idx, feat_idx, stats


def _read_h5ad(path: str):
    import anndata

    if not os.path.isfile(path):
        raise FileNotFoundError(f"expression file not found: {path}")
    return anndata.read_h5ad(path)


def _as_csr(x) -> sparse.csr_matrix:
    """Counts as CSR; float64 input stays float64 (HEST casts to float64 before log1p), the rest float32
    (integer counts below 2**24 are exact in it)."""
    dtype = np.float64 if x.dtype == np.float64 else np.float32
    return sparse.csr_matrix(x, dtype=dtype) if not sparse.issparse(x) else x.tocsr().astype(dtype)


def _concat_samples(parts: List[dict], fixed_genes: Optional[Sequence[str]]) -> SpotData:
    """Stack per-sample parts on the genes shared by all samples (or on ``fixed_genes``)."""
    if fixed_genes is not None:
        missing = {p["sample"]: [g for g in fixed_genes if g not in p["gene_pos"]] for p in parts}
        missing = {s: m for s, m in missing.items() if m}
        if missing:
            detail = "; ".join(f"{s}: {_examples(m, 10)} ({len(m)})" for s, m in list(missing.items())[:5])
            raise ValueError(f"requested genes missing from the expression data: {detail}")
        genes = list(fixed_genes)
    else:
        shared = set(parts[0]["genes"])
        for p in parts[1:]:
            shared &= set(p["genes"])
        genes = [g for g in parts[0]["genes"] if g in shared]  # keep the first sample's order
        if not genes:
            raise ValueError("the samples share no gene")
    dims = {p["sample"]: p["features"].shape[1] for p in parts}
    if len(set(dims.values())) > 1:
        by_dim: Dict[int, List[str]] = {}
        for sid, d in dims.items():
            by_dim.setdefault(d, []).append(sid)
        detail = "; ".join(f"width {d}: {_examples(s)}" for d, s in sorted(by_dim.items()))
        raise ValueError(f"feature files of different widths ({detail}): were they extracted with different models?")
    counts = sparse.vstack([p["counts"][:, [p["gene_pos"][g] for g in genes]] for p in parts]).tocsr()
    has_study = all(p["study"] is not None for p in parts)
    return SpotData(
        features=np.concatenate([p["features"] for p in parts]),
        counts=counts, genes=np.asarray(genes, dtype=str),
        sample=np.concatenate([np.full(len(p["barcode"]), p["sample"], dtype=object) for p in parts]).astype(str),
        barcode=np.concatenate([p["barcode"] for p in parts]).astype(str),
        study=np.concatenate([p["study"] for p in parts]).astype(str) if has_study else None,
    )


def _split_files(task_dir: str) -> List[Tuple[str, str]]:
    trains = glob.glob(os.path.join(task_dir, "splits", "train_*.csv"))
    pairs = []
    for tr in sorted(trains, key=lambda p: int(os.path.basename(p)[6:-4]) if os.path.basename(p)[6:-4].isdigit() else 0):
        te = tr.replace(os.sep + "train_", os.sep + "test_")
        if not os.path.isfile(te):
            raise FileNotFoundError(f"{tr} has no matching {te}")
        pairs.append((tr, te))
    return pairs


def _read_split_csv(path: str) -> pd.DataFrame:
    df = pd.read_csv(path)
    if "sample_id" not in df.columns:
        raise ValueError(f"{path} has no 'sample_id' column (columns: {list(df.columns)})")
    return df


def _expr_path(task_dir: str, sample_id: str, row: Optional[pd.Series]) -> str:
    if row is not None and isinstance(row.get("expr_path"), str):
        return os.path.join(task_dir, row["expr_path"])
    for sub in ("adata", "st"):
        p = os.path.join(task_dir, sub, f"{sample_id}.h5ad")
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"no expression file for sample {sample_id} under {task_dir}/adata or {task_dir}/st")


def _feature_path(features_dir: str, sample_id: str, row: Optional[pd.Series]) -> str:
    """``{features_dir}/{sample_id}.h5`` (HEST's embedding name), else the name of the row's ``patches_path``
    (what ``extract_features --hest-patches`` writes)."""
    tried = [os.path.join(features_dir, f"{sample_id}.h5")]
    if row is not None and isinstance(row.get("patches_path"), str):
        tried.append(os.path.join(features_dir, os.path.basename(row["patches_path"])))
    for p in tried:
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"no feature file for sample {sample_id}: tried {', '.join(dict.fromkeys(tried))}")


def load_hest_task(
    task_dir: str, features_dir: str, study_key: Optional[str] = None, fixed_genes: Optional[Sequence[str]] = None,
    allow_partial: bool = False,
) -> SpotData:
    """Load a HEST task folder plus one feature h5 per sample (``{features_dir}/{sample_id}.h5``).

    Samples are those named in ``splits/*.csv`` (or every ``adata/*.h5ad`` without splits). The study
    of each spot comes from ``obs[study_key]`` or, failing that, from ``meta.csv`` (sample_id, study_key).
    """
    if not os.path.isdir(task_dir):
        raise FileNotFoundError(f"task directory not found: {task_dir}")
    rows: Dict[str, Optional[pd.Series]] = {}
    for tr, te in _split_files(task_dir):
        for path in (tr, te):
            for _, r in _read_split_csv(path).iterrows():
                rows.setdefault(str(r["sample_id"]), r)
    if not rows:
        files = sorted(glob.glob(os.path.join(task_dir, "adata", "*.h5ad")) + glob.glob(os.path.join(task_dir, "st", "*.h5ad")))
        rows = {os.path.splitext(os.path.basename(p))[0]: None for p in files}
    if not rows:
        raise FileNotFoundError(f"{task_dir} has neither splits/*.csv nor adata/*.h5ad")
    meta = None
    meta_path = os.path.join(task_dir, "meta.csv")
    if study_key and os.path.isfile(meta_path):
        meta = pd.read_csv(meta_path, dtype=str).set_index("sample_id")
    parts, notes = [], []
    for sid, row in rows.items():
        ad = _read_h5ad(_expr_path(task_dir, sid, row))
        feat_path = _feature_path(features_dir, sid, row)
        feats = load_features_h5(feat_path)
        check_features(feats["features"], feat_path)
        if "barcode" not in feats:
            raise KeyError(f"{feat_path} has no 'barcode' dataset: extract features with --hest-patches")
        e_idx, f_idx, stats = align_barcodes(ad.obs_names, feats["barcode"], f"sample {sid}", allow_partial)
        if stats["only_in_expression"] or stats["only_in_features"]:
            notes.append(f"sample {sid}: used {len(e_idx)} shared spots ({stats['only_in_expression']} only in "
                         f"expression, {stats['only_in_features']} only in features)")
        study = None
        if study_key:
            if study_key in ad.obs.columns:
                study = ad.obs[study_key].astype(str).to_numpy()[e_idx]
            elif meta is not None and sid in meta.index and study_key in meta.columns:
                study = np.full(len(e_idx), meta.loc[sid, study_key], dtype=object)
        genes = np.asarray(ad.var_names).astype(str)
        parts.append({"sample": sid, "features": feats["features"][f_idx], "barcode": np.asarray(ad.obs_names)[e_idx],
                      "counts": _as_csr(ad.X)[e_idx], "genes": genes, "gene_pos": {g: i for i, g in enumerate(genes)},
                      "study": study})
    data = _concat_samples(parts, fixed_genes)
    data.notes.extend(notes)
    return data


def load_h5ad_dataset(
    h5ad: str, features_h5: str, sample_key: str = "sample_id", study_key: Optional[str] = None,
    fixed_genes: Optional[Sequence[str]] = None, allow_partial: bool = False,
) -> SpotData:
    """Load one AnnData (spots x genes, unique obs_names) plus one feature h5 with a ``barcode`` dataset."""
    ad = _read_h5ad(h5ad)
    feats = load_features_h5(features_h5)
    check_features(feats["features"], features_h5)
    if "barcode" not in feats:
        raise KeyError(f"{features_h5} has no 'barcode' dataset to match {h5ad}'s obs_names")
    e_idx, f_idx, stats = align_barcodes(ad.obs_names, feats["barcode"], os.path.basename(h5ad), allow_partial)
    for key in (sample_key, study_key):
        if key and key not in ad.obs.columns:
            raise KeyError(f"{h5ad}: obs has no column '{key}' (columns: {list(ad.obs.columns)})")
    genes = np.asarray(ad.var_names).astype(str)
    part = {"sample": "", "features": feats["features"][f_idx], "barcode": np.asarray(ad.obs_names)[e_idx],
            "counts": _as_csr(ad.X)[e_idx], "genes": genes, "gene_pos": {g: i for i, g in enumerate(genes)},
            "study": ad.obs[study_key].astype(str).to_numpy()[e_idx] if study_key else None}
    data = _concat_samples([part], fixed_genes)
    data.sample = ad.obs[sample_key].astype(str).to_numpy()[e_idx] if sample_key else np.full(len(e_idx), "all")
    if stats["only_in_expression"] or stats["only_in_features"]:
        data.notes.append(f"used {len(e_idx)} shared spots ({stats['only_in_expression']} only in expression, "
                          f"{stats['only_in_features']} only in features)")
    return data


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------
Split = Tuple[str, np.ndarray, np.ndarray]  # (name, train_idx, test_idx)


def make_splits(
    data: SpotData, mode: str, folds: int = 10, group_by: str = "spot", seed: int = 0, task_dir: Optional[str] = None,
) -> List[Split]:
    """Train/test index pairs for ``mode`` in {hest, random, loso}."""
    from sklearn.model_selection import GroupKFold, KFold, LeaveOneGroupOut

    n = len(data.features)
    if mode == "hest":
        if task_dir is None:
            raise ValueError("--split hest needs --task-dir with splits/train_k.csv and test_k.csv")
        pairs = _split_files(task_dir)
        if not pairs:
            raise FileNotFoundError(f"no splits/train_*.csv in {task_dir}")
        out = []
        for tr, te in pairs:
            # HEST concatenates the samples in the CSV's row order
            tr_idx, te_idx = (np.concatenate([np.flatnonzero(data.sample == sid) for sid in
                                              dict.fromkeys(_read_split_csv(p)["sample_id"].astype(str))])
                              for p in (tr, te))
            out.append((f"split{os.path.basename(te)[5:-4]}", tr_idx.astype(np.int64), te_idx.astype(np.int64)))
        return out
    if mode == "random":
        if folds < 2:
            raise ValueError(f"--folds must be at least 2, got {folds}")
        if group_by == "sample":
            n_groups = len(np.unique(data.sample))
            if n_groups < folds:
                raise ValueError(f"--group-by sample with --folds {folds} needs at least {folds} samples, found {n_groups}")
            it = GroupKFold(n_splits=folds).split(np.zeros(n), groups=data.sample)
        elif group_by == "spot":
            if n < folds:
                raise ValueError(f"--folds {folds} is more than the {n} spots")
            it = KFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(n))
        else:
            raise ValueError(f"unknown --group-by '{group_by}' (spot or sample)")
        return [(f"fold{k}", tr, te) for k, (tr, te) in enumerate(it)]
    if mode == "loso":
        if data.study is None:
            raise ValueError("--split loso needs the study of each spot: pass --study-key naming an obs column "
                             "(or a meta.csv column in the task dir)")
        studies = np.unique(data.study)
        if len(studies) < 2:
            raise ValueError(f"leave-one-study-out needs at least 2 studies, found only {list(studies)}")
        return [(f"loso:{data.study[te][0]}", tr, te) for tr, te in LeaveOneGroupOut().split(np.zeros(n), groups=data.study)]
    raise ValueError(f"unknown split mode '{mode}' (choose from {SPLIT_MODES})")


# ----------------------------------------------------------------------------------------------
# Gene sets
# ----------------------------------------------------------------------------------------------
def parse_gene_spec(spec: str, task_dir: Optional[str] = None) -> Tuple[str, object]:
    """``var50`` | ``hvg:N`` | ``hmhvg:N`` | ``G1,G2,...`` | a .json/.txt file -> (kind, value)."""
    if spec == "var50":
        if task_dir is None:
            raise ValueError("--genes var50 needs --task-dir (it reads var_50genes.json)")
        return "list", _read_gene_file(os.path.join(task_dir, "var_50genes.json"))
    for kind in ("hvg", "hmhvg"):
        if spec.startswith(kind + ":"):
            try:
                n = int(spec.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"--genes {spec}: expected {kind}:N with an integer N") from None
            if n < 1:
                raise ValueError(f"--genes {spec}: N must be positive")
            return kind, n
    if os.path.isfile(spec):
        return "list", _read_gene_file(spec)
    if spec.endswith((".json", ".txt")):
        raise FileNotFoundError(f"gene list file not found: {spec}")
    genes = [g.strip() for g in spec.split(",") if g.strip()]
    if not genes:
        raise ValueError("--genes is empty")
    return "list", genes


def _read_gene_file(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"gene list file not found: {path}")
    if path.endswith(".json"):
        with open(path) as f:
            obj = json.load(f)
        genes = obj["genes"] if isinstance(obj, dict) else obj
    else:
        with open(path) as f:
            genes = [line.strip() for line in f if line.strip()]
    if not genes:
        raise ValueError(f"{path} lists no genes")
    return [str(g) for g in genes]


def select_genes(counts: sparse.csr_matrix, genes: np.ndarray, kind: str, n: int, hvg_pool: int = 2000) -> np.ndarray:
    """Indices of the ``hvg`` or ``hmhvg`` gene set, computed from the given (training-fold) counts.

    Both use log1p(normalize_total(1e4)) data. ``hvg:N``: the top N of
    ``scanpy.pp.highly_variable_genes(flavor='seurat')``. ``hmhvg:N``: among the top ``hvg_pool``
    highly variable genes, the N with the highest mean log-normalised expression.
    """
    import anndata
    import scanpy as sc

    n_genes = counts.shape[1]
    if n > n_genes:
        raise ValueError(f"asked for {kind}:{n} but the expression data has only {n_genes} genes")
    ad = anndata.AnnData(X=counts.astype(np.float32, copy=True))
    ad.var_names = genes
    sc.pp.normalize_total(ad, target_sum=1e4)
    sc.pp.log1p(ad)
    n_top = n if kind == "hvg" else max(n, min(hvg_pool, n_genes))
    sc.pp.highly_variable_genes(ad, flavor="seurat", n_top_genes=n_top)
    disp = ad.var["dispersions_norm"].to_numpy(dtype=np.float64)
    hv = np.flatnonzero(ad.var["highly_variable"].to_numpy())
    if kind == "hvg":
        order = hv[np.argsort(-np.nan_to_num(disp[hv], nan=-np.inf), kind="stable")]
    else:
        mean = np.asarray(ad.X.mean(axis=0)).ravel()
        order = hv[np.argsort(-mean[hv], kind="stable")]
    return np.sort(order[:n])


# ----------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------
def pearson_per_column(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Pearson r of each column pair (float64); NaN where either column is constant, like ``pearsonr``."""
    a = np.asarray(y_true, dtype=np.float64)
    b = np.asarray(y_pred, dtype=np.float64)
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    na = np.sqrt((a * a).sum(axis=0))
    nb = np.sqrt((b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=0) / (na * nb)
    # scipy returns NaN for a constant input; compare against the scale of the data, not 0 exactly
    const = (na <= 1e-12 * np.maximum(1.0, np.abs(y_true).max(axis=0))) | (nb <= 1e-12 * np.maximum(1.0, np.abs(y_pred).max(axis=0)))
    r[const] = np.nan
    return np.clip(r, -1.0, 1.0)


def ridge_lsqr(x_train: np.ndarray, y_train: np.ndarray, alpha: float, seed: int, max_iter: int = 1000) -> np.ndarray:
    """Coefficients (n_targets, k) of ``Ridge(solver='lsqr', fit_intercept=False)`` fitted on (x_train, y_train).

    LSQR is invariant to an orthogonal change of basis on the left, so the n x k problem is first
    reduced to an equivalent (k+1) x k one: ``x = Q R`` and each target b -> ``[Q^T b; ||b - Q Q^T b||]``
    (``[R; 0]`` and the new targets are an orthogonal image of ``x`` and b).
    sklearn's own Ridge then runs on that; the iterates, stopping tests and solution are those of the
    full problem (up to rounding), at a cost independent of the number of training spots.
    """
    from sklearn.linear_model import Ridge

    x = np.asarray(x_train, dtype=np.float64)
    y = np.asarray(y_train, dtype=np.float64)
    k = x.shape[1]
    reg = Ridge(solver="lsqr", alpha=alpha, fit_intercept=False, max_iter=max_iter, random_state=seed)
    if x.shape[0] <= 2 * k:  # nothing to gain
        return reg.fit(x, y).coef_
    # R from a column-scaled Cholesky of the Gram matrix: PCA scores have (near-)orthogonal columns,
    # so the scaled Gram is close to the identity and this is as accurate as a QR, at GEMM speed.
    gram = x.T @ x
    d = np.sqrt(np.maximum(np.diag(gram), np.finfo(np.float64).tiny))
    try:
        r = sla.cholesky(gram / np.outer(d, d), lower=False, check_finite=False) * d[None, :]
    except np.linalg.LinAlgError:  # rank-deficient features: fall back to a QR
        r = np.linalg.qr(x, mode="r")
    qtb = sla.solve_triangular(r, x.T @ y, trans="T", lower=False, check_finite=False)  # Q^T b = R^-T x^T b
    resid = np.sqrt(np.maximum((y * y).sum(axis=0) - (qtb * qtb).sum(axis=0), 0.0))
    x_small = np.vstack([r, np.zeros((1, k))])
    y_small = np.vstack([qtb, resid[None, :]])
    return reg.fit(x_small, y_small).coef_


@dataclass
class FoldResult:
    name: str
    genes: np.ndarray
    pearson: np.ndarray
    mae: np.ndarray
    mse: np.ndarray
    n_train: int
    n_test: int
    n_components: int
    alpha: float
    pca_solver: str
    timings: Dict[str, float]
    y_true_sample: np.ndarray  # a subsample of test spots, for the scatter plot
    y_pred_sample: np.ndarray

    def summary(self) -> Dict[str, float]:
        ok = ~np.isnan(self.pearson)
        top = np.sort(self.pearson[ok])[::-1][:10]
        return {"pcc": float(np.mean(self.pearson[ok])) if ok.any() else float("nan"),
                "pcc10": float(np.mean(top)) if len(top) else float("nan"),
                "mae": float(np.mean(self.mae)), "mse": float(np.mean(self.mse)),
                "n_genes": int(len(self.genes)), "n_nan_genes": int((~ok).sum())}


RIDGE_MODES = ("exact", "fast")


def hest_fold(
    x_train: np.ndarray, x_test: np.ndarray, y_train: np.ndarray, y_test: np.ndarray, seed: int = 1,
    max_pcs: int = MAX_PCS, ridge: str = "exact",
) -> dict:
    """One HEST-Benchmark fold on log1p targets: scaler -> PCA -> Ridge(lsqr) -> per-gene Pearson/MAE/MSE.

    ``ridge='exact'`` makes HEST's calls with HEST's dtypes (``predict_single_split``/``train_test_reg``):
    the scaler+PCA pipeline's ``fit_transform`` on the training spots (randomized PCA gives other
    training components than ``fit`` then ``transform``), its output rounded to float32 as
    ``torch.Tensor`` does, the training set converted to float64 as scikit-learn converts a tensor,
    the test set predicted in float32. ``ridge='fast'`` keeps all of that but solves the compressed
    problem of :func:`ridge_lsqr`: the same LSQR iterations in exact arithmetic, but LSQR at tol=1e-4 is
    sensitive to rounding, so per-gene Pearson differs from 'exact' by up to ~1e-3.
    The one deliberate difference: PCA keeps ``min(256, n_train, n_features)`` components, where HEST
    fails on fewer than 256 spots or features.
    """
    if ridge not in RIDGE_MODES:
        raise ValueError(f"unknown ridge mode '{ridge}' (choose from {RIDGE_MODES})")
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    t = {}
    t0 = time.perf_counter()
    n_comp = min(max_pcs, x_train.shape[0], x_train.shape[1])
    pipe = Pipeline([("scaler", StandardScaler()), ("PCA", PCA(n_components=n_comp, random_state=seed))])
    # float32 round trip: HEST wraps the pipeline's float64 output in torch.Tensor (float32)
    xtr = pipe.fit_transform(x_train).astype(np.float32)
    xte = pipe.transform(x_test).astype(np.float32)
    pca = pipe.named_steps["PCA"]
    t["pca"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    alpha = 100.0 / (n_comp * y_train.shape[1])
    y_train = np.asarray(y_train, dtype=np.float64)
    if ridge == "exact":
        from sklearn.linear_model import Ridge

        reg = Ridge(solver="lsqr", alpha=alpha, fit_intercept=False, max_iter=1000, random_state=seed)
        # scikit-learn turns HEST's float32 training tensor into float64; predict keeps the test set float32
        pred = np.asarray(reg.fit(xtr.astype(np.float64), y_train).predict(xte), dtype=np.float64)
    else:
        coef = ridge_lsqr(xtr.astype(np.float64), y_train, alpha, seed)
        pred = xte.astype(np.float64) @ coef.T
    t["ridge"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = pearson_per_column(y_test, pred)
    err = pred - y_test
    t["metrics"] = time.perf_counter() - t0
    return {"pred": pred, "pearson": r, "mae": np.abs(err).mean(axis=0), "mse": (err * err).mean(axis=0),
            "n_components": n_comp, "alpha": alpha, "pca_solver": str(getattr(pca, "_fit_svd_solver", pca.svd_solver)),
            "timings": t}


def run_folds(
    data: SpotData, splits: List[Split], gene_kind: str, gene_value, seed: int = 1, hvg_pool: int = 2000,
    max_pcs: int = MAX_PCS, ridge: str = "exact", n_plot: int = 2000,
) -> List[FoldResult]:
    """Run the protocol on every split; gene sets of kind hvg/hmhvg are chosen on each training fold."""
    fixed_idx = None
    if gene_kind == "list":
        pos = {g: i for i, g in enumerate(data.genes)}
        missing = [g for g in gene_value if g not in pos]
        if missing:
            raise ValueError(f"requested genes missing from the expression data ({len(missing)}): {_examples(missing, 20)}")
        fixed_idx = np.array([pos[g] for g in gene_value])
    rng = np.random.default_rng(seed)
    # a fixed gene set: build the dense log1p targets once instead of once per fold
    y_fixed = np.log1p(data.counts[:, fixed_idx].toarray().astype(np.float64)) if fixed_idx is not None else None
    out = []
    for name, tr, te in splits:
        if len(tr) == 0 or len(te) == 0:
            raise ValueError(f"split {name} has an empty {'training' if len(tr) == 0 else 'test'} set")
        t0 = time.perf_counter()
        gidx = fixed_idx if fixed_idx is not None else select_genes(data.counts[tr], data.genes, gene_kind, gene_value, hvg_pool)
        t_genes = time.perf_counter() - t0
        # log1p of raw counts, no library-size normalisation: the HEST-Benchmark target
        if y_fixed is not None:
            y_tr, y_te = y_fixed[tr], y_fixed[te]
        else:
            y = data.counts[:, gidx]
            y_tr = np.log1p(y[tr].toarray().astype(np.float64))
            y_te = np.log1p(y[te].toarray().astype(np.float64))
        res = hest_fold(data.features[tr], data.features[te], y_tr, y_te, seed=seed, max_pcs=max_pcs, ridge=ridge)
        res["timings"]["genes"] = t_genes
        if res["n_components"] < max_pcs:
            LOG.warning("%s: PCA reduced to %d components (training fold has %d spots, %d features)",
                        name, res["n_components"], len(tr), data.features.shape[1])
        pick = np.sort(rng.choice(len(te), size=min(n_plot, len(te)), replace=False))
        fr = FoldResult(name, data.genes[gidx], res["pearson"], res["mae"], res["mse"], len(tr), len(te),
                        res["n_components"], res["alpha"], res["pca_solver"], res["timings"],
                        y_te[pick].astype(np.float32), res["pred"][pick].astype(np.float32))
        s = fr.summary()
        if s["n_nan_genes"]:
            LOG.warning("%s: %d gene(s) constant on the test fold: Pearson undefined, left out of the mean",
                        name, s["n_nan_genes"])
        LOG.info("%s: train %d test %d genes %d PCs %d solver %s  PCC %.4f  PCC-10 %.4f  MAE %.4f  MSE %.4f",
                 name, len(tr), len(te), len(gidx), fr.n_components, fr.pca_solver, s["pcc"], s["pcc10"], s["mae"], s["mse"])
        out.append(fr)
    return out


METRICS = ("pcc", "pcc10", "mae", "mse")


def aggregate(folds: List[FoldResult]) -> Dict[str, float]:
    """Mean and std over folds of each metric, plus NaN-gene counts."""
    rows = [f.summary() for f in folds]
    out = {}
    for m in METRICS:
        v = np.array([r[m] for r in rows], dtype=np.float64)
        out[f"{m}_mean"] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
        out[f"{m}_std"] = float(np.nanstd(v)) if np.isfinite(v).any() else float("nan")
    out["n_folds"] = len(folds)
    out["n_nan_genes_total"] = int(sum(r["n_nan_genes"] for r in rows))
    return out


def drop(random_summary: Dict[str, float], loso_summary: Dict[str, float]) -> Dict[str, float]:
    """Random -> LOSO change: ``1 - LOSO/random`` for PCC and PCC-10, ``LOSO/random - 1`` for MAE and MSE.

    Both are positive when LOSO is worse.
    """
    out = {}
    for m in METRICS:
        r, l = random_summary[f"{m}_mean"], loso_summary[f"{m}_mean"]
        if not r or not np.isfinite(r) or not np.isfinite(l):
            out[m] = float("nan")
        else:
            out[m] = 1.0 - l / r if m.startswith("pcc") else l / r - 1.0
    return out


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------
def per_gene_rows(mode: str, folds: List[FoldResult]) -> List[dict]:
    rows = []
    for f in folds:
        for g, r, a, s in zip(f.genes, f.pearson, f.mae, f.mse):
            rows.append({"mode": mode, "fold": f.name, "gene": g, "pearson": r, "mae": a, "mse": s})
    return rows


def _write_csv(path: str, rows: List[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()) if rows else ["gene"])
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def gene_means(rows: List[dict]) -> pd.DataFrame:
    """Per (mode, gene): mean Pearson/MAE/MSE over the folds where the gene was evaluated."""
    df = pd.DataFrame(rows)
    g = df.groupby(["mode", "gene"], sort=False)
    return g.agg(n_folds=("fold", "size"), pearson_mean=("pearson", "mean"), pearson_std=("pearson", "std"),
                 mae_mean=("mae", "mean"), mse_mean=("mse", "mean")).reset_index()


def plot_per_fold(mode: str, folds: List[FoldResult], path: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(folds) + 2), 3.5))
    data = [f.pearson[~np.isnan(f.pearson)] for f in folds]
    pos = [i for i, d in enumerate(data) if len(d)]
    if pos:
        ax.violinplot([data[i] for i in pos], positions=pos, showmedians=True)
    for i, d in enumerate(data):
        ax.scatter(np.full(len(d), i) + np.random.default_rng(i).uniform(-0.12, 0.12, len(d)), d, s=4, alpha=0.4, color="k")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(folds)), [f.name for f in folds], rotation=45, ha="right")
    ax.set_ylabel("per-gene Pearson r")
    ax.set_title(f"{mode}: per-gene Pearson by fold")
    return save_figure(fig, path)


def plot_best_genes(mode: str, folds: List[FoldResult], means: pd.DataFrame, path: str, n: int = 4) -> str:
    plt = pyplot()
    best = means[means["mode"] == mode].sort_values("pearson_mean", ascending=False)["gene"].head(n).tolist()
    fig, axes = plt.subplots(1, max(1, len(best)), figsize=(3.2 * max(1, len(best)), 3.2), squeeze=False)
    for ax, gene in zip(axes[0], best):
        for k, f in enumerate(folds):
            hit = np.flatnonzero(f.genes == gene)
            if len(hit):
                ax.scatter(f.y_true_sample[:, hit[0]], f.y_pred_sample[:, hit[0]], s=3, alpha=0.4, label=f.name if k < 10 else None)
        r = means[(means["mode"] == mode) & (means["gene"] == gene)]["pearson_mean"].iloc[0]
        ax.set_title(f"{gene} (mean r={r:.3f})")
        ax.set_xlabel("true log1p(count)")
        ax.set_ylabel("predicted")
    fig.suptitle(f"{mode}: best-predicted genes (test spots, coloured by fold)")
    return save_figure(fig, path)


def plot_compare(summaries: Dict[str, Dict[str, float]], path: str) -> str:
    plt = pyplot()
    modes = list(summaries)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.0 * len(METRICS), 3.2))
    for ax, m in zip(axes, METRICS):
        ax.bar(modes, [summaries[k][f"{m}_mean"] for k in modes], yerr=[summaries[k][f"{m}_std"] for k in modes],
               color=["tab:blue", "tab:orange", "tab:green"][: len(modes)], capsize=4)
        ax.set_title({"pcc": "PCC", "pcc10": "PCC-10", "mae": "MAE", "mse": "MSE"}[m])
    fig.suptitle("random split vs leave-one-study-out (mean ± std over folds)")
    fig.tight_layout()
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    src = p.add_argument_group("input (a HEST task dir + features dir, or one AnnData + one feature h5)")
    src.add_argument("--task-dir", help="HEST task folder (patches/, adata/ or st/, splits/, var_50genes.json, meta.csv)")
    src.add_argument("--features-dir", help="one {sample_id}.h5 per sample with features and barcode")
    src.add_argument("--h5ad", help="a single AnnData of raw counts (spots x genes) with unique obs_names")
    src.add_argument("--features", help="feature h5 (features, barcode) matching --h5ad")
    src.add_argument("--sample-key", default="sample_id", help="obs column with the sample of each spot (--h5ad input)")
    src.add_argument("--study-key", default=None, help="obs (or meta.csv) column naming each spot's study (needed for loso)")
    src.add_argument("--allow-partial", action="store_true", help="use the barcodes shared by expression and features")
    p.add_argument("--split", choices=SPLIT_MODES, default="hest", help="split mode (ignored with --compare)")
    p.add_argument("--compare", default=None, help="comma list of split modes to run and compare, e.g. random,loso")
    p.add_argument("--folds", type=int, default=10, help="K for --split random")
    p.add_argument("--group-by", choices=("spot", "sample"), default="spot", help="random K-fold over spots or samples")
    p.add_argument("--genes", default="var50", help="var50 | hvg:N | hmhvg:N | G1,G2,... | genes.json/.txt")
    p.add_argument("--hvg-pool", type=int, default=2000, help="hmhvg:N picks the N most expressed of this many HVGs")
    p.add_argument("--ridge", choices=RIDGE_MODES, default="exact",
                   help="exact (default): HEST-Benchmark's calls and dtypes, equal to its train_test_reg to rounding; "
                        "fast: the equivalent compressed LSQR problem (orders of magnitude faster at HEST-Extended "
                        "scale; per-gene Pearson within ~1e-3 of exact)")
    p.add_argument("--name", default="gene_expression", help="report file stem")
    add_common_args(p, default_out="eval_out/gene_expression", default_seed=1,
                    seed_help="seed of PCA, Ridge and K-fold shuffling; 1 is HEST-Benchmark's default")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the evaluation from the command line; returns the results dict also written to JSON."""
    args = parse_cli(build_parser(), argv)
    modes = [m.strip() for m in args.compare.split(",")] if args.compare else [args.split]
    for m in modes:
        if m not in SPLIT_MODES:
            raise ValueError(f"unknown split mode '{m}' in --compare (choose from {SPLIT_MODES})")
    kind, value = parse_gene_spec(args.genes, args.task_dir)
    fixed = value if kind == "list" else None
    if args.task_dir and args.features_dir:
        data = load_hest_task(args.task_dir, args.features_dir, args.study_key, fixed, args.allow_partial)
    elif args.h5ad and args.features:
        data = load_h5ad_dataset(args.h5ad, args.features, args.sample_key, args.study_key, fixed, args.allow_partial)
    else:
        raise ValueError("give either --task-dir and --features-dir, or --h5ad and --features")
    for note in data.notes:
        LOG.warning(note)
    warns = Warnings()
    warns.check_features(data.features, args.features_dir or args.features)
    ensure_dir(args.out_dir)
    results = {"protocol": {"follows": "mahmoodlab/HEST src/hest/bench/benchmark.py::predict_single_split, trainer.py::train_test_reg",
                            "targets": "log1p(raw counts), float64", "scaler": "StandardScaler", "pca_max_components": MAX_PCS,
                            "pca": "Pipeline(StandardScaler, PCA).fit_transform(train), .transform(test); float32 output",
                            "ridge": "Ridge(solver='lsqr', alpha=100/(n_pcs*n_genes), fit_intercept=False, max_iter=1000)",
                            "genes": args.genes, "seed": args.seed, "ridge_mode": args.ridge, "n_spots": len(data.features),
                            "n_samples": int(len(np.unique(data.sample))), "feature_dim": int(data.features.shape[1])},
               "modes": {}, "notes": list(data.notes)}
    table, all_rows, summaries, folds_by_mode, plots = [], [], {}, {}, []
    for mode in modes:
        splits = make_splits(data, mode, args.folds, args.group_by, args.seed, args.task_dir)
        folds = run_folds(data, splits, kind, value, args.seed, args.hvg_pool, ridge=args.ridge)
        summaries[mode] = aggregate(folds)
        folds_by_mode[mode] = folds
        results["modes"][mode] = {
            "summary": summaries[mode],
            "folds": [{"name": f.name, "n_train": f.n_train, "n_test": f.n_test, "n_components": f.n_components,
                       "alpha": f.alpha, "pca_solver": f.pca_solver, **f.summary()} for f in folds]}
        nan_folds = [f"{f.name} ({f.summary()['n_nan_genes']})" for f in folds if f.summary()["n_nan_genes"]]
        if nan_folds:
            warns.append(f"{mode}: genes constant on a test fold have no Pearson r and are left out of that fold's "
                         f"mean (HEST's mean would be nan): {', '.join(nan_folds)}")
        reduced = sorted({f.n_components for f in folds if f.n_components < MAX_PCS})
        if reduced:
            results["notes"].append(f"{mode}: PCA reduced to {reduced} components on small training folds")
        s = summaries[mode]
        table.append({"split": mode, "folds": s["n_folds"], **{m.upper().replace("PCC10", "PCC-10"): f"{s[m + '_mean']:.4f} ± {s[m + '_std']:.4f}" for m in METRICS},
                      "NaN genes": s["n_nan_genes_total"]})
        all_rows += per_gene_rows(mode, folds)
    means = gene_means(all_rows)
    _write_csv(os.path.join(args.out_dir, f"{args.name}_per_gene.csv"), all_rows)
    atomic_write_text(os.path.join(args.out_dir, f"{args.name}_per_gene_mean.csv"), means.to_csv(index=False))
    for mode, folds in folds_by_mode.items():
        plots.append(plot_per_fold(mode, folds, os.path.join(args.out_dir, f"{args.name}_pearson_{mode}.png")))
        plots.append(plot_best_genes(mode, folds, means, os.path.join(args.out_dir, f"{args.name}_best_genes_{mode}.png")))
    notes = ["Error metrics use the protocol's predictions (Ridge without intercept on centred PCs), on the log1p scale."]
    if "random" in summaries and "loso" in summaries:
        results["drop"] = drop(summaries["random"], summaries["loso"])
        results["drop_definition"] = "PCC, PCC-10: 1 - LOSO/random; MAE, MSE: LOSO/random - 1 (positive = LOSO worse)"
        table.append({"split": "drop", **{m.upper().replace("PCC10", "PCC-10"): f"{results['drop'][m]:.1%}" for m in METRICS}})
        notes.append(results["drop_definition"])
        plots.append(plot_compare({m: summaries[m] for m in ("random", "loso")}, os.path.join(args.out_dir, f"{args.name}_compare.png")))
    results["plots"] = plots
    write_report(args.out_dir, args.name, results, table, title=f"Gene expression ({args.genes})", notes=notes + results["notes"],
                 warnings=warns)
    LOG.info("report written to %s", os.path.join(args.out_dir, args.name + ".md"))
    return results


if __name__ == "__main__":
    main()
