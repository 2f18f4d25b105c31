"""Time the HEST-Benchmark gene-expression evaluation at HEST-Extended scale (CPU).

Default: 200,000 spots x 768-d features, 200 genes, 8 studies -> 8 leave-one-study-out folds, on
synthetic data with a planted linear signal. Prints a markdown table of stage timings (summed over
folds) and the PCA solver sklearn picked. ``--exact-check-folds N`` also runs sklearn's Ridge on the
full training matrix for the first N folds and reports how far the fast solver's Pearson is from it.

    python benchmarks/bench_gene_expression.py                      # the HEST-Extended shape
    python benchmarks/bench_gene_expression.py --spots 20000 --exact-check-folds 1
"""
import argparse
import os
import sys
import time

import numpy as np
from scipy import sparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eval import gene_expression as ge  # noqa: E402
from eval.common import markdown_table  # noqa: E402


def synthetic(spots: int, dim: int, genes: int, studies: int, seed: int) -> ge.SpotData:
    """Features with a 16-d latent signal; Poisson counts whose log-rate is linear in that latent."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((spots, 16), dtype=np.float32)
    x = z @ rng.standard_normal((16, dim), dtype=np.float32)
    x += rng.standard_normal((spots, dim), dtype=np.float32)
    rate = np.exp(0.5 + 0.3 * (z @ rng.standard_normal((16, genes), dtype=np.float32)) / 4)
    counts = sparse.csr_matrix(rng.poisson(rate).astype(np.float32))
    study = np.repeat(np.arange(studies), -(-spots // studies))[:spots].astype(str)
    return ge.SpotData(features=x, counts=counts, genes=np.array([f"G{i}" for i in range(genes)]),
                       sample=study, barcode=np.arange(spots).astype(str), study=study)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spots", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--genes", type=int, default=200)
    p.add_argument("--studies", type=int, default=8)
    p.add_argument("--ridge", choices=ge.RIDGE_MODES, default="fast")
    p.add_argument("--exact-check-folds", type=int, default=0, help="also run ridge='exact' on this many folds")
    p.add_argument("--seed", type=int, default=1, help="HEST-Benchmark's default seed")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    data = synthetic(args.spots, args.dim, args.genes, args.studies, args.seed)
    t_data = time.perf_counter() - t0
    splits = ge.make_splits(data, "loso")
    genes = list(data.genes)
    t0 = time.perf_counter()
    folds = ge.run_folds(data, splits, "list", genes, seed=args.seed, ridge=args.ridge)
    total = time.perf_counter() - t0
    stages = {k: sum(f.timings.get(k, 0.0) for f in folds) for k in ("genes", "pca", "ridge", "metrics")}  # pca: scaler + PCA pipeline
    rows = [{"stage": k, "seconds (all folds)": f"{v:.2f}", "per fold": f"{v / len(folds):.2f}"} for k, v in stages.items()]
    other = total - sum(stages.values())
    rows.append({"stage": "targets, indexing", "seconds (all folds)": f"{other:.2f}", "per fold": f"{other / len(folds):.2f}"})
    rows.append({"stage": "**total eval**", "seconds (all folds)": f"**{total:.2f}**", "per fold": f"{total / len(folds):.2f}"})
    s = ge.aggregate(folds)
    print(f"\n{args.spots} spots x {args.dim}-d, {args.genes} genes, {len(folds)} LOSO folds, ridge={args.ridge}, "
          f"PCA solver: {folds[0].pca_solver}, {folds[0].n_components} PCs; synthetic data built in {t_data:.1f}s "
          f"(not timed); PCC {s['pcc_mean']:.4f} ± {s['pcc_std']:.4f}\n")
    print(markdown_table(rows))
    out = {"total_s": total, "stages": stages, "pca_solver": folds[0].pca_solver, "pcc": s["pcc_mean"]}
    if args.exact_check_folds:
        k = min(args.exact_check_folds, len(splits))
        t0 = time.perf_counter()
        exact = ge.run_folds(data, splits[:k], "list", genes, seed=args.seed, ridge="exact")
        t_exact = time.perf_counter() - t0
        diff = max(float(np.nanmax(np.abs(a.pearson - b.pearson))) for a, b in zip(exact, folds[:k]))
        ridge_exact = sum(f.timings["ridge"] for f in exact) / k
        print(f"ridge='exact' (sklearn Ridge on all training spots): {t_exact / k:.1f}s per fold "
              f"(ridge stage {ridge_exact:.1f}s); max |Pearson fast - exact| over {k} fold(s): {diff:.2e}\n")
        out.update({"exact_s_per_fold": t_exact / k, "max_pearson_diff": diff})
    return out


if __name__ == "__main__":
    main()
