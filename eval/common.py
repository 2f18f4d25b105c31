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

from dino.atomic import atomic_write
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


def add_common_args(parser: argparse.ArgumentParser, default_out: str = "eval_out", default_seed: int = 0,
                    seed_help: str = "random seed (PCA, CV shuffling, ...)") -> argparse.ArgumentParser:
    """Add ``--out-dir`` and ``--seed`` (shared by every eval script)."""
    parser.add_argument("--out-dir", default=default_out, help="directory for the JSON/markdown report and plots")
    parser.add_argument("--seed", type=int, default=default_seed, help=f"{seed_help} (default {default_seed})")
    return parser


def parse_cli(parser: argparse.ArgumentParser, argv: Optional[Iterable[str]] = None) -> argparse.Namespace:
    """The start of every eval script's ``main``: parse ``argv``, set up logging, seed (when ``--seed`` is given)."""
    args = parser.parse_args(argv)
    setup_logging()
    if getattr(args, "seed", None) is not None:
        set_seed(args.seed)
    return args


def parse_model_kwargs(text: str) -> Dict[str, Any]:
    """The ``--model-kwargs`` JSON object (create_model / load_pretrained overrides) of every eval script."""
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--model-kwargs is not valid JSON: {err}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model-kwargs must be a JSON object such as '{{\"depth\": 2}}', got {text!r}")
    return kwargs


def atomic_write_text(path: str, text: str) -> None:
    """Write text to ``path`` through a temporary file and ``os.replace`` (no half-written files)."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def save_figure(fig, path: str, dpi: int = 120) -> str:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=os.path.splitext(path)[1][1:] or "png")
    finally:
        plt.close(fig)
    return path


def _encode(values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind in "UO":  # h5py stores str as variable-length utf-8
        return np.asarray([str(v) for v in arr.ravel()], dtype=object).reshape(arr.shape)
    return arr


def save_features_h5(path: str, features: np.ndarray, /, attrs: Optional[Mapping[str, Any]] = None,
                     **datasets: Any) -> str:
    """Write ``features`` (N,D) float32 and extra datasets (coords, barcode, label, path...) atomically.

    Every extra dataset must have N rows; strings are stored as utf-8. ``attrs`` become file
    attributes (``extract_features`` records the model and preprocessing there).
    """
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {features.shape}")
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = "mvhybrid"
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
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
    return path


def _decode(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind == "S" or (arr.dtype == object and arr.size and isinstance(arr.flat[0], bytes)):
        return np.asarray([v.decode("utf-8") for v in arr.ravel()], dtype=object).reshape(arr.shape).astype(str)
    if arr.dtype == object:
        return arr.astype(str)
    return arr


# Feature-file layouts read natively. HEST-Benchmark (src/hest/bench/benchmark.py::embed_tiles with
# utils/file_utils.py::save_hdf5) writes `embeddings` (N, D) and `barcodes` (N, 1) bytes; CLAM
# (extract_features_fp.py) and Trident (trident/IO.py::save_h5) write `features` (N, D) and `coords`
# (N, 2), Trident with attributes such as `encoder` on `features`. Our own files add a `format` attribute.
FEATURE_FORMATS = {
    "mvhybrid": "features (N, D) [+ barcode, coords, label, ...], attribute format='mvhybrid'",
    "hest": "embeddings (N, D) + barcodes (N, 1) bytes (HEST-Benchmark)",
    "clam": "features (N, D) + coords (N, 2) (CLAM)",
    "trident": "features (N, D) + coords (N, 2) with attributes on features (Trident)",
}


def detect_feature_format(names: Iterable[str], attrs: Mapping[str, Any], feature_attrs: Mapping[str, Any]) -> Optional[str]:
    """Which of :data:`FEATURE_FORMATS` a file with these top-level datasets and attributes is (None: none)."""
    names = set(names)
    if "features" in names:
        if attrs.get("format") == "mvhybrid":
            return "mvhybrid"
        if "coords" in names and "encoder" in feature_attrs:
            return "trident"
        if "coords" in names:
            return "clam"
        return "mvhybrid"
    if "embeddings" in names and "barcodes" in names:
        return "hest"
    return None


def feature_key(f: "h5py.File", path: str) -> str:
    """Name of the feature dataset in an open h5 (``features`` or HEST's ``embeddings``), or a clear error."""
    feat = f.get("features")
    fmt = detect_feature_format(f.keys(), f.attrs, feat.attrs if isinstance(feat, h5py.Dataset) else {})
    if fmt is None:
        accepted = "; ".join(f"{k}: {v}" for k, v in FEATURE_FORMATS.items())
        raise KeyError(f"{path} is not a feature file of a known layout: no 'features' dataset and no "
                       f"'embeddings' + 'barcodes' (found: {sorted(f.keys())}). Accepted: {accepted}")
    return "embeddings" if fmt == "hest" else "features"


def load_features_h5(path: str) -> Dict[str, np.ndarray]:
    """Read a feature h5 in any layout of :data:`FEATURE_FORMATS` into one dict.

    ``features`` is (N, D) float32; HEST's ``embeddings``/``barcodes`` become ``features``/``barcode``;
    (N, 1) columns are flattened; byte strings (barcodes, paths) become ``str``. The layout found is
    under ``"_format"`` and the file's attributes under ``"_attrs"``. Anything else raises an error
    naming the file, the datasets found and the layouts accepted.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"feature file not found: {path}")
    out: Dict[str, Any] = {}
    try:
        with h5py.File(path, "r") as f:
            feature_key(f, path)  # a clear error for an unknown layout, before reading anything
            for name, obj in f.items():
                if isinstance(obj, h5py.Dataset):
                    out[name] = _decode(obj[()])
            attrs = {k: _attr(v) for k, v in f.attrs.items()}
            feat_attrs = dict(f["features"].attrs) if isinstance(f.get("features"), h5py.Dataset) else {}
    except OSError as e:
        raise OSError(f"cannot read feature file {path}: {e}") from e
    fmt = detect_feature_format(out, attrs, feat_attrs)
    if fmt == "hest":
        out["features"] = out.pop("embeddings")
        out["barcode"] = out.pop("barcodes")
    feats = np.asarray(out["features"])
    if feats.ndim == 1 and feats.size:  # a single (slide) embedding of shape (D,)
        feats = feats[None, :]
    if feats.ndim != 2:
        raise ValueError(f"{path}: features must be 2-D (N, D), got shape {feats.shape}")
    out["features"] = feats.astype(np.float32, copy=False)
    n = len(feats)
    for name, arr in list(out.items()):
        if name != "features" and isinstance(arr, np.ndarray) and arr.ndim == 2 and arr.shape[1] == 1 and len(arr) == n:
            out[name] = arr[:, 0]
    out["_format"] = fmt
    out["_attrs"] = attrs
    return out


def _attr(v: Any) -> Any:
    return v.decode("utf-8") if isinstance(v, bytes) else v


def check_features(x: np.ndarray, where: str) -> np.ndarray:
    """Raise a ``ValueError`` naming ``where`` when features are not 2-D or hold NaN/inf."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{where}: features must be 2-D (N, D), got shape {x.shape}")
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise ValueError(f"{where}: features contain NaN or inf in {len(rows)} of {len(x)} rows "
                         f"(first rows {rows[:5].tolist()}); re-extract them or drop those rows")
    return x


class Warnings(list):
    """Warnings about degenerate inputs or results: each goes to the console now and into the report."""

    def add(self, msg: str) -> None:
        LOG.warning(msg)
        self.append(msg)

    def check_features(self, x: np.ndarray, where: str) -> None:
        """Warn about features that carry no information: all zero, or the same vector on every row."""
        x = np.asarray(x)
        if not x.size:
            return
        if not np.any(x):
            self.add(f"{where}: every feature is zero; results are meaningless")
        elif len(x) > 1 and np.all(x == x[0]):
            self.add(f"{where}: all {len(x)} feature rows are identical (constant features); results are meaningless")


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
    title: Optional[str] = None, notes: Optional[Iterable[str]] = None, warnings: Optional[Iterable[str]] = None,
) -> Dict[str, str]:
    """Write ``<out_dir>/<name>.json`` (results, NaN -> null) and ``<out_dir>/<name>.md`` (title, table, notes).

    ``warnings`` (degenerate inputs or results) go to the JSON under ``"warnings"`` and above the table.
    """
    ensure_dir(out_dir)
    warnings = list(warnings or [])
    results = {**results, "warnings": warnings}
    json_path = os.path.join(out_dir, f"{name}.json")
    md_path = os.path.join(out_dir, f"{name}.md")
    atomic_write_text(json_path, json.dumps(_jsonable(results), indent=2, sort_keys=False) + "\n")
    md = f"# {title or name}\n\n" + "".join(f"> **Warning:** {w}\n>\n" for w in warnings)
    md += ("\n" if warnings else "") + markdown_table(table_rows)
    notes = [n for n in (notes or []) if n]
    if notes:
        md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    atomic_write_text(md_path, md)
    return {"json": json_path, "md": md_path}


def ensure_dir(path: str) -> str:
    """``os.makedirs(path, exist_ok=True)`` with a clear error when ``path`` (or a parent) is a file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"output folder {path} exists and is a file; choose another path")
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise NotADirectoryError(f"cannot create output folder {path}: a parent is a file ({e})") from None
    return path


def pyplot():
    """Return ``matplotlib.pyplot`` on the non-interactive Agg backend (safe on headless cluster nodes)."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
