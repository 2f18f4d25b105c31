"""Slide-level multiple-instance learning with ABMIL (e.g. MSI vs MSS on TCGA-CRC).

Inputs: a directory of CLAM-style slide feature files ``{slide_id}.h5`` (``features`` (N,D),
``coords`` (N,2)) and a CSV with ``slide_id``, ``label`` (or time/event for ``--task survival``)
and optionally ``patient_id``. Cross-validation is grouped by patient (StratifiedGroupKFold), so
no patient has slides on both sides of a split. Reports AUROC and balanced accuracy (or
Harrell's c-index) per fold and mean ± std, and a ROC plot.

    python -m eval.mil --features-dir feats/ --csv msi.csv --out-dir out/msi
"""
import argparse
import os
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score, roc_curve

from eval.abmil import ABMILConfig, predict_abmil, train_abmil
from eval.common import LOG, add_common_args, ensure_dir, parse_cli, save_features_h5, save_figure, set_seed, write_report
from eval.slide_cv import BagStore, cindex, grouped_folds, match_slides, mean_std, read_slide_csv, validate_survival


# --------------------------------------------------------------------------- metrics
def auroc(y: np.ndarray, prob: np.ndarray, n_classes: int) -> float:
    """Binary AUROC on P(class 1), or macro one-vs-rest AUROC; NaN if a class is missing."""
    if len(np.unique(y)) < 2:
        return float("nan")
    if n_classes == 2:
        return float(roc_auc_score(y, prob[:, 1]))
    if len(np.unique(y)) < n_classes:
        return float("nan")
    return float(roc_auc_score(y, prob, multi_class="ovr", average="macro"))


# --------------------------------------------------------------------------- CV driver
def run_mil_cv(
    get_bag: Callable[[int], torch.Tensor], n_bags: int, task: str, labels: Optional[np.ndarray] = None, times: Optional[np.ndarray] = None,
    events: Optional[np.ndarray] = None, groups: Optional[np.ndarray] = None, n_classes: int = 2,
    n_folds: int = 5, cfg: Optional[ABMILConfig] = None, seed: int = 0, device: Optional[torch.device] = None,
) -> Dict:
    """Patient-grouped K-fold ABMIL over bags ``get_bag(0..n_bags-1)`` (e.g. a :class:`BagStore`).

    Returns per-fold metrics with their mean ± std, out-of-fold outputs and per-slide attention.
    """
    cfg = cfg or ABMILConfig()
    n = n_bags
    in_dim = int(get_bag(0).shape[-1])
    groups = np.arange(n) if groups is None else np.asarray(groups)
    strata = labels if task == "classification" else events.astype(int)
    folds = grouped_folds(np.asarray(strata), groups, n_folds, seed)
    n_out = n_classes if task == "classification" else 1
    oof = np.full((n, n_out), np.nan)
    fold_of = np.full(n, -1)
    attention: List[Optional[np.ndarray]] = [None] * n
    rows = []
    for k, (tr, te) in enumerate(folds):
        set_seed(seed + k)
        model = train_abmil(get_bag, tr, in_dim, task, labels=labels, times=times, events=events,
                            n_classes=n_classes, cfg=cfg, seed=seed + k, device=device)
        out, attn, _ = predict_abmil(model, get_bag, te)
        oof[te], fold_of[te] = out, k
        for i, a in zip(te, attn):
            attention[i] = a
        if task == "classification":
            prob = torch.softmax(torch.as_tensor(out), dim=1).numpy()
            rows.append({"fold": k, "n_test": len(te), "auroc": auroc(labels[te], prob, n_classes),
                         "balanced_acc": float(balanced_accuracy_score(labels[te], prob.argmax(1)))})
        else:
            rows.append({"fold": k, "n_test": len(te), "c_index": cindex(times[te], events[te], out[:, 0])})
        LOG.info("fold %d: %s", k, {key: v for key, v in rows[-1].items() if key != "fold"})
    metric_names = ["auroc", "balanced_acc"] if task == "classification" else ["c_index"]
    summary = {m: mean_std([r[m] for r in rows]) for m in metric_names}
    return {"folds": rows, "summary": summary, "oof": oof, "fold_of": fold_of, "attention": attention}


def _plot_roc(labels: np.ndarray, oof: np.ndarray, fold_of: np.ndarray, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prob = torch.softmax(torch.as_tensor(oof), dim=1).numpy()[:, 1]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for k in np.unique(fold_of):
        m = fold_of == k
        if len(np.unique(labels[m])) == 2:
            fpr, tpr, _ = roc_curve(labels[m], prob[m])
            ax.plot(fpr, tpr, lw=1, alpha=0.6, label=f"fold {k} (AUC {roc_auc_score(labels[m], prob[m]):.2f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ABMIL ROC per fold")
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features-dir", required=True, help="directory of {slide_id}.h5 files with 'features' (N,D)")
    p.add_argument("--csv", required=True, help="CSV with slide_id, label (or time/event), optional patient_id")
    p.add_argument("--task", choices=["classification", "survival"], default="classification")
    p.add_argument("--label-key", default="label", help="CSV column with the slide label (classification)")
    p.add_argument("--time-key", default="time", help="CSV column with the follow-up time (survival)")
    p.add_argument("--event-key", default="event", help="CSV column with the event flag (survival)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=ABMILConfig.epochs)
    p.add_argument("--hidden", type=int, default=ABMILConfig.hidden)
    p.add_argument("--dropout", type=float, default=ABMILConfig.dropout)
    p.add_argument("--lr", type=float, default=ABMILConfig.lr)
    p.add_argument("--weight-decay", type=float, default=ABMILConfig.weight_decay)
    p.add_argument("--bag-size", type=int, default=ABMILConfig.bag_size, help="max patches per training bag (0: all)")
    p.add_argument("--cox-batch", type=int, default=ABMILConfig.cox_batch, help="slides per Cox-loss step (survival)")
    p.add_argument("--no-balance", action="store_true", help="plain (unweighted) cross-entropy")
    p.add_argument("--save-attention", action="store_true", help="write out-of-fold attention to <out-dir>/attention/{slide_id}.h5")
    p.add_argument("--allow-partial", action="store_true", help="drop slides without features instead of failing")
    p.add_argument("--device", default="cpu", help="torch device for training, e.g. cuda")
    p.add_argument("--cache-gb", type=float, default=8.0, help="RAM for caching bags")
    add_common_args(p, default_out="eval_out/mil")
    return p


def main(argv=None) -> Dict:
    args = parse_cli(build_parser(), argv)
    cfg = ABMILConfig(hidden=args.hidden, dropout=args.dropout, lr=args.lr, weight_decay=args.weight_decay,
                      epochs=args.epochs, bag_size=args.bag_size, balanced=not args.no_balance, cox_batch=args.cox_batch)
    if args.task == "classification":
        df = read_slide_csv(args.csv, [args.label_key])
        if df[args.label_key].isna().any():
            raise ValueError(f"{args.csv}: missing labels for slides {df['slide_id'][df[args.label_key].isna()].tolist()[:10]}")
    else:
        df = validate_survival(read_slide_csv(args.csv, [args.time_key, args.event_key]), args.time_key, args.event_key, args.csv)
    df = match_slides(df, args.features_dir, args.allow_partial)
    store = BagStore(df["path"], cache_gb=args.cache_gb)
    groups = df["patient_id"].to_numpy()
    kw = dict(groups=groups, n_folds=args.folds, cfg=cfg, seed=args.seed, device=torch.device(args.device))
    class_names: List[str] = []
    if args.task == "classification":
        class_names, labels = np.unique(df[args.label_key].astype(str).to_numpy(), return_inverse=True)
        if len(class_names) < 2:
            raise ValueError(f"need at least 2 classes in column {args.label_key!r}, found {list(class_names)}")
        res = run_mil_cv(store, len(store), "classification", labels=labels, n_classes=len(class_names), **kw)
    else:
        labels = None
        res = run_mil_cv(store, len(store), "survival", times=df[args.time_key].to_numpy(float), events=df[args.event_key].to_numpy(int), **kw)

    ensure_dir(args.out_dir)
    plots = []
    if args.task == "classification" and len(class_names) == 2:
        plots.append(os.path.join(args.out_dir, "mil_roc.png"))
        _plot_roc(labels, res["oof"], res["fold_of"], plots[-1])
    if args.save_attention:
        att_dir = os.path.join(args.out_dir, "attention")
        os.makedirs(att_dir, exist_ok=True)
        for i, sid in enumerate(df["slide_id"]):
            a = res["attention"][i]
            coords = store.coords(i)
            save_features_h5(os.path.join(att_dir, f"{sid}.h5"), a.T.astype(np.float32),
                             **({"coords": coords} if coords is not None and len(coords) == a.shape[1] else {}))
    results = {
        "task": args.task, "n_slides": len(df), "n_patients": int(len(np.unique(groups))),
        "classes": [str(c) for c in class_names], "config": vars(cfg), "args": vars(args),
        "folds": res["folds"], "summary": res["summary"], "plots": plots,
    }
    table = [{"metric": m, "mean": s["mean"], "std": s["std"], "SE": s["se"]} for m, s in res["summary"].items()]
    notes = ["Cross-validation grouped by patient (StratifiedGroupKFold); ABMIL re-trained per fold.",
             "Attention files (if saved) hold 'features' = attention weights (N, heads) in patch order."]
    write_report(args.out_dir, "mil", results, table, title=f"ABMIL {args.task} ({len(df)} slides)", notes=notes)
    return results


if __name__ == "__main__":
    main()
