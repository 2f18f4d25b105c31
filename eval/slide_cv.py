"""Slide-level cross-validation pieces shared by :mod:`eval.mil` and :mod:`eval.survival`.

Slide tables (``slide_id`` / ``patient_id`` CSVs matched to ``{slide_id}.h5`` feature files), a
lazily read bag store, patient-grouped stratified folds, the c-index and the fold summary.
"""
import os
from typing import Dict, List, Optional, Sequence

import h5py
import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedGroupKFold

from eval.common import LOG, feature_key


# --------------------------------------------------------------------------- slide tables
def read_slide_csv(path: str, required: Sequence[str]) -> pd.DataFrame:
    """Read a clinical/label CSV, check the ``required`` columns and unique ``slide_id``s."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CSV not found: {path}")
    df = pd.read_csv(path, dtype={"slide_id": str, "patient_id": str})
    missing = [c for c in ["slide_id", *required] if c not in df.columns]
    if missing:
        raise KeyError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    dup = df["slide_id"][df["slide_id"].duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"{path}: duplicated slide_id(s) {dup[:10]}")
    if "patient_id" not in df.columns or df["patient_id"].isna().any():
        if "patient_id" in df.columns:
            LOG.warning("%s: %d rows without patient_id use their slide_id as patient", path, int(df["patient_id"].isna().sum()))
            df["patient_id"] = df["patient_id"].fillna(df["slide_id"])
        else:
            df["patient_id"] = df["slide_id"]
    return df.reset_index(drop=True)


def match_slides(df: pd.DataFrame, features_dir: str, allow_partial: bool = False) -> pd.DataFrame:
    """Keep the rows of ``df`` that have ``{features_dir}/{slide_id}.h5``; adds a ``path`` column.

    Slides without a feature file, and feature files without a CSV row, are an error that names
    them, unless ``allow_partial`` (then they are logged, counted and dropped).
    """
    if not os.path.isdir(features_dir):
        raise FileNotFoundError(f"features directory not found: {features_dir}")
    on_disk = {f[:-3] for f in os.listdir(features_dir) if f.endswith(".h5")}
    wanted = set(df["slide_id"])
    no_feats = sorted(wanted - on_disk)
    no_rows = sorted(on_disk - wanted)
    if (no_feats or no_rows) and not allow_partial:
        raise ValueError(
            f"slides and feature files do not match: {len(no_feats)} slide(s) without features "
            f"{no_feats[:10]}, {len(no_rows)} feature file(s) without a CSV row {no_rows[:10]} "
            "(pass --allow-partial to drop them)"
        )
    if no_feats or no_rows:
        LOG.warning("dropping %d slide(s) without features and ignoring %d unlisted feature file(s)", len(no_feats), len(no_rows))
    out = df[df["slide_id"].isin(on_disk)].reset_index(drop=True).copy()
    if out.empty:
        raise ValueError(f"no slide of the CSV has a feature file in {features_dir}")
    out["path"] = [os.path.join(features_dir, f"{s}.h5") for s in out["slide_id"]]
    return out


class BagStore:
    """Reads slide features lazily, keeping bags in memory up to ``cache_gb`` (then reading from disk)."""

    def __init__(self, paths: Sequence[str], cache_gb: float = 8.0):
        self.paths = list(paths)
        self.cache: Dict[int, torch.Tensor] = {}
        self.budget = int(cache_gb * 2**30)
        self.dims = []
        for p in self.paths:
            try:
                with h5py.File(p, "r") as f:
                    shape = f[feature_key(f, p)].shape
            except OSError as e:
                raise OSError(f"cannot read slide feature file {p}: {e}") from e
            if len(shape) != 2 or shape[0] == 0:
                raise ValueError(f"{p}: 'features' must be a non-empty (N, D) array, got shape {shape}")
            self.dims.append(shape[1])
        if len(set(self.dims)) > 1:
            raise ValueError(f"slides have different feature dims {sorted(set(self.dims))}")
        self.dim = self.dims[0] if self.dims else 0

    def __len__(self) -> int:
        return len(self.paths)

    def __call__(self, i: int) -> torch.Tensor:
        if i in self.cache:
            return self.cache[i]
        with h5py.File(self.paths[i], "r") as f:
            bag = torch.from_numpy(np.asarray(f[feature_key(f, self.paths[i])][()], dtype=np.float32))
        if not torch.isfinite(bag).all():
            raise ValueError(f"{self.paths[i]}: features contain NaN or inf")
        if bag.numel() * 4 <= self.budget:
            self.cache[i] = bag
            self.budget -= bag.numel() * 4
        return bag

    def coords(self, i: int) -> Optional[np.ndarray]:
        with h5py.File(self.paths[i], "r") as f:
            return f["coords"][()] if "coords" in f else None


def grouped_folds(strata: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> List[tuple]:
    """StratifiedGroupKFold splits; ``n_splits`` is lowered (with a warning) to the number of groups."""
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError(f"cross-validation needs at least 2 patients, got {n_groups}")
    if n_groups < n_splits:
        LOG.warning("only %d patients: using %d folds instead of %d", n_groups, n_groups, n_splits)
        n_splits = n_groups
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(cv.split(np.zeros(len(strata)), strata, groups))


def validate_survival(df: pd.DataFrame, time_col: str, event_col: str, source: str = "clinical CSV") -> pd.DataFrame:
    """Check times (present, finite, >= 0) and events (0/1, at least one event); name offending slides."""
    df = df.copy()
    t = pd.to_numeric(df[time_col], errors="coerce")
    bad = df["slide_id"][t.isna() | ~np.isfinite(t.fillna(0))].tolist()
    if bad:
        raise ValueError(f"{source}: missing or non-numeric {time_col!r} for slide(s) {bad[:10]}")
    neg = df["slide_id"][t < 0].tolist()
    if neg:
        raise ValueError(f"{source}: negative {time_col!r} for slide(s) {neg[:10]}")
    ev = df[event_col].map(lambda v: {"true": 1, "false": 0}.get(str(v).strip().lower(), v))
    e = pd.to_numeric(ev, errors="coerce")
    bad = df["slide_id"][~e.isin([0, 1])].tolist()
    if bad:
        raise ValueError(f"{source}: {event_col!r} must be 0/1 (or true/false); bad value for slide(s) {bad[:10]}")
    if e.sum() == 0:
        raise ValueError(f"{source}: all {len(df)} slides are censored ({event_col!r} is 0 everywhere); survival needs events")
    df[time_col], df[event_col] = t.astype(float), e.astype(int)
    return df


# --------------------------------------------------------------------------- metrics
def cindex(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's c-index (sksurv ``concordance_index_censored``); NaN when no pair is comparable."""
    from sksurv.metrics import concordance_index_censored

    try:
        return float(concordance_index_censored(event.astype(bool), time.astype(float), risk.astype(float))[0])
    except ValueError:  # no events / no comparable pairs
        return float("nan")


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean, population std and standard error over folds (non-finite folds left out of mean and std).

    ``se`` is Patho-Bench's (patho_bench/experiments/BaseExperiment.py::get_mean_se): ``np.std`` over
    the folds divided by the square root of the number of folds.
    """
    n = len(values)
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not v.size:
        return {"mean": float("nan"), "std": float("nan"), "se": float("nan")}
    return {"mean": float(v.mean()), "std": float(v.std()), "se": float(v.std() / np.sqrt(n))}
