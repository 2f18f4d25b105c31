"""Survival analysis on slide embeddings: the paper's unsupervised GMM stratification and a CoxNet c-index.

Slides are CLAM-style feature files ``{slide_id}.h5`` (``features`` (N,D)) in one directory; a
clinical CSV gives ``slide_id``, ``time``, ``event`` (1 = death/progression, 0 = censored) and
optionally ``patient_id``.

(a) **GMM stratification** (paper): mean-pooled slide embeddings -> StandardScaler -> optional PCA
    -> ``GaussianMixture`` (fixed ``--gmm-components`` or chosen by BIC over ``--gmm-range``);
    Kaplan-Meier curves per cluster and the multivariate log-rank p-value (lifelines).
(b) **CoxNet** (Patho-Bench): ``CoxnetSurvivalAnalysis(l1_ratio=0.5, alphas=[a])`` for each alpha,
    K-fold CV grouped by patient and stratified on the event, Harrell's c-index per fold
    (mean ± SE as Patho-Bench reports it, or ± std with ``--spread std``) and a 100-resample bootstrap 95% CI of the pooled out-of-fold c-index.

``--pooling abmil`` replaces the mean pool in (b) by the attention-pooled embedding of an ABMIL
trained with the Cox loss on the training folds only. (a) always uses the mean pool: an
outcome-trained pooling would leak survival into an "unsupervised" stratification.

    python -m eval.survival --features-dir feats/ --clinical clin.csv --out-dir out/surv
"""
import argparse
import os
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from eval.abmil import ABMILConfig, predict_abmil, train_abmil
from eval.common import LOG, add_common_args, ensure_dir, parse_cli, save_figure, write_report
from eval.slide_cv import BagStore, cindex, grouped_folds, match_slides, mean_std, read_slide_csv, validate_survival

DEFAULT_ALPHAS = (0.01, 0.02, 0.07)


def mean_pool(store: BagStore) -> np.ndarray:
    """Slide embedding = mean of its patch features, (n_slides, D) float64."""
    return np.stack([store(i).double().mean(0).numpy() for i in range(len(store))])


# --------------------------------------------------------------------------- (a) GMM + KM + log-rank
def gmm_stratify(
    X: np.ndarray, n_components: Optional[int] = None, component_range: Sequence[int] = (2, 3, 4, 5),
    pca_components: int = 10, covariance_type: str = "full", seed: int = 0,
) -> Dict:
    """Cluster slide embeddings with a Gaussian mixture after standardisation (+ PCA if ``pca_components``).

    ``n_components=None`` picks the BIC-minimising value in ``component_range``. Clusters are
    renumbered by decreasing size so that cluster 0 is the largest. Returns labels, k and BICs.
    """
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture
    from sklearn.preprocessing import StandardScaler

    Z = StandardScaler().fit_transform(X)
    if pca_components and pca_components < Z.shape[1]:
        Z = PCA(n_components=min(pca_components, Z.shape[0] - 1), random_state=seed).fit_transform(Z)
    ks = [n_components] if n_components else [k for k in component_range if k < len(Z)]
    if not ks:
        raise ValueError(f"no GMM component count in {list(component_range)} is below the number of slides ({len(Z)})")
    fits = {k: GaussianMixture(k, covariance_type=covariance_type, n_init=5, random_state=seed).fit(Z) for k in ks}
    bic = {k: float(g.bic(Z)) for k, g in fits.items()}
    best = min(bic, key=bic.get)
    raw = fits[best].predict(Z)
    order = np.argsort(-np.bincount(raw, minlength=best), kind="stable")
    labels = np.argsort(order)[raw]
    return {"labels": labels, "n_components": best, "bic": bic, "n_dims": Z.shape[1]}


def logrank(times: np.ndarray, events: np.ndarray, groups: np.ndarray) -> Dict[str, float]:
    """Multivariate log-rank test across ``groups`` (lifelines); NaN p if fewer than 2 groups."""
    from lifelines.statistics import multivariate_logrank_test

    if len(np.unique(groups)) < 2:
        return {"p_value": float("nan"), "statistic": float("nan")}
    res = multivariate_logrank_test(times, groups, events)
    return {"p_value": float(res.p_value), "statistic": float(res.test_statistic)}


def plot_km(times: np.ndarray, events: np.ndarray, groups: np.ndarray, path: str, title: str) -> str:
    """Kaplan-Meier curve per group, with at-risk counts under the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lifelines import KaplanMeierFitter
    from lifelines.plotting import add_at_risk_counts

    fig, ax = plt.subplots(figsize=(6, 4.5))
    fitters = []
    for g in np.unique(groups):
        m = groups == g
        kmf = KaplanMeierFitter(label=f"cluster {g} (n={int(m.sum())})").fit(times[m], events[m])
        kmf.plot_survival_function(ax=ax, ci_show=True)
        fitters.append(kmf)
    ax.set(xlabel="time", ylabel="survival probability", title=title, ylim=(0, 1.02))
    try:
        add_at_risk_counts(*fitters, ax=ax)
    except Exception as e:  # at-risk table is cosmetic; never fail the analysis for it
        LOG.warning("could not add at-risk counts: %s", e)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- (b) CoxNet CV
def bootstrap_ci(times: np.ndarray, events: np.ndarray, risk: np.ndarray, n_boot: int = 100, seed: int = 0) -> Dict:
    """Percentile 95% CI of the c-index over ``n_boot`` resamples (resamples without a comparable pair are skipped)."""
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(times), len(times))
        c = cindex(times[idx], events[idx], risk[idx])
        if np.isfinite(c):
            vals.append(c)
    if not vals:
        return {"low": float("nan"), "high": float("nan"), "n": 0}
    return {"low": float(np.percentile(vals, 2.5)), "high": float(np.percentile(vals, 97.5)), "n": len(vals)}


def fit_predict_coxnet(Xtr: np.ndarray, ttr: np.ndarray, etr: np.ndarray, Xte: np.ndarray, alpha: float) -> np.ndarray:
    """Standardise on the training fold, fit ``CoxnetSurvivalAnalysis(l1_ratio=0.5, alphas=[alpha])``, return test risks."""
    from sklearn.preprocessing import StandardScaler
    from sksurv.linear_model import CoxnetSurvivalAnalysis
    from sksurv.util import Surv

    scaler = StandardScaler().fit(Xtr)
    model = CoxnetSurvivalAnalysis(l1_ratio=0.5, alphas=[alpha], max_iter=100000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter for all-zero coefficient paths
        model.fit(scaler.transform(Xtr), Surv.from_arrays(etr.astype(bool), ttr))
    return model.predict(scaler.transform(Xte))


def coxnet_cv(
    embed: Callable[[np.ndarray, int], np.ndarray], times: np.ndarray, events: np.ndarray, patients: np.ndarray,
    alphas: Sequence[float] = DEFAULT_ALPHAS, n_folds: int = 5, n_boot: int = 100, seed: int = 0,
) -> Dict:
    """Patient-grouped, event-stratified K-fold CoxNet for every alpha.

    ``embed(train_idx, fold)`` returns the (n_slides, D) embedding matrix to use in that fold
    (it may be fitted on ``train_idx`` only). Returns per-alpha fold c-indices, their mean ± std,
    the pooled out-of-fold c-index and its bootstrap CI, and the out-of-fold risks.
    """
    folds = grouped_folds(events.astype(int), patients, n_folds, seed)
    oof = {a: np.full(len(times), np.nan) for a in alphas}
    per_fold: Dict[float, List[float]] = {a: [] for a in alphas}
    for k, (tr, te) in enumerate(folds):
        X = embed(tr, k)
        if events[tr].sum() == 0:
            raise ValueError(f"fold {k}: the training split has no events; use fewer folds")
        for a in alphas:
            try:
                risk = fit_predict_coxnet(X[tr], times[tr], events[tr], X[te], a)
            except ArithmeticError as e:
                LOG.warning("fold %d alpha %g: CoxNet failed (%s)", k, a, e)
                risk = np.full(len(te), np.nan)
            oof[a][te] = risk
            per_fold[a].append(cindex(times[te], events[te], risk) if np.isfinite(risk).all() else float("nan"))
    out = {}
    for a in alphas:
        ok = np.isfinite(oof[a])
        pooled = cindex(times[ok], events[ok], oof[a][ok])
        out[a] = {"fold_c_index": per_fold[a], **{f"c_index_{s}": v for s, v in mean_std(per_fold[a]).items()},
                  "pooled_c_index": pooled, "bootstrap_ci95": bootstrap_ci(times[ok], events[ok], oof[a][ok], n_boot, seed),
                  "oof_risk": oof[a]}
    return {"n_folds": len(folds), "alphas": out}


def _plot_cindex(res: Dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = list(res["alphas"])
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for i, a in enumerate(alphas):
        r = res["alphas"][a]
        ax.scatter(np.full(len(r["fold_c_index"]), i) + 0.08, r["fold_c_index"], s=12, c="grey", label="fold" if i == 0 else None)
        lo, hi = r["bootstrap_ci95"]["low"], r["bootstrap_ci95"]["high"]
        ax.errorbar(i, r["pooled_c_index"], yerr=[[r["pooled_c_index"] - lo], [hi - r["pooled_c_index"]]], fmt="o",
                    c="C0", capsize=4, label="pooled OOF ± 95% CI" if i == 0 else None)
    ax.axhline(0.5, ls="--", c="k", lw=0.8)
    ax.set_xticks(range(len(alphas)), [f"α={a:g}" for a in alphas])
    ax.set(ylabel="Harrell's c-index", title="CoxNet (l1_ratio=0.5)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features-dir", required=True, help="directory of {slide_id}.h5 with 'features' (N,D)")
    p.add_argument("--clinical", required=True, help="CSV with slide_id, time, event[, patient_id]")
    p.add_argument("--time-key", default="time", help="clinical CSV column with the follow-up time")
    p.add_argument("--event-key", default="event", help="clinical CSV column with the event (1) / censored (0) flag")
    p.add_argument("--analyses", nargs="+", choices=["gmm", "coxnet"], default=["gmm", "coxnet"])
    p.add_argument("--pooling", choices=["mean", "abmil"], default="mean", help="slide embedding for CoxNet")
    p.add_argument("--gmm-components", type=int, default=0, help="fixed number of clusters (0: choose by BIC)")
    p.add_argument("--gmm-range", type=int, nargs="+", default=[2, 3, 4, 5], help="candidate cluster counts for BIC")
    p.add_argument("--pca-components", type=int, default=10, help="PCA dims before the GMM (0: none)")
    p.add_argument("--covariance-type", choices=["full", "tied", "diag", "spherical"], default="full")
    p.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS))
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--spread", choices=["se", "std"], default="se",
                   help="spread of the fold c-indices in the table: se (default, Patho-Bench's std/sqrt(folds)) or std")
    p.add_argument("--bootstraps", type=int, default=100)
    p.add_argument("--abmil-epochs", type=int, default=ABMILConfig.epochs)
    p.add_argument("--abmil-hidden", type=int, default=ABMILConfig.hidden)
    p.add_argument("--allow-partial", action="store_true", help="drop slides without features / rows instead of failing")
    p.add_argument("--device", default="cpu", help="torch device for ABMIL pooling")
    add_common_args(p, default_out="eval_out/survival")
    return p


def main(argv=None) -> Dict:
    args = parse_cli(build_parser(), argv)
    df = read_slide_csv(args.clinical, [args.time_key, args.event_key])
    df = validate_survival(match_slides(df, args.features_dir, args.allow_partial), args.time_key, args.event_key, args.clinical)
    store = BagStore(df["path"])
    times, events = df[args.time_key].to_numpy(float), df[args.event_key].to_numpy(int)
    patients = df["patient_id"].to_numpy()
    ensure_dir(args.out_dir)
    results: Dict = {"n_slides": len(df), "n_patients": int(len(np.unique(patients))), "n_events": int(events.sum()),
                     "args": vars(args), "plots": []}
    rows, notes = [], []
    X_mean = mean_pool(store)

    if "gmm" in args.analyses:
        g = gmm_stratify(X_mean, args.gmm_components or None, args.gmm_range, args.pca_components, args.covariance_type, args.seed)
        lr = logrank(times, events, g["labels"])
        km = plot_km(times, events, g["labels"], os.path.join(args.out_dir, "km_gmm.png"),
                     f"GMM k={g['n_components']}  log-rank p={lr['p_value']:.3g}")
        results["gmm"] = {"n_components": g["n_components"], "bic": g["bic"], "logrank": lr, "n_dims": g["n_dims"],
                          "cluster_sizes": np.bincount(g["labels"]).tolist(),
                          "assignments": dict(zip(df["slide_id"], g["labels"].tolist()))}
        results["plots"].append(km)
        rows.append({"analysis": f"GMM k={g['n_components']} (mean pool)", "metric": "multivariate log-rank p",
                     "value": f"{lr['p_value']:.3g}"})
        notes.append("GMM on mean-pooled embeddings (StandardScaler, PCA) — unsupervised; k by BIC unless fixed.")

    if "coxnet" in args.analyses:
        if args.pooling == "mean":
            def embed(tr, k):
                return X_mean
        else:
            cfg = ABMILConfig(epochs=args.abmil_epochs, hidden=args.abmil_hidden)

            def embed(tr, k):  # ABMIL trained with the Cox loss on this fold's training slides only
                model = train_abmil(store, tr, store.dim, "survival", times=times, events=events, cfg=cfg,
                                    seed=args.seed + k, device=torch.device(args.device))
                return predict_abmil(model, store, range(len(store)))[2]
        cox = coxnet_cv(embed, times, events, patients, args.alphas, args.folds, args.bootstraps, args.seed)
        results["coxnet"] = {"n_folds": cox["n_folds"], "pooling": args.pooling,
                             "alphas": {str(a): {k: v for k, v in r.items() if k != "oof_risk"} for a, r in cox["alphas"].items()}}
        results["plots"].append(_plot_cindex(cox, os.path.join(args.out_dir, "coxnet_cindex.png")))
        for a, r in cox["alphas"].items():
            ci = r["bootstrap_ci95"]
            rows.append({"analysis": f"CoxNet α={a:g} ({args.pooling} pool)", "metric": f"c-index (fold mean ± {args.spread})",
                         "value": f"{r['c_index_mean']:.4f} ± {r['c_index_' + args.spread]:.4f}"})
            rows.append({"analysis": f"CoxNet α={a:g} ({args.pooling} pool)", "metric": "pooled OOF c-index [95% CI]",
                         "value": f"{r['pooled_c_index']:.4f} [{ci['low']:.4f}, {ci['high']:.4f}]"})
        notes.append(f"CoxNet: {cox['n_folds']}-fold CV grouped by patient, stratified on event; features standardised "
                     "on each training fold; CI = percentile bootstrap of the pooled out-of-fold c-index.")
        notes.append(f"± {args.spread} over folds (--spread, default se: Patho-Bench's get_mean_se, std/sqrt(folds); "
                     "std: population std). The JSON holds both.")
    write_report(args.out_dir, "survival", results, rows, title=f"Survival ({len(df)} slides, {int(events.sum())} events)", notes=notes)
    return results


if __name__ == "__main__":
    main()
