"""Linear probe (patch classification) on frozen features, with three named protocols.

``--protocol`` (default ``sweep``):

* ``sweep`` (ours): ``LogisticRegression(C, class_weight='balanced', max_iter=10000)`` with C chosen
  from 9 values 1e-4..1e4 by validation balanced accuracy (or stratified K-fold CV on train with
  ``--cv K``), refitted on train (or train+val with ``--refit-train-val``), scored on test.
* ``patho-bench``: Patho-Bench's shipped linear probe (mahmoodlab/Patho-Bench,
  advanced_usage/configs/linprobe/linprobe.yaml: COST 0.5, BALANCED True;
  patho_bench/experiments/LinearProbeExperiment.py, ExperimentFactory.py: max_iter 10000,
  random_state 0): one C=0.5, balanced class weights, fitted on train, no selection.
* ``dinov2``: DINOv2's ``log_regression`` (facebookresearch/dinov2, dinov2/eval/log_regression.py):
  45 values C = 10**linspace(-6, 5, 45), L2 penalty, no class weights, max_iter 1000, tol 1e-12,
  float64; C chosen by top-1 accuracy on val (without val rows, on a random 10% of train drawn with
  ``torch.manual_seed(0)``), then refitted on train + that tuning set. DINOv2 fits with cuML; here
  scikit-learn's lbfgs solves the same objective.

Without a split column, ``--cv K`` runs an outer stratified K-fold instead (the sweep chooses C by
inner CV on each outer-train part).

Metrics: balanced accuracy, macro-F1, weighted F1, macro one-vs-rest AUROC (binary: AUROC of the
positive class).

Examples::

    python -m eval.linear_probe --features feats/mhist.h5 --out-dir results/mhist
    python -m eval.linear_probe --features feats/unitopatho.h5 --cv 5 --select-metric macro_f1
"""
import argparse
import os
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from eval.common import LOG, Warnings, add_common_args, atomic_write_text, check_features, ensure_dir, load_features_h5, \
    parse_cli, pyplot, save_figure, write_report

DEFAULT_C_GRID = tuple(float(c) for c in np.logspace(-4, 4, 9))
SELECT_METRICS = ("balanced_accuracy", "macro_f1", "accuracy")


@dataclass(frozen=True)
class Protocol:
    """How C is chosen and the model fitted; see the module docstring for the sources."""

    name: str
    c_grid: Tuple[float, ...]
    class_weight: Optional[str]
    max_iter: int
    tol: float
    select_metric: str  # metric that picks C (unused with one C)
    refit_train_val: bool
    random_state: Optional[int]  # None: the --seed
    follows: str


PROTOCOLS = {
    "sweep": Protocol("sweep", DEFAULT_C_GRID, "balanced", 10000, 1e-4, "balanced_accuracy", False, None,
                      "ours"),
    "patho-bench": Protocol("patho-bench", (0.5,), "balanced", 10000, 1e-4, "balanced_accuracy", False, 0,
                            "mahmoodlab/Patho-Bench advanced_usage/configs/linprobe/linprobe.yaml, "
                            "patho_bench/experiments/LinearProbeExperiment.py"),
    "dinov2": Protocol("dinov2", tuple(float(c) for c in 10.0 ** np.linspace(-6, 5, 45)), None, 1000, 1e-12,
                       "accuracy", True, None, "facebookresearch/dinov2 dinov2/eval/log_regression.py"),
}


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, n_classes: int) -> Dict[str, float]:
    """Balanced accuracy, macro-F1, weighted F1 and macro OvR AUROC from class probabilities.

    ``y_true`` holds class indices 0..n_classes-1; ``proba`` is (N, n_classes). AUROC is NaN when
    the evaluated set holds a single class.
    """
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    pred = proba.argmax(axis=1)
    labels = np.arange(n_classes)
    out = {"accuracy": float(np.mean(pred == y_true)),
           "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
           "macro_f1": float(f1_score(y_true, pred, average="macro", labels=labels, zero_division=0)),
           "weighted_f1": float(f1_score(y_true, pred, average="weighted", labels=labels, zero_division=0))}
    present = np.unique(y_true)
    if len(present) < 2:
        out["macro_auroc"] = float("nan")
    elif n_classes == 2:
        out["macro_auroc"] = float(roc_auc_score(y_true, proba[:, 1]))
    elif len(present) == n_classes:
        out["macro_auroc"] = float(roc_auc_score(y_true, proba, multi_class="ovr", average="macro", labels=labels))
    else:  # one-vs-rest over the classes present (the others have no positive)
        out["macro_auroc"] = float(np.mean([roc_auc_score(y_true == c, proba[:, c]) for c in present]))
    return out


def _logreg(c: float, seed: int, protocol: Protocol = PROTOCOLS["sweep"]):
    from sklearn.linear_model import LogisticRegression

    seed = seed if protocol.random_state is None else protocol.random_state
    return LogisticRegression(C=c, class_weight=protocol.class_weight, max_iter=protocol.max_iter, tol=protocol.tol,
                              random_state=seed)


def _proba_full(model, x: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over all classes, even when the training set lacked some of them."""
    p = model.predict_proba(x)
    out = np.zeros((len(x), n_classes))
    out[:, model.classes_] = p
    return out


def choose_c(x_tr, y_tr, n_classes, c_grid, seed, metric, x_val=None, y_val=None, cv: int = 0,
             protocol: Protocol = PROTOCOLS["sweep"]) -> Tuple[float, List[dict]]:
    """Pick C maximising ``metric`` on (x_val, y_val), or by stratified ``cv``-fold CV on the training data.

    Ties: the C closest to 1 (sweep), or the first C of the grid (dinov2's sweep keeps the first best).
    """
    from sklearn.model_selection import StratifiedKFold

    if len(c_grid) == 1:
        return float(c_grid[0]), [{"C": float(c_grid[0]), metric: float("nan")}]
    scores = []
    for c in c_grid:
        if cv:
            counts = np.bincount(y_tr)
            smallest = int(counts[counts > 0].min())
            k = min(cv, smallest)  # stratified CV cannot use more folds than the rarest class has samples
            if k < 2:
                raise ValueError(f"--cv {cv}: a class has only {smallest} training sample; stratified CV needs 2")
            vals = []
            for tr, va in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(x_tr, y_tr):
                m = _logreg(c, seed, protocol).fit(x_tr[tr], y_tr[tr])
                vals.append(classification_metrics(y_tr[va], _proba_full(m, x_tr[va], n_classes), n_classes)[metric])
            score = float(np.mean(vals))
        else:
            m = _logreg(c, seed, protocol).fit(x_tr, y_tr)
            score = classification_metrics(y_val, _proba_full(m, x_val, n_classes), n_classes)[metric]
        scores.append({"C": c, metric: score})
    if protocol.name == "dinov2":
        best = scores[int(np.argmax([r[metric] for r in scores]))]
    else:
        best = max(scores, key=lambda r: (r[metric], -abs(np.log10(r["C"]))))
    return best["C"], scores


def plot_confusion(y_true: np.ndarray, pred: np.ndarray, class_names: Sequence[str], path: str, title: str) -> str:
    """Row-normalised confusion matrix with class names and counts."""
    from sklearn.metrics import confusion_matrix

    plt = pyplot()
    k = len(class_names)
    cm = confusion_matrix(y_true, pred, labels=np.arange(k))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * k, 0.8 + 0.7 * k))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{norm[i, j]:.2f}\n({cm[i, j]})", ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save_figure(fig, path)


def _encode_labels(labels: np.ndarray) -> Tuple[np.ndarray, List[str]]:
    classes = sorted(np.unique(labels).tolist(), key=lambda v: (str(type(v)), v))
    if len(classes) < 2:
        raise ValueError(f"the linear probe needs at least 2 classes, found {classes}")
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[v] for v in labels]), [str(c) for c in classes]


def _dinov2_tuning_split(tr: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """DINOv2 without a tuning set: a random 10% of train (``torch.manual_seed(0)``, ``randperm``) tunes C."""
    import torch

    torch.manual_seed(0)
    perm = torch.randperm(len(tr)).numpy()
    n_tune = len(tr) // 10
    return tr[perm[n_tune:]], tr[perm[:n_tune]]


def _check_split_classes(y: np.ndarray, idx: Dict[str, np.ndarray], class_names: List[str], where: str,
                         warns: Warnings) -> None:
    """A one-class training split cannot be fitted (error); a class absent from another split is warned about."""
    train_classes = np.unique(y[idx["train"]])
    if len(train_classes) < 2:
        raise ValueError(f"{where}: the training split holds only class {class_names[train_classes[0]]!r} "
                         f"({len(idx['train'])} rows); a classifier needs at least 2 classes")
    for part, rows in idx.items():
        if not len(rows):
            continue
        missing = sorted(set(range(len(class_names))) - set(np.unique(y[rows]).tolist()))
        if missing:
            warns.add(f"{where}: class(es) {[class_names[c] for c in missing]} absent from the {part} split "
                      f"({len(rows)} rows)")


def run_probe(
    x: np.ndarray, labels: np.ndarray, split: Optional[np.ndarray] = None, cv: int = 0,
    c_grid: Optional[Sequence[float]] = None, seed: int = 0, select_metric: Optional[str] = None,
    refit_train_val: Optional[bool] = None, protocol: str = "sweep", where: str = "features",
    warns: Optional[Warnings] = None,
) -> Dict:
    """The probe on in-memory data. Returns metrics, chosen C, per-fold details and test predictions.

    ``c_grid``, ``select_metric`` and ``refit_train_val`` override the protocol's own values.
    Degenerate inputs or results are added to ``warns`` (console and report).
    """
    from sklearn.model_selection import StratifiedKFold

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown --protocol '{protocol}' (choose from {tuple(PROTOCOLS)})")
    proto = PROTOCOLS[protocol]
    proto = replace(proto, c_grid=tuple(c_grid) if c_grid is not None else proto.c_grid,
                    select_metric=select_metric or proto.select_metric,
                    refit_train_val=proto.refit_train_val if refit_train_val is None else refit_train_val)
    if proto.select_metric not in SELECT_METRICS:
        raise ValueError(f"unknown --select-metric '{proto.select_metric}' (choose from {SELECT_METRICS})")
    warns = Warnings() if warns is None else warns
    x = np.asarray(check_features(x, where), dtype=np.float64)
    warns.check_features(x, where)
    y, class_names = _encode_labels(np.asarray(labels))
    k = len(class_names)
    folds = []
    if split is not None:
        split = np.asarray(split).astype(str)
        unknown = sorted(set(split) - {"train", "val", "test"})
        if unknown:
            raise ValueError(f"{where}: split column has values other than train/val/test: {unknown}")
        tr, va, te = (np.flatnonzero(split == s) for s in ("train", "val", "test"))
        if not len(tr) or not len(te):
            raise ValueError(f"{where}: need non-empty train and test splits (train {len(tr)}, val {len(va)}, test {len(te)})")
        if protocol == "dinov2" and not len(va) and not cv:
            tr, va = _dinov2_tuning_split(tr)
        if not cv and not len(va) and len(proto.c_grid) > 1:
            raise ValueError(f"{where}: no 'val' rows to choose C: add a val split or pass --cv K (CV on train)")
        _check_split_classes(y, {"train": tr, "val": va, "test": te}, class_names, where, warns)
        folds.append(("test", tr, va, te))
    else:
        if cv < 2:
            raise ValueError(f"{where}: without a split column, pass --cv K (K >= 2) for stratified K-fold evaluation")
        min_count = int(np.bincount(y).min())
        if min_count < cv:
            raise ValueError(f"{where}: --cv {cv}: the smallest class has only {min_count} samples")
        for i, (tr, te) in enumerate(StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed).split(x, y)):
            va = np.array([], int)
            if protocol == "dinov2":
                tr, va = _dinov2_tuning_split(tr)
            folds.append((f"fold{i}", tr, va, te))
    results, preds = [], []
    for name, tr, va, te in folds:
        use_val = len(va) > 0 and (not cv or protocol == "dinov2")
        c, grid = choose_c(x[tr], y[tr], k, proto.c_grid, seed, proto.select_metric,
                           x[va] if use_val else None, y[va] if use_val else None,
                           cv=0 if use_val else max(cv, 2), protocol=proto)
        fit_idx = np.concatenate([tr, va]) if proto.refit_train_val and len(va) else tr
        model = _logreg(c, seed, proto).fit(x[fit_idx], y[fit_idx])
        proba = _proba_full(model, x[te], k)
        m = classification_metrics(y[te], proba, k)
        if np.isnan(m["macro_auroc"]):
            warns.add(f"{where}, {name}: AUROC undefined (nan): the test set holds a single class")
        LOG.info("%s: C=%g  %s", name, c, "  ".join(f"{a} {b:.4f}" for a, b in m.items()))
        results.append({"name": name, "C": c, "n_train": len(fit_idx), "n_test": len(te), **m, "c_search": grid})
        preds.append((te, proba))
    metric_names = ("balanced_accuracy", "macro_f1", "weighted_f1", "macro_auroc", "accuracy")
    summary = {m: float(np.mean([r[m] for r in results])) for m in metric_names}
    summary.update({f"{m}_std": float(np.std([r[m] for r in results])) for m in metric_names})
    idx = np.concatenate([p[0] for p in preds])
    proba = np.concatenate([p[1] for p in preds])
    return {"summary": summary, "folds": results, "class_names": class_names, "test_index": idx,
            "test_true": y[idx], "test_proba": proba, "seed": seed, "select_metric": proto.select_metric,
            "c_grid": list(proto.c_grid), "protocol": protocol, "follows": proto.follows,
            "refit_train_val": proto.refit_train_val, "warnings": warns}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--features", required=True, help="feature h5 with features and label (and a split column)")
    p.add_argument("--label-key", default="label", help="dataset holding the class label")
    p.add_argument("--split-key", default="split", help="dataset holding train/val/test (absent: use --cv)")
    p.add_argument("--cv", type=int, default=0, help="choose C by stratified K-fold CV on train (or, without a "
                                                     "split column, evaluate by outer stratified K-fold)")
    p.add_argument("--protocol", choices=tuple(PROTOCOLS), default="sweep",
                   help="sweep (default, ours): 9 C values by val balanced accuracy, balanced weights; patho-bench: "
                        "Patho-Bench's C=0.5, balanced weights; dinov2: DINOv2's 45 C values by val top-1, no weights, "
                        "refit on train+val")
    p.add_argument("--c-grid", default=None, help="comma list of C values (default: the protocol's; sweep: "
                   + ",".join(f"{c:g}" for c in DEFAULT_C_GRID) + ")")
    p.add_argument("--select-metric", choices=SELECT_METRICS, default=None,
                   help="metric to choose C (default: the protocol's; sweep: balanced_accuracy, dinov2: accuracy)")
    p.add_argument("--refit-train-val", action="store_true", default=None,
                   help="refit the chosen C on train+val before testing (dinov2 always does)")
    p.add_argument("--name", default="linear_probe", help="report file stem")
    add_common_args(p, default_out="eval_out/linear_probe")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Run the probe from the command line; returns the results dict also written to JSON."""
    args = parse_cli(build_parser(), argv)
    data = load_features_h5(args.features)
    if args.label_key not in data:
        raise KeyError(f"{args.features} has no '{args.label_key}' dataset (found: {sorted(data)})")
    c_grid = None
    if args.c_grid is not None:
        try:
            c_grid = [float(c) for c in args.c_grid.split(",") if c.strip()]
        except ValueError:
            raise ValueError(f"--c-grid must be a comma list of numbers, got '{args.c_grid}'") from None
        if not c_grid or min(c_grid) <= 0:
            raise ValueError("--c-grid needs positive values")
    split = data.get(args.split_key)
    res = run_probe(data["features"], data[args.label_key], split, args.cv, c_grid, args.seed, args.select_metric,
                    args.refit_train_val, args.protocol, where=args.features)
    ensure_dir(args.out_dir)
    names = res["class_names"]
    pred = res["test_proba"].argmax(axis=1)
    cm_path = plot_confusion(res["test_true"], pred, names, os.path.join(args.out_dir, f"{args.name}_confusion.png"),
                             f"{os.path.basename(args.features)}: balanced acc {res['summary']['balanced_accuracy']:.3f}")
    pred_df = pd.DataFrame({"index": res["test_index"], "true": [names[i] for i in res["test_true"]],
                            "pred": [names[i] for i in pred],
                            **{f"p_{n}": res["test_proba"][:, i] for i, n in enumerate(names)}})
    if "path" in data:
        pred_df.insert(1, "path", data["path"][res["test_index"]])
    atomic_write_text(os.path.join(args.out_dir, f"{args.name}_predictions.csv"), pred_df.to_csv(index=False))
    s = res["summary"]
    rows = [{"split": f["name"], "C": f"{f['C']:g}", "n_test": f["n_test"], "balanced acc": f["balanced_accuracy"],
             "macro-F1": f["macro_f1"], "weighted F1": f["weighted_f1"], "macro AUROC": f["macro_auroc"]}
            for f in res["folds"]]
    if len(rows) > 1:
        rows.append({"split": "mean ± std", **{k: f"{s[m]:.4f} ± {s[m + '_std']:.4f}" for k, m in
                     (("balanced acc", "balanced_accuracy"), ("macro-F1", "macro_f1"), ("weighted F1", "weighted_f1"),
                      ("macro AUROC", "macro_auroc"))}})
    proto = PROTOCOLS[args.protocol]
    out = {"features": args.features, "classes": names, "seed": args.seed, "protocol": args.protocol,
           "follows": res["follows"], "select_metric": res["select_metric"], "c_grid": res["c_grid"], "cv": args.cv,
           "refit_train_val": res["refit_train_val"], "summary": s, "folds": res["folds"], "confusion_matrix_png": cm_path}
    how = ("one C, no selection" if len(res["c_grid"]) == 1 else
           f"C from {len(res['c_grid'])} values chosen by {res['select_metric']} on "
           f"{'val' if split is not None and not args.cv else f'{args.cv}-fold CV'}")
    write_report(args.out_dir, args.name, out, rows, title=f"Linear probe: {os.path.basename(args.features)}",
                 notes=[f"Protocol '{args.protocol}' (default 'sweep'; follows {res['follows']}): LogisticRegression("
                        f"class_weight={proto.class_weight!r}, max_iter={proto.max_iter}, tol={proto.tol:g}), {how}"
                        f"{', refit on train+val' if res['refit_train_val'] else ''}; seed {args.seed}"],
                 warnings=res["warnings"])
    return out


if __name__ == "__main__":
    main()
