"""Blocked kNN retrieval at scale vs brute force, printed as a markdown table.

The brute-force baseline holds the full (Nq, Ndb) similarity matrix and calls ``torch.topk`` once;
the blocked search never holds more than ``query_block x db_block`` similarities. Both run here, on
the same data, so the ratio is meaningful; above ``--brute-max`` database rows the baseline is
skipped (its matrix alone would need Nq x Ndb x 4 bytes).

    python benchmarks/bench_retrieval.py                         # 5k queries x {20k, 100k} x 384-d
    python benchmarks/bench_retrieval.py --queries 100000 --db 100000   # the full 100k x 100k case
"""
import argparse
import resource
import time

import numpy as np
import torch

from eval.retrieval import knn_search, l2_normalize


def brute_force(q: np.ndarray, d: np.ndarray, k: int):
    sims = l2_normalize(torch.from_numpy(q)) @ l2_normalize(torch.from_numpy(d)).T
    s, i = sims.topk(k, dim=1)
    return s.numpy(), i.numpy()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=5000)
    p.add_argument("--db", type=int, nargs="+", default=[20000, 100000])
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--brute-max", type=int, default=20000, help="largest database for the brute-force baseline")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"\n{args.queries} queries, {args.dim}-d, k={args.k}, cosine, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| database | blocked s | brute-force s | ratio | same neighbours | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for n_db in args.db:
        d = rng.standard_normal((n_db, args.dim), dtype=np.float32)
        q = d[: args.queries] + 0.1 * rng.standard_normal((min(args.queries, n_db), args.dim), dtype=np.float32)
        t0 = time.perf_counter()
        _, idx = knn_search(q, d, args.k, backend="torch")
        t_block = time.perf_counter() - t0
        brute, same = "skipped", "-"
        if n_db <= args.brute_max:
            t0 = time.perf_counter()
            _, ref = brute_force(q, d, args.k)
            t_brute = time.perf_counter() - t0
            brute = f"{t_brute:.2f}"
            same = f"{np.mean(np.sort(ref, 1) == np.sort(idx, 1)):.4f}"
        ratio = f"{float(brute) / t_block:.2f}x" if brute != "skipped" else "-"
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"| {n_db:,} | {t_block:.2f} | {brute} | {ratio} | {same} | {rss:.0f} |")


if __name__ == "__main__":
    main()
