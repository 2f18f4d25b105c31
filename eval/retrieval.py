"""Patch retrieval on frozen embeddings: kNN retrieval metrics and prototype ("zero-shot") retrieval.

kNN: ``--metric cosine`` (default, ours): embeddings are L2-normalised and ranked by cosine
similarity; ``--metric l2``: Patho-Bench's default (mahmoodlab/Patho-Bench,
patho_bench/experiments/utils/Retriever.py: ``similarity='l2'``, ``centering=False``;
advanced_usage/configs/retrieval/retrieval.yaml), raw embeddings ranked by L2 distance. For k in {1, 3, 5, 10}:

* ``top{k}_acc``  - a query is a hit if any of its k nearest neighbours has its label;
* ``mv@{k}_acc``  - majority vote of the k labels; a tie is broken by the rank of the first
  occurrence, i.e. the tied label met first in the ranked list (nearest) wins;
* ``mAP@{k}``     - per query, sum over ranks j <= k holding a relevant item of precision@j,
  divided by ``min(k, number of relevant items in the database)``; averaged over queries.
  With at least k database items per class this is Patho-Bench's ``/k`` convention.

Modes: query/database from two files (``--query``, ``--database``), from one file with a split
column (``--split-key split --query-split test --database-split train``), or leave-one-out over
one file (each item queries all others). Neighbours are found in blocks (``torch.topk`` per
query block, merged over database blocks), so 100k x 100k never builds the full similarity
matrix; faiss is used when importable (``--backend auto``).

Prototypes: each class prototype is the mean of the L2-normalised database (support) embeddings
of that class, re-normalised; queries are ranked against prototypes by cosine similarity.
Reported: accuracy, balanced accuracy, macro F1 and per-class AP (one-vs-rest on the similarity).

    python -m eval.retrieval --features nct_crc.h5 --split-key split --out-dir out/retrieval
"""
import argparse
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from eval.common import LOG, Warnings, add_common_args, check_features, ensure_dir, load_features_h5, parse_cli, save_figure, write_report

try:  # optional CPU/GPU nearest-neighbour library
    import faiss  # type: ignore
except ImportError:  # pragma: no cover - depends on the environment
    faiss = None

DEFAULT_KS = (1, 3, 5, 10)


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def _merge(best_s, best_i, s, i, k):
    """Merge candidate lists keeping the k best; ties in score go to the smaller database index."""
    s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
    by_index = torch.sort(i, dim=1, stable=True).indices
    s, i = s.gather(1, by_index), i.gather(1, by_index)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return s.gather(1, order), i.gather(1, order)


@torch.no_grad()
def knn_search(
    query: np.ndarray, database: np.ndarray, k: int, metric: str = "cosine", exclude_self: bool = False,
    query_block: int = 1024, db_block: int = 16384, backend: str = "auto", device: Optional[str] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest database rows of every query row, best first.

    Returns ``(scores (Nq,k), indices (Nq,k))``; scores are cosine similarities (``metric='cosine'``,
    inputs L2-normalised here) or negative squared L2 distances (``metric='l2'``), so higher is
    nearer. ``exclude_self`` (leave-one-out; query and database must be the same rows) removes the
    item itself. Memory is O(query_block x db_block). ``backend``: 'auto' (faiss if importable),
    'faiss' or 'torch'.
    """
    if metric not in ("cosine", "l2"):
        raise ValueError(f"unknown metric {metric!r}; use 'cosine' or 'l2'")
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"unknown backend {backend!r}")
    q = torch.as_tensor(np.asarray(query, dtype=np.float32))
    d = torch.as_tensor(np.asarray(database, dtype=np.float32))
    if q.ndim != 2 or d.ndim != 2 or q.shape[1] != d.shape[1]:
        raise ValueError(f"query {tuple(q.shape)} and database {tuple(d.shape)} must be 2-D with the same width")
    if exclude_self and q.shape[0] != d.shape[0]:
        raise ValueError("exclude_self needs query and database to be the same rows (leave-one-out)")
    n_avail = d.shape[0] - int(exclude_self)
    if not 1 <= k <= n_avail:
        raise ValueError(f"k={k} but only {n_avail} database items are available")
    if metric == "cosine":
        q, d = l2_normalize(q), l2_normalize(d)
    if backend == "faiss" and faiss is None:
        raise ImportError("backend='faiss' but faiss is not installed")
    if faiss is not None and backend != "torch":
        return _faiss_search(q.numpy(), d.numpy(), k, metric, exclude_self)
    if device:
        q, d = q.to(device), d.to(device)
    d_sq = (d * d).sum(1) if metric == "l2" else None
    out_s, out_i = [], []
    for qs in range(0, q.shape[0], query_block):
        qb = q[qs:qs + query_block]
        best_s = torch.full((len(qb), 0), float("-inf"), device=q.device)
        best_i = torch.zeros((len(qb), 0), dtype=torch.long, device=q.device)
        for ds in range(0, d.shape[0], db_block):
            db = d[ds:ds + db_block]
            s = qb @ db.T
            if metric == "l2":  # -|q-d|^2 = 2 q.d - |d|^2 - |q|^2
                s = 2 * s - d_sq[ds:ds + db_block][None] - (qb * qb).sum(1, keepdim=True)
            if exclude_self:
                rows = torch.arange(len(qb), device=q.device) + qs
                cols = rows - ds
                hit = (cols >= 0) & (cols < len(db))
                s[hit.nonzero().squeeze(1), cols[hit]] = float("-inf")
            kk = min(k, s.shape[1])
            s_top, i_top = torch.topk(s, kk, dim=1)
            best_s, best_i = _merge(best_s, best_i, s_top, i_top + ds, k)
        out_s.append(best_s.cpu())
        out_i.append(best_i.cpu())
    return torch.cat(out_s).numpy(), torch.cat(out_i).numpy()


def _faiss_search(q: np.ndarray, d: np.ndarray, k: int, metric: str, exclude_self: bool):
    index = faiss.IndexFlatIP(d.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(d.shape[1])
    index.add(np.ascontiguousarray(d))
    kk = k + int(exclude_self)
    s, i = index.search(np.ascontiguousarray(q), kk)
    if metric == "l2":
        s = -s
    if exclude_self:  # drop the query itself (or, with exact duplicates, the last candidate)
        keep = i != np.arange(len(q))[:, None]
        keep[keep.all(1), -1] = False
        s = s[keep].reshape(len(q), k)
        i = i[keep].reshape(len(q), k)
    return s, i


# --------------------------------------------------------------------------- metrics
def topk_accuracy(nbr_labels: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of queries with at least one correct label among their k nearest neighbours."""
    return float((nbr_labels[:, :k] == labels[:, None]).any(1).mean())


def majority_vote(nbr_labels: np.ndarray, k: int) -> np.ndarray:
    """Most frequent label among the first k; ties go to the tied label that appears first (nearest)."""
    top = nbr_labels[:, :k]
    n, kk = top.shape
    # count of each neighbour's label within the row, then pick the max count with the smallest rank
    counts = (top[:, :, None] == top[:, None, :]).sum(2)  # (n, k): how often top[r, j] occurs in row r
    score = counts * (kk + 1) - np.arange(kk)[None]      # more votes first, then nearer first
    return top[np.arange(n), score.argmax(1)]


def majority_vote_accuracy(nbr_labels: np.ndarray, labels: np.ndarray, k: int) -> float:
    return float((majority_vote(nbr_labels, k) == labels).mean())


def map_at_k(nbr_labels: np.ndarray, labels: np.ndarray, k: int, n_relevant: np.ndarray) -> float:
    """Mean over queries of AP@k = sum_{j<=k, rel_j} precision@j / min(k, n_relevant[q]).

    ``n_relevant[q]`` is how many database items share query q's label (self excluded for
    leave-one-out); queries with none contribute 0.
    """
    rel = (nbr_labels[:, :k] == labels[:, None]).astype(np.float64)
    prec = np.cumsum(rel, 1) / np.arange(1, rel.shape[1] + 1)[None]
    denom = np.minimum(k, np.asarray(n_relevant))
    ap = np.where(denom > 0, (prec * rel).sum(1) / np.maximum(denom, 1), 0.0)
    return float(ap.mean())


def knn_retrieval(
    query: np.ndarray, query_labels: np.ndarray, database: Optional[np.ndarray] = None,
    database_labels: Optional[np.ndarray] = None, ks: Sequence[int] = DEFAULT_KS, metric: str = "cosine", **search_kw,
) -> Dict:
    """kNN retrieval metrics. Without ``database`` it is leave-one-out over ``query``."""
    loo = database is None
    database, database_labels = (query, query_labels) if loo else (database, database_labels)
    query_labels, database_labels = np.asarray(query_labels), np.asarray(database_labels)
    ks = sorted(set(int(k) for k in ks))
    kmax = min(max(ks), len(database) - int(loo))
    ks = [k for k in ks if k <= kmax]
    if not ks:
        raise ValueError(f"database has {len(database)} items: too few for any requested k")
    _, idx = knn_search(query, database, kmax, metric=metric, exclude_self=loo, **search_kw)
    nbr = database_labels[idx]
    classes, db_counts = np.unique(database_labels, return_counts=True)
    count_of = dict(zip(classes.tolist(), db_counts.tolist()))
    n_rel = np.asarray([count_of.get(y, 0) for y in query_labels.tolist()]) - int(loo)
    overall = {}
    for k in ks:
        overall[f"top{k}_acc"] = topk_accuracy(nbr, query_labels, k)
        overall[f"mv@{k}_acc"] = majority_vote_accuracy(nbr, query_labels, k)
        overall[f"mAP@{k}"] = map_at_k(nbr, query_labels, k, n_rel)
    per_class = {}
    for c in np.unique(query_labels):
        m = query_labels == c
        per_class[str(c)] = {"support": int(m.sum()), **{f"top{k}_acc": topk_accuracy(nbr[m], query_labels[m], k) for k in ks},
                             **{f"mv@{k}_acc": majority_vote_accuracy(nbr[m], query_labels[m], k) for k in ks}}
    prec_at = (nbr == query_labels[:, None]).mean(0)  # precision of rank j over queries
    return {"ks": ks, "overall": overall, "per_class": per_class, "precision_at_rank": prec_at.tolist(),
            "mode": "leave-one-out" if loo else "query/database", "metric": metric, "indices": idx}


def prototype_retrieval(query: np.ndarray, query_labels: np.ndarray, support: np.ndarray, support_labels: np.ndarray) -> Dict:
    """Rank each query against class prototypes (mean of L2-normalised support embeddings, re-normalised)."""
    from sklearn.metrics import accuracy_score, average_precision_score, balanced_accuracy_score, f1_score

    classes = np.unique(support_labels)
    s = l2_normalize(torch.as_tensor(np.asarray(support, dtype=np.float32)))
    protos = torch.stack([s[torch.as_tensor(support_labels == c)].mean(0) for c in classes])
    sims = (l2_normalize(torch.as_tensor(np.asarray(query, dtype=np.float32))) @ l2_normalize(protos).T).numpy()
    pred = classes[sims.argmax(1)]
    query_labels = np.asarray(query_labels)
    unknown = sorted(set(query_labels.tolist()) - set(classes.tolist()))
    if unknown:
        raise ValueError(f"query labels {unknown} have no support embeddings (no prototype)")
    ap = {str(c): float(average_precision_score(query_labels == c, sims[:, j])) if (query_labels == c).any() else float("nan")
          for j, c in enumerate(classes)}
    per_class_acc = {str(c): float((pred[query_labels == c] == c).mean()) for c in classes if (query_labels == c).any()}
    return {
        "accuracy": float(accuracy_score(query_labels, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(query_labels, pred)),
        "macro_f1": float(f1_score(query_labels, pred, average="macro")),
        "per_class_ap": ap, "mean_ap": float(np.nanmean(list(ap.values()))), "per_class_accuracy": per_class_acc,
        "predictions": pred, "similarities": sims, "classes": classes,
    }


# --------------------------------------------------------------------------- CLI
def _plot(knn: Optional[Dict], proto: Optional[Dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in (knn, proto) if p is not None]
    fig, axes = plt.subplots(1, len(panels) + (1 if knn else 0), figsize=(4.5 * (len(panels) + (1 if knn else 0)), 3.6))
    axes = np.atleast_1d(axes)
    a = 0
    if knn:
        prec = knn["precision_at_rank"]
        axes[a].plot(np.arange(1, len(prec) + 1), np.cumsum(prec) / np.arange(1, len(prec) + 1), "o-", label="precision@k")
        axes[a].plot(knn["ks"], [knn["overall"][f"mv@{k}_acc"] for k in knn["ks"]], "s--", label="majority vote@k")
        axes[a].plot(knn["ks"], [knn["overall"][f"mAP@{k}"] for k in knn["ks"]], "^:", label="mAP@k")
        axes[a].set(xlabel="k", ylim=(0, 1.02), title=f"kNN retrieval ({knn['metric']}, {knn['mode']})")
        axes[a].legend(fontsize=7)
        a += 1
        names, k0 = list(knn["per_class"]), knn["ks"][0]
        axes[a].barh(names, [knn["per_class"][n][f"mv@{k0}_acc"] for n in names])
        axes[a].set(xlim=(0, 1), xlabel=f"majority-vote accuracy @{k0}", title="kNN per class")
        a += 1
    if proto:
        names = list(proto["per_class_ap"])
        y = np.arange(len(names))
        axes[a].barh(y - 0.2, [proto["per_class_accuracy"].get(n, np.nan) for n in names], 0.4, label="accuracy")
        axes[a].barh(y + 0.2, [proto["per_class_ap"][n] for n in names], 0.4, label="AP")
        axes[a].set_yticks(y, names)
        axes[a].set(xlim=(0, 1), title=f"prototypes (bal. acc {proto['balanced_accuracy']:.3f})")
        axes[a].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def _load(path: str, label_key: str, warns: Warnings) -> Dict[str, np.ndarray]:
    data = load_features_h5(path)
    if label_key not in data:
        raise KeyError(f"{path} has no label dataset {label_key!r} (found {sorted(data)})")
    if len(data[label_key]) != len(data["features"]):
        raise ValueError(f"{path}: {len(data[label_key])} labels for {len(data['features'])} feature rows")
    check_features(data["features"], path)
    warns.check_features(data["features"], path)
    return data


def _check_query_database(xq: np.ndarray, xd: np.ndarray, yq: np.ndarray, yd: np.ndarray, where: str,
                          warns: Warnings) -> None:
    """Widths must agree; the same rows on both sides and query classes absent from the database are warned about."""
    if xq.shape[1] != xd.shape[1]:
        raise ValueError(f"{where}: query features are {xq.shape[1]}-wide, database features {xd.shape[1]}-wide "
                         "(extracted with different models?)")
    if xq.shape == xd.shape and np.array_equal(xq, xd) and len(np.unique(xq, axis=0)) > 1:  # constant: warned apart
        warns.add(f"{where}: query and database are the same rows; every query retrieves itself (top-1 = 1.0). "
                  "Use a split column or leave-one-out (--features without --split-key)")
    missing = sorted(set(yq.tolist()) - set(yd.tolist()))
    if missing:
        warns.add(f"{where}: query class(es) {missing} have no database item: those queries can never hit")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", help="one feature h5 (leave-one-out, or split by --split-key)")
    p.add_argument("--query", help="query feature h5 (with --database)")
    p.add_argument("--database", help="database/support feature h5 (with --query)")
    p.add_argument("--label-key", default="label")
    p.add_argument("--split-key", help="dataset in --features naming each row's split")
    p.add_argument("--query-split", default="test")
    p.add_argument("--database-split", default="train")
    p.add_argument("--mode", choices=["knn", "prototype", "both"], default="both")
    p.add_argument("--metric", choices=["cosine", "l2"], default="cosine",
                   help="cosine (default, ours): L2-normalised embeddings; l2: Patho-Bench's Retriever default "
                        "(raw embeddings, no centering)")
    p.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS))
    p.add_argument("--backend", choices=["auto", "torch", "faiss"], default="auto")
    p.add_argument("--query-block", type=int, default=1024, help="queries per block (memory = block x db-block floats)")
    p.add_argument("--db-block", type=int, default=16384)
    p.add_argument("--device", default=None, help="torch device for the blocked search, e.g. cuda")
    add_common_args(p, default_out="eval_out/retrieval")
    return p


def main(argv=None) -> Dict:
    args = parse_cli(build_parser(), argv)
    if bool(args.query) != bool(args.database) or bool(args.features) == bool(args.query):
        raise SystemExit("give either --features FILE, or both --query FILE and --database FILE")
    warns = Warnings()
    if args.features:
        data = _load(args.features, args.label_key, warns)
        X, y = data["features"], data[args.label_key].astype(str)
        if args.split_key:
            if args.split_key not in data:
                raise KeyError(f"{args.features} has no split dataset {args.split_key!r} (found {sorted(data)})")
            split = data[args.split_key].astype(str)
            qm, dm = split == args.query_split, split == args.database_split
            if not qm.any() or not dm.any():
                raise ValueError(f"split {args.split_key!r} has {qm.sum()} {args.query_split!r} and {dm.sum()} "
                                 f"{args.database_split!r} rows; both must be non-empty (values: {sorted(set(split))})")
            Xq, yq, Xd, yd = X[qm], y[qm], X[dm], y[dm]
            _check_query_database(Xq, Xd, yq, yd, f"{args.features} ({args.query_split} vs {args.database_split})", warns)
        else:
            Xq, yq, Xd, yd = X, y, None, None
    else:
        q, d = _load(args.query, args.label_key, warns), _load(args.database, args.label_key, warns)
        Xq, yq, Xd, yd = q["features"], q[args.label_key].astype(str), d["features"], d[args.label_key].astype(str)
        if os.path.realpath(args.query) == os.path.realpath(args.database):
            warns.add(f"--query and --database are the same file {args.query}")
        _check_query_database(Xq, Xd, yq, yd, f"{args.query} vs {args.database}", warns)
    LOG.info("retrieval: %d queries, %s database rows", len(Xq), "leave-one-out" if Xd is None else len(Xd))
    results: Dict = {"n_query": len(Xq), "n_database": len(Xq) if Xd is None else len(Xd), "args": vars(args)}
    rows: List[Dict] = []
    knn = proto = None
    if args.mode in ("knn", "both"):
        knn = knn_retrieval(Xq, yq, Xd, yd, ks=args.ks, metric=args.metric, backend=args.backend,
                            query_block=args.query_block, db_block=args.db_block, device=args.device)
        results["knn"] = {k: v for k, v in knn.items() if k != "indices"}
        for k in knn["ks"]:
            o = knn["overall"]
            rows.append({"method": f"kNN k={k}", "top-k acc": o[f"top{k}_acc"], "majority-vote acc": o[f"mv@{k}_acc"],
                         "mAP@k": o[f"mAP@{k}"]})
    if args.mode in ("prototype", "both"):
        sup_X, sup_y = (Xq, yq) if Xd is None else (Xd, yd)
        if Xd is None:
            LOG.warning("prototype retrieval without a database split uses the queries as support (optimistic)")
        proto = prototype_retrieval(Xq, yq, sup_X, sup_y)
        results["prototype"] = {k: v for k, v in proto.items() if k not in ("predictions", "similarities", "classes")}
        proto_row = {"method": "prototype", "accuracy": proto["accuracy"], "balanced acc": proto["balanced_accuracy"],
                     "macro F1": proto["macro_f1"], "mean per-class AP": proto["mean_ap"]}
    ensure_dir(args.out_dir)
    results["plots"] = [_plot(knn, proto, os.path.join(args.out_dir, "retrieval.png"))]
    notes = [f"Metric '{args.metric}' (default 'cosine', ours; 'l2' is Patho-Bench's Retriever default).",
             "Majority-vote ties go to the tied label nearest in the ranking.",
             "mAP@k divides by min(k, #relevant database items) (= Patho-Bench's /k when every class has >= k items)."]
    if proto is not None:
        if rows:  # one table per report: the prototype summary goes under the kNN table
            notes.insert(0, "Prototype retrieval: " + ", ".join(f"{k} {v:.4f}" for k, v in proto_row.items() if k != "method"))
        else:
            rows.append(proto_row)
    write_report(args.out_dir, "retrieval", results, rows, title=f"Patch retrieval ({args.metric})", notes=notes,
                 warnings=warns)
    return results


if __name__ == "__main__":
    main()
