"""One command for the paper's comparison: N backbones x every task, one side-by-side table.

Features are extracted once per model (``eval.extract_features``, which keeps outputs made by the
same model and refuses ones made by another), then every task runs through its own script
(``eval.gene_expression``, ``eval.linear_probe``, ``eval.retrieval``, ``eval.survival``, ``eval.mil``),
each of which stays runnable on its own. The result is ``compare.md`` / ``compare.json`` (one row per
backbone: gene expression random vs leave-one-study-out with the drop, classification, retrieval,
survival, ...) and ``compare.png``. Finished tasks are skipped on a rerun (a marker records the task's
arguments and its features' provenance); a changed task or re-extracted features run again.

The tasks file (paths relative to it)::

    extract:                      # shared eval.extract_features options (optional)
      img_size: 224
      batch_size: 64
    features:                     # what to extract, once per model: {name: {csv|images|hest_patches|wsi+coords: path,
      hest: {hest_patches: hest/patches}    #  and optionally this set's own extract options}}
      patches: {csv: classification/labels.csv}
      patches_mean: {csv: classification/labels.csv, embedding: mean}
    tasks:                        # {name: {script, features, args}}; script defaults to the name
      gene_expression: {features: hest, args: [--task-dir, hest, --compare, "random,loso", --study-key, study]}
      linear_probe: {features: patches}
      retrieval: {features: patches, args: [--split-key, split]}

Models come from the command line (``--model LABEL=ARCH:CHECKPOINT``, ``--random-init LABEL=ARCH``)
and/or a ``models:`` list in the file (``{name, arch, checkpoint | random_init: true, model_kwargs}``)::

    python -m eval.compare --tasks tasks.yaml --out-dir results/compare \\
        --model mv_hybrid=mv_hybrid:ckpts/mv_hybrid.pth --model vit=vit_12:ckpts/vit.pth \\
        --random-init mv_hybrid_random=mv_hybrid --model-kwargs '{"img_size": 224}'
"""
import argparse
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from eval.common import LOG, atomic_write_text, ensure_dir, markdown_table, parse_cli, parse_model_kwargs, pyplot, save_figure

FEATURE_SOURCES = ("csv", "images", "hest_patches", "wsi")
SINGLE_FILE_SOURCES = ("csv", "images")
# the flag through which each script takes its features, and the report it writes
SCRIPTS = {
    "gene_expression": ("--features-dir", "gene_expression"),
    "linear_probe": ("--features", "linear_probe"),
    "retrieval": ("--features", "retrieval"),
    "survival": ("--features-dir", "survival"),
    "mil": ("--features-dir", "mil"),
}
MARKER = ".task_done.json"


@dataclass
class ModelSpec:
    name: str
    arch: str
    checkpoint: Optional[str] = None
    model_kwargs: Dict[str, Any] = field(default_factory=dict)

    def extract_args(self) -> List[str]:
        src = ["--checkpoint", self.checkpoint] if self.checkpoint else ["--random-init"]
        return ["--model", self.arch, *src, "--model-kwargs", json.dumps(self.model_kwargs)]


def parse_model(spec: str, random_init: bool, model_kwargs: Dict[str, Any]) -> ModelSpec:
    """``LABEL=ARCH:CHECKPOINT`` (or ``LABEL=ARCH`` for a random-init baseline)."""
    if "=" not in spec:
        raise ValueError(f"model spec {spec!r}: expected LABEL=ARCH{'' if random_init else ':CHECKPOINT'}")
    name, rest = spec.split("=", 1)
    if random_init:
        return ModelSpec(name, rest, None, dict(model_kwargs))
    if ":" not in rest:
        raise ValueError(f"model spec {spec!r}: expected LABEL=ARCH:CHECKPOINT")
    arch, ckpt = rest.split(":", 1)
    return ModelSpec(name, arch, ckpt, dict(model_kwargs))


def load_tasks_file(path: str) -> Dict[str, Any]:
    """The tasks yaml, checked, with paths made absolute (relative to the file)."""
    from omegaconf import OmegaConf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"tasks file not found: {path}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(cfg, dict) or "tasks" not in cfg or "features" not in cfg:
        raise ValueError(f"{path}: needs 'features' and 'tasks' sections")
    root = os.path.dirname(os.path.abspath(path))

    def here(p: str) -> str:
        return p if os.path.isabs(p) else os.path.join(root, p)

    for fname, src in cfg["features"].items():
        kinds = [k for k in FEATURE_SOURCES if k in (src or {})]
        if len(kinds) != 1:
            raise ValueError(f"{path}: features.{fname} needs exactly one of {FEATURE_SOURCES}, got {sorted(src or {})}")
        for k in (*FEATURE_SOURCES, "coords"):
            if k in src:
                src[k] = here(str(src[k]))
    for tname, task in cfg["tasks"].items():
        task = cfg["tasks"][tname] = dict(task or {})
        task.setdefault("script", tname)
        if task["script"] not in SCRIPTS:
            raise ValueError(f"{path}: tasks.{tname}: unknown script {task['script']!r} (choose from {tuple(SCRIPTS)})")
        if task.get("features") not in cfg["features"]:
            raise ValueError(f"{path}: tasks.{tname}.features must name one of features: {sorted(cfg['features'])}")
        # arguments that name an existing file or folder relative to the tasks file are resolved against it
        args = [str(a) for a in task.get("args", [])]
        task["args"] = [here(a) if not a.startswith("-") and os.path.exists(here(a)) and not os.path.isabs(a) else a
                        for a in args]
    models = [ModelSpec(m["name"], m["arch"], here(m["checkpoint"]) if m.get("checkpoint") else None,
                        dict(m.get("model_kwargs", {}))) for m in cfg.get("models", [])]
    return {"extract": cfg.get("extract", {}) or {}, "features": cfg["features"], "tasks": cfg["tasks"], "models": models}


def feature_output(feat_root: str, fname: str, src: Dict[str, str]) -> str:
    single = any(k in src for k in SINGLE_FILE_SOURCES)
    return os.path.join(feat_root, fname + (".h5" if single else ""))


def extract_model(model: ModelSpec, cfg: Dict[str, Any], feat_root: str, log_dir: str) -> Dict[str, Any]:
    """Every feature set of the tasks file for one model (extract_features resumes what it already made)."""
    from eval import extract_features

    done = {}
    for fname, src in cfg["features"].items():
        kind = next(k for k in FEATURE_SOURCES if k in src)
        inputs = [f"--{kind.replace('_', '-')}", src[kind]] + (["--coords", src["coords"]] if "coords" in src else [])
        # extract options: the file's shared ones, overridden by this feature set's own (e.g. embedding: mean)
        options = {**cfg["extract"], **{k: v for k, v in src.items() if k not in (*FEATURE_SOURCES, "coords")}}
        out = feature_output(feat_root, fname, src)
        summary = extract_features.main([*model.extract_args(), *inputs, *_options_argv(options), "--output", out,
                                         "--no-progress", "--out-dir", os.path.join(log_dir, fname)])
        done[fname] = {"output": out, "resumed": bool(summary.get("resumed")),
                       "n_failed": summary.get("n_failed", 0)}
    return done


def _options_argv(options: Dict[str, Any]) -> List[str]:
    argv: List[str] = []
    for k, v in options.items():
        if k != "model_kwargs":  # a model property, given with the model
            argv += [f"--{k.replace('_', '-')}", *([str(x) for x in v] if isinstance(v, list) else [str(v)])]
    return argv


def _feature_fingerprint(path: str) -> str:
    """Digest of the feature files' provenance attributes and sizes (a re-extraction changes it)."""
    import h5py

    files = [path] if os.path.isfile(path) else sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".h5"))
    h = hashlib.sha256()
    for f in files:
        with h5py.File(f, "r") as fh:
            h.update(json.dumps({k: str(v) for k, v in sorted(fh.attrs.items())}).encode())
        h.update(f"{os.path.basename(f)}:{os.path.getsize(f)}:{os.path.getmtime(f)}".encode())
    return h.hexdigest()


def run_task(tname: str, task: Dict[str, Any], features: str, out_dir: str, seed: Optional[int]) -> Dict[str, Any]:
    """One task through its own script's ``main``; skipped when its marker matches."""
    import importlib

    flag, report = SCRIPTS[task["script"]]
    argv = [flag, features, *task["args"], "--out-dir", out_dir] + (["--seed", str(seed)] if seed is not None else [])
    key = {"script": task["script"], "argv": argv, "features": _feature_fingerprint(features)}
    marker = os.path.join(out_dir, MARKER)
    report_json = os.path.join(out_dir, f"{report}.json")
    if os.path.isfile(marker) and os.path.isfile(report_json):
        try:
            if json.load(open(marker))["key"] == key:
                LOG.info("%s: finished before, skipped", out_dir)
                return {"skipped": True, "report": report_json}
        except (ValueError, KeyError):
            pass
    ensure_dir(out_dir)
    t0 = time.time()
    importlib.import_module(f"eval.{task['script']}").main(argv)
    atomic_write_text(marker, json.dumps({"key": key, "seconds": time.time() - t0}, indent=1))
    return {"skipped": False, "report": report_json, "seconds": time.time() - t0}


# ------------------------------------------------------------------------------------------ headline numbers
def _gene_expression(r: Dict) -> Dict[str, Any]:
    out = {}
    for mode, m in r["modes"].items():
        s = m["summary"]
        out[f"PCC {mode}"] = (s["pcc_mean"], s["pcc_std"])
    if "drop" in r:
        out["PCC drop"] = (r["drop"]["pcc"], None)
    return out


def _linear_probe(r: Dict) -> Dict[str, Any]:
    s = r["summary"]
    return {"bal. acc": (s["balanced_accuracy"], None), "macro AUROC": (s["macro_auroc"], None)}


def _retrieval(r: Dict) -> Dict[str, Any]:
    out = {}
    if "knn" in r:
        o = r["knn"]["overall"]
        out.update({"top-1": (o.get("top1_acc"), None), "mAP@5": (o.get("mAP@5"), None)})
    if "prototype" in r:
        out["prototype acc"] = (r["prototype"]["accuracy"], None)
    return out


def _survival(r: Dict) -> Dict[str, Any]:
    out = {}
    if "coxnet" in r:
        alpha, best = max(r["coxnet"]["alphas"].items(), key=lambda kv: kv[1]["c_index_mean"] or -1)
        out["c-index"] = (best["c_index_mean"], best.get("c_index_se"))
        out["best α"] = (float(alpha), None)
    if "gmm" in r:
        out["log-rank p"] = (r["gmm"]["logrank"]["p_value"], None)
    return out


def _mil(r: Dict) -> Dict[str, Any]:
    a = r["summary"]["auroc"]
    return {"AUROC": (a["mean"], a.get("se"))}


HEADLINES: Dict[str, Callable[[Dict], Dict[str, Any]]] = {
    "gene_expression": _gene_expression, "linear_probe": _linear_probe, "retrieval": _retrieval,
    "survival": _survival, "mil": _mil,
}


def _cell(v) -> str:
    mean, spread = v
    if mean is None or (isinstance(mean, float) and not np.isfinite(mean)):
        return "nan"
    txt = f"{mean:.3g}" if abs(mean) < 1e-2 else f"{mean:.3f}"
    return txt + (f" ± {spread:.3f}" if spread is not None else "")


def build_table(results: Dict[str, Dict[str, Any]], tasks: Sequence[str]) -> List[Dict[str, str]]:
    """One row per model; columns ``task: metric`` in task order."""
    rows = []
    for model, per_task in results.items():
        row = {"backbone": model}
        for t in tasks:
            entry = per_task.get(t, {})
            if "error" in entry:
                row[f"{t}"] = f"failed: {entry['error'][:60]}"
                continue
            for metric, v in entry.get("metrics", {}).items():
                row[f"{t}: {metric}"] = (f"{v[0]:.1%}" if metric.endswith("drop") and v[0] is not None
                                         and np.isfinite(v[0]) else _cell(v))
        rows.append(row)
    return rows


def plot_table(results: Dict[str, Dict[str, Any]], tasks: Sequence[str], path: str) -> str:
    plt = pyplot()
    cols = list(dict.fromkeys((t, m) for per in results.values() for t in tasks for m in per.get(t, {}).get("metrics", {})))
    n = max(1, len(cols))
    ncol = min(4, n)
    fig, axes = plt.subplots((n + ncol - 1) // ncol, ncol, figsize=(3.4 * ncol, 2.8 * ((n + ncol - 1) // ncol)), squeeze=False)
    models = list(results)
    for ax, (t, m) in zip(axes.ravel(), cols):
        vals = [results[k].get(t, {}).get("metrics", {}).get(m, (np.nan, None)) for k in models]
        means = [np.nan if v[0] is None else v[0] for v in vals]
        err = [0 if v[1] is None else v[1] for v in vals]
        ax.bar(range(len(models)), means, yerr=err, color=[f"C{i}" for i in range(len(models))], capsize=3)
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{t}\n{m}", fontsize=8)
    for ax in axes.ravel()[len(cols):]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def write_comparison(out_dir: str, results: Dict[str, Dict[str, Any]], tasks: Sequence[str], notes: Sequence[str]) -> Dict:
    rows = build_table(results, tasks)
    png = plot_table(results, tasks, os.path.join(out_dir, "compare.png"))
    md = ["# Backbone comparison", "", markdown_table(rows).rstrip(), ""]
    md += [f"- {n}" for n in notes] + ["", "![comparison](compare.png)", ""]
    atomic_write_text(os.path.join(out_dir, "compare.md"), "\n".join(md))
    payload = {"tasks": list(tasks), "models": {m: {t: {k: v for k, v in e.items()} for t, e in per.items()}
                                              for m, per in results.items()}, "table": rows, "plot": png}
    atomic_write_text(os.path.join(out_dir, "compare.json"), json.dumps(payload, indent=1, default=_json_default) + "\n")
    return payload


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--tasks", required=True, help="tasks yaml (features to extract, tasks to run, optional models)")
    p.add_argument("--model", action="append", default=[], metavar="LABEL=ARCH:CHECKPOINT", help="a pretrained backbone")
    p.add_argument("--random-init", action="append", default=[], metavar="LABEL=ARCH", help="a random-init baseline")
    p.add_argument("--model-kwargs", default=None, help="JSON create_model overrides for the command-line models "
                                                       "(default: the tasks file's extract.model_kwargs)")
    p.add_argument("--extract", action="append", default=[], metavar="KEY=VALUE",
                   help="override an extract option of the tasks file, e.g. img_size=224")
    p.add_argument("--only", nargs="+", default=None, help="run only these tasks")
    p.add_argument("--seed", type=int, default=None, help="passed to every task (default: each script's own default)")
    p.add_argument("--out-dir", default="eval_out/compare")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_cli(build_parser(), argv)
    cfg = load_tasks_file(args.tasks)
    for kv in args.extract:
        if "=" not in kv:
            raise ValueError(f"--extract {kv!r}: expected KEY=VALUE")
        k, v = kv.split("=", 1)
        cfg["extract"][k] = v
    kwargs = cfg["extract"].get("model_kwargs", {}) or {}
    if args.model_kwargs:
        kwargs = parse_model_kwargs(args.model_kwargs)
    models = cfg["models"] + [parse_model(s, False, kwargs) for s in args.model] + \
        [parse_model(s, True, kwargs) for s in args.random_init]
    if not models:
        raise ValueError("no model: pass --model LABEL=ARCH:CHECKPOINT and/or --random-init LABEL=ARCH, or list models in the tasks file")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model labels must be unique, got {names}")
    tasks = list(cfg["tasks"])
    if args.only:
        unknown = sorted(set(args.only) - set(tasks))
        if unknown:
            raise ValueError(f"--only: unknown task(s) {unknown} (tasks: {tasks})")
        tasks = [t for t in tasks if t in args.only]
    out = ensure_dir(args.out_dir)
    results: Dict[str, Dict[str, Any]] = {}
    failures = []
    for model in models:
        LOG.info("== %s (%s, %s)", model.name, model.arch, model.checkpoint or "random init")
        feat_root = os.path.join(out, "features", model.name)
        feats = extract_model(model, {**cfg, "features": {f: cfg["features"][f] for f in
                                                          dict.fromkeys(cfg["tasks"][t]["features"] for t in tasks)}},
                              feat_root, os.path.join(out, "logs", model.name))
        results[model.name] = {}
        for t in tasks:
            task = cfg["tasks"][t]
            try:
                info = run_task(t, task, feats[task["features"]]["output"], os.path.join(out, "eval", model.name, t), args.seed)
                report = json.load(open(info["report"]))
                results[model.name][t] = {"metrics": HEADLINES[task["script"]](report), "report": info["report"],
                                          "skipped": info["skipped"], "warnings": report.get("warnings", [])}
            except Exception as err:  # one failing task must not lose the others; reported and exit status 1
                LOG.error("%s / %s failed: %s: %s", model.name, t, type(err).__name__, err)
                results[model.name][t] = {"error": f"{type(err).__name__}: {err}"}
                failures.append(f"{model.name}/{t}")
    notes = ["Models: " + "; ".join(f"{m.name} = {m.arch} " + (f"from {os.path.basename(m.checkpoint)}" if m.checkpoint
                                                                 else "at random init") for m in models),
             "Each cell is the task script's own report (`eval/<model>/<task>/*.md`); ± is the spread that "
             "script reports (gene expression: std over folds; survival c-index and MIL AUROC: SE over folds).",
             "Survival: CoxNet c-index at the alpha with the best fold mean, shown as `best α` (optimistic: alpha chosen "
             "on the test folds)."]
    warned = [f"{m}/{t}: {w}" for m, per in results.items() for t, e in per.items() for w in e.get("warnings", [])]
    if warned:
        notes.append("Warnings from the task reports: " + " | ".join(warned[:10]) + (" ..." if len(warned) > 10 else ""))
    payload = write_comparison(out, results, tasks, notes)
    LOG.info("comparison written to %s", os.path.join(out, "compare.md"))
    if failures:
        raise SystemExit(f"{len(failures)} task(s) failed: {', '.join(failures)} (see {os.path.join(out, 'compare.md')})")
    return payload


if __name__ == "__main__":
    main()
