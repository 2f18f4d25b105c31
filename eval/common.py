"""Shared helpers of the evaluation scripts: feature h5 I/O, reports, seeding, CLI arguments, logging."""
import argparse
import json
import logging
import math
import os
import random
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional

import h5py
import numpy as np

from dino.utils.atomic import atomic_temp_path
from mambavision import HE_MEAN, HE_STD  # noqa: F401  (re-exported for the eval scripts)

LOG = logging.getLogger("eval")



def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Configure the ``eval`` logger once (idempotent), writing ``time level message`` to stderr."""
    if not LOG.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        LOG.addHandler(handler)
        LOG.propagate = False
    LOG.setLevel(level)
    return LOG


def set_seed(seed: int) -> None:
    """Seed python, numpy and (when importable) torch RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # the sklearn-only evals must not need torch
        pass


def add_common_args(parser: argparse.ArgumentParser, default_out: str = "eval_out") -> argparse.ArgumentParser:
    """Add ``--out-dir`` and ``--seed`` (shared by every eval script)."""
    parser.add_argument("--out-dir", default=default_out, help="directory for the JSON/markdown report and plots")
    parser.add_argument("--seed", type=int, default=0, help="random seed (PCA, CV shuffling, ...)")
    return parser


def _tmp_path_for(path: str) -> str:
    return atomic_temp_path(os.path.abspath(path))


def atomic_write_text(path: str, text: str) -> None:
    """Write text to ``path`` through a temporary file and ``os.replace`` (no half-written files)."""
    tmp = _tmp_path_for(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_figure(fig, path: str, dpi: int = 120) -> str:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    tmp = _tmp_path_for(path)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=os.path.splitext(path)[1][1:] or "png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _encode(values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind in "UO":  # h5py stores str as variable-length utf-8
        return np.asarray([str(v) for v in arr.ravel()], dtype=object).reshape(arr.shape)
    return arr


def save_features_h5(path: str, features: np.ndarray, /, **datasets: Any) -> str:
    """Write ``features`` (N,D) float32 and extra datasets (coords, barcode, label, path...) atomically.

    Every extra dataset must have N rows; strings are stored as utf-8.
    """
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {features.shape}")
    tmp = _tmp_path_for(path)
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features)
            for name, values in datasets.items():
                if values is None:
                    continue
                arr = _encode(values)
                if len(arr) != len(features):
                    raise ValueError(f"dataset '{name}' has {len(arr)} rows but features has {len(features)}")
                if arr.dtype == object:
                    f.create_dataset(name, data=arr, dtype=h5py.string_dtype("utf-8"))
                else:
                    f.create_dataset(name, data=arr)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _decode(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind == "S" or (arr.dtype == object and arr.size and isinstance(arr.flat[0], bytes)):
        return np.asarray([v.decode("utf-8") for v in arr.ravel()], dtype=object).reshape(arr.shape).astype(str)
    if arr.dtype == object:
        return arr.astype(str)
    return arr


def load_features_h5(path: str) -> Dict[str, np.ndarray]:
    """Read every top-level dataset of a feature h5; byte strings (barcodes, paths) become ``str``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"feature file not found: {path}")
    out: Dict[str, np.ndarray] = {}
    try:
        with h5py.File(path, "r") as f:
            for name, obj in f.items():
                if isinstance(obj, h5py.Dataset):
                    out[name] = _decode(obj[()])
    except OSError as e:
        raise OSError(f"cannot read feature file {path}: {e}") from e
    if "features" not in out:
        raise KeyError(f"{path} has no 'features' dataset (found: {sorted(out)})")
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def markdown_table(rows: List[Mapping[str, Any]], columns: Optional[Iterable[str]] = None) -> str:
    """Render a list of dicts as a GitHub markdown table (floats with 4 decimals)."""
    if not rows:
        return "_(no rows)_\n"
    cols = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)  # strict JSON has no NaN
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


def write_report(
    out_dir: str, name: str, results: Mapping[str, Any], table_rows: List[Mapping[str, Any]],
    title: Optional[str] = None, notes: Optional[Iterable[str]] = None,
) -> Dict[str, str]:
    """Write ``<out_dir>/<name>.json`` (results, NaN -> null) and ``<out_dir>/<name>.md`` (title, table, notes)."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{name}.json")
    md_path = os.path.join(out_dir, f"{name}.md")
    atomic_write_text(json_path, json.dumps(_jsonable(results), indent=2, sort_keys=False) + "\n")
    md = f"# {title or name}\n\n" + markdown_table(table_rows)
    notes = [n for n in (notes or []) if n]
    if notes:
        md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    atomic_write_text(md_path, md)
    return {"json": json_path, "md": md_path}


def pyplot():
    """Return ``matplotlib.pyplot`` on the non-interactive Agg backend (safe on headless cluster nodes)."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
