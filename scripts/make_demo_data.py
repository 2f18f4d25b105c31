#!/usr/bin/env python
"""Write the offline demo datasets, rendered by the synthetic H&E generator, in standard formats.

    python scripts/make_demo_data.py --out data/demo            # ~10 s on 2 CPU cores at 64 px

Parts (each also callable from Python: ``write_classification``, ``write_hest``, ``write_slides``):

* ``classification/``  ``images/{CLASS}/{index}.png`` and ``labels.csv`` (path, label, study, split),
  split stratified by class into train / val / test.
* ``hest/``  a HEST-Benchmark task: ``patches/{sample_id}.h5`` (img, barcode, coords),
  ``adata/{sample_id}.h5ad`` (raw counts, obs_names = barcodes, obs ``study`` / ``sample_id``),
  ``splits/{train,test}_{k}.csv`` (leave-sample-out, one sample of every study per test fold),
  ``var_50genes.json``, ``meta.csv`` and ``ground_truth.json`` (informative genes, batch strength).
* ``slides/``  ``patches/{slide_id}.h5`` (img, barcode, coords) and ``clinical.csv``
  (slide_id, patient_id, time, event, label, study, risk).
* ``compare_tasks.yaml``  the tasks file of ``python -m eval.compare`` for the parts written.

Each part is built in a temporary folder and renamed into place when complete, with a
``.complete.json`` recording its parameters; rerunning with the same parameters skips it, and
different parameters need ``--force``. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from PIL import Image

# Allow running from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino.data.synthetic_tissue import CLASS_NAMES, MORPHOLOGY_FEATURES  # noqa: E402
from dino.atomic import atomic_temp_dir  # noqa: E402
from scripts.synthetic_cohort import SyntheticCohort  # noqa: E402

MARKER = ".complete.json"
# Disjoint patch-index ranges, so no image appears in two parts.
_HEST_INDEX_BASE = 1 << 32
_SPOT_PITCH_PX = 200  # Visium centre-to-centre spacing, 100 um at 0.5 um/px


# ---------------------------------------------------------------------------------------------
# Atomic, skippable part folders
# ---------------------------------------------------------------------------------------------
def _is_complete(final: Path, params: dict) -> bool:
    marker = final / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text())["params"] == params
    except (ValueError, KeyError):
        return False


@contextmanager
def _building(final: Path, params: dict, force: bool):
    """Yield a temporary folder to fill; on success it replaces ``final`` (marker written last)."""
    if final.exists() and not force:
        marker = final / MARKER
        what = "was written with other parameters" if marker.is_file() else "is not a complete demo-data folder"
        raise FileExistsError(f"{final} exists and {what}; pass --force (force=True) to rebuild it")
    tmp = atomic_temp_dir(final)
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"params": params, "written": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_WORKER_GEN: SyntheticCohort | None = None


def _init_worker(gen: SyntheticCohort) -> None:
    global _WORKER_GEN
    _WORKER_GEN = gen


def _render_job(job):
    kind, *args = job
    return _WORKER_GEN.patch(*args) if kind == "patch" else _WORKER_GEN.slide_patch(*args)


def _render(gen: SyntheticCohort, jobs: list[tuple], workers: int) -> list:
    """Render ("patch", index, label, study) / ("slide", slide, j) jobs, in order, on ``workers`` processes.

    Every patch is a pure function of its job, so the output does not depend on ``workers``.
    """
    _init_worker(gen)
    if workers <= 1 or len(jobs) < 64:
        return [_render_job(j) for j in jobs]
    # fork where available: workers inherit this module even when it was loaded from a file path.
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(gen,)) as pool:
        return list(pool.map(_render_job, jobs, chunksize=max(8, len(jobs) // (8 * workers))))


def _default_workers() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _gen_params(gen: SyntheticCohort) -> dict:
    return {"seed": gen.seed, "n_studies": gen.n_studies, "image_size": gen.image_size,
            "stain_variation": gen.stain_variation}


def _study_name(study: int) -> str:
    return f"STUDY{study}"


def _write_patch_h5(path: Path, images: np.ndarray, barcodes: list[str], coords: np.ndarray, **attrs) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("img", data=images, chunks=(1, *images.shape[1:]), compression="lzf")
        f.create_dataset("barcode", data=np.array(barcodes, dtype="S"))
        f.create_dataset("coords", data=coords.astype(np.int64))
        for k, v in attrs.items():
            f.attrs[k] = v


# ---------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------
def write_classification(out: str | os.PathLike, gen: SyntheticCohort, n_per_class: int = 60,
                         fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), force: bool = False,
                         workers: int = 1) -> dict:
    """PNG patches under ``out/images/{CLASS}/`` and ``out/labels.csv`` (path, label, study, split).

    Patch ``i`` of the generator for ``i < n_per_class * n_classes``; the split is stratified by class.
    """
    out = Path(out)
    params = {**_gen_params(gen), "n_per_class": n_per_class, "fractions": list(fractions)}
    if _is_complete(out, params):
        return {"part": "classification", "skipped": True, "path": str(out)}
    if n_per_class < 3 or len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"need n_per_class >= 3 and three split fractions summing to 1, got {n_per_class}, {fractions}")
    rng = np.random.default_rng([gen.seed, 101])
    n = n_per_class * gen.n_classes
    split = np.empty(n, dtype=object)
    for c in range(gen.n_classes):  # indices i with i % n_classes == c have class c
        idx = rng.permutation(np.arange(c, n, gen.n_classes))
        n_tr = int(round(fractions[0] * n_per_class))
        n_va = max(1, int(round(fractions[1] * n_per_class)))
        split[idx[:n_tr]], split[idx[n_tr:n_tr + n_va]], split[idx[n_tr + n_va:]] = "train", "val", "test"
    rows = []
    with _building(out, params, force) as tmp:
        for name in CLASS_NAMES:
            (tmp / "images" / name).mkdir(parents=True)
        for i, p in enumerate(_render(gen, [("patch", i, None, None) for i in range(n)], workers)):
            rel = f"images/{p.class_name}/{i:06d}.png"
            Image.fromarray(p.image).save(tmp / rel)
            rows.append({"path": rel, "label": p.class_name, "study": _study_name(p.study), "split": split[i]})
        pd.DataFrame(rows).to_csv(tmp / "labels.csv", index=False)
    return {"part": "classification", "skipped": False, "path": str(out), "patches": n,
            "splits": pd.Series(split).value_counts().to_dict()}


def _spot_layout(rng: np.random.Generator, n_spots: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Visium-like hex grid of spots and a class per spot from a few contiguous tissue regions."""
    side = math.ceil(math.sqrt(n_spots))
    row, col = np.divmod(np.arange(n_spots), side)
    x = (col + 0.5 * (row % 2)) * _SPOT_PITCH_PX
    y = row * _SPOT_PITCH_PX * math.sqrt(3) / 2
    mixture = rng.dirichlet(np.full(n_classes, 0.8))  # each sample has its own composition
    k = int(rng.integers(4, 9))
    seeds = rng.uniform(0, side * _SPOT_PITCH_PX, (k, 2))
    seed_cls = rng.choice(n_classes, k, p=mixture)
    nearest = ((x[:, None] - seeds[None, :, 0]) ** 2 + (y[:, None] - seeds[None, :, 1]) ** 2).argmin(1)
    return np.stack([x, y], 1).round().astype(np.int64) + _SPOT_PITCH_PX, seed_cls[nearest]


def write_hest(out: str | os.PathLike, gen: SyntheticCohort, samples_per_study: int = 2, spots_per_sample: int = 200,
               n_genes: int = 100, n_informative: int = 40, batch_strength: float = 0.3, force: bool = False,
               workers: int = 1) -> dict:
    """A HEST-Benchmark-layout gene-expression task with ``gen.n_studies`` studies (see module doc)."""
    import anndata  # the eval extra; imported here so the other parts need only the core deps

    out = Path(out)
    params = {**_gen_params(gen), "samples_per_study": samples_per_study, "spots_per_sample": spots_per_sample,
              "n_genes": n_genes, "n_informative": n_informative, "batch_strength": batch_strength}
    if _is_complete(out, params):
        return {"part": "hest", "skipped": True, "path": str(out)}
    if samples_per_study < 2 or spots_per_sample < 4 or n_genes < 50:
        raise ValueError("need samples_per_study >= 2 (leave-sample-out splits), spots_per_sample >= 4 and "
                         f"n_genes >= 50 (var_50genes.json); got {samples_per_study}, {spots_per_sample}, {n_genes}")
    samples = []
    for s in range(gen.n_studies):
        for j in range(samples_per_study):
            samples.append((f"{_study_name(s)}_S{j}", s, j))
    layouts, jobs = {}, []
    for k, (sid, study, j) in enumerate(samples):
        coords, labels = _spot_layout(np.random.default_rng([gen.seed, 202, k]), spots_per_sample, gen.n_classes)
        layouts[sid] = (coords, labels)
        base = _HEST_INDEX_BASE + k * (1 << 20)
        jobs += [("patch", base + i, int(c), study) for i, c in enumerate(labels)]
    flat = _render(gen, jobs, workers)
    rendered = {sid: (*layouts[sid], flat[k * spots_per_sample:(k + 1) * spots_per_sample])
                for k, (sid, _, _) in enumerate(samples)}
    morph = np.concatenate([[p.morphology for p in rendered[sid][2]] for sid, _, _ in samples])
    study_of_spot = np.concatenate([[s] * spots_per_sample for _, s, _ in samples])
    expr = gen.expression(morph, study_of_spot, n_genes=n_genes, n_informative=n_informative,
                          batch_strength=batch_strength, seed=gen.seed)
    # HEST's var_50genes: the 50 genes with the largest variance of log1p counts over all spots.
    variance = np.log1p(expr.counts).var(0)
    var50 = [expr.genes[g] for g in np.argsort(-variance, kind="stable")[:50]]
    genes = list(expr.genes)

    with _building(out, params, force) as tmp:
        for d in ("patches", "adata", "splits"):
            (tmp / d).mkdir()
        meta = []
        for k, (sid, study, _) in enumerate(samples):
            coords, labels, patches = rendered[sid]
            barcodes = [f"{sid}-spot{i:04d}" for i in range(len(patches))]
            _write_patch_h5(tmp / "patches" / f"{sid}.h5", np.stack([p.image for p in patches]), barcodes, coords,
                            patch_size=gen.image_size, mpp=0.5 * 256 / gen.image_size)
            rows = slice(k * spots_per_sample, (k + 1) * spots_per_sample)
            obs = pd.DataFrame({"study": _study_name(study), "sample_id": sid,
                                "tissue_class": [CLASS_NAMES[c] for c in labels]}, index=pd.Index(barcodes))
            obs[list(MORPHOLOGY_FEATURES)] = morph[rows]
            ad = anndata.AnnData(X=expr.counts[rows].astype(np.float32), obs=obs, var=pd.DataFrame(index=genes))
            ad.obsm["spatial"] = coords.astype(np.float64)
            ad.write_h5ad(tmp / "adata" / f"{sid}.h5ad")
            meta.append({"sample_id": sid, "study": _study_name(study)})
        pd.DataFrame(meta).to_csv(tmp / "meta.csv", index=False)
        # Leave-sample-out folds as HEST does: fold k tests sample k of every study.
        for k in range(samples_per_study):
            test = [sid for sid, _, j in samples if j == k]
            for name, ids in (("train", [sid for sid, _, _ in samples if sid not in test]), ("test", test)):
                pd.DataFrame({"sample_id": ids, "patches_path": [f"patches/{i}.h5" for i in ids],
                              "expr_path": [f"adata/{i}.h5ad" for i in ids]}).to_csv(
                    tmp / "splits" / f"{name}_{k}.csv", index=False)
        (tmp / "var_50genes.json").write_text(json.dumps({"genes": var50}, indent=1))
        model = expr.model
        (tmp / "ground_truth.json").write_text(json.dumps({
            "informative_genes": [g for g, inf in zip(genes, model.informative) if inf],
            "noise_genes": [g for g, inf in zip(genes, model.informative) if not inf],
            "batch_strength": batch_strength,
            "morphology_features": list(MORPHOLOGY_FEATURES),
            "weights": {g: dict(zip(MORPHOLOGY_FEATURES, map(float, w))) for g, w in zip(genes, model.weights) if w.any()},
            "study_offset": {_study_name(s): dict(zip(genes, map(float, o))) for s, o in enumerate(model.study_offset)},
            "model": "counts ~ Poisson(exp(base + z(morphology) @ weights + study_offset[study]))",
        }, indent=1))
    n_inf50 = sum(g in set(var50) for g in np.array(genes)[model.informative])
    return {"part": "hest", "skipped": False, "path": str(out), "samples": len(samples),
            "spots": len(samples) * spots_per_sample, "genes": n_genes, "informative_in_var50": n_inf50}


def write_slides(out: str | os.PathLike, gen: SyntheticCohort, n_slides: int = 40, patches_per_slide: int = 32,
                 force: bool = False, workers: int = 1) -> dict:
    """Per-slide patch bags ``patches/{slide_id}.h5`` and ``clinical.csv`` with survival and MSI/MSS."""
    out = Path(out)
    params = {**_gen_params(gen), "n_slides": n_slides, "patches_per_slide": patches_per_slide}
    if _is_complete(out, params):
        return {"part": "slides", "skipped": True, "path": str(out)}
    slides = gen.slides(n_slides, patches_per_slide, seed=gen.seed)
    side = math.ceil(math.sqrt(patches_per_slide))
    with _building(out, params, force) as tmp:
        (tmp / "patches").mkdir()
        rows = []
        flat = _render(gen, [("slide", s, j) for s in slides for j in range(patches_per_slide)], workers)
        for k, s in enumerate(slides):
            imgs = np.stack([p.image for p in flat[k * patches_per_slide:(k + 1) * patches_per_slide]])
            r, c = np.divmod(np.arange(patches_per_slide), side)
            coords = np.stack([c, r], 1) * gen.image_size  # a tiled layout at level 0
            _write_patch_h5(tmp / "patches" / f"{s.slide_id}.h5", imgs,
                            [f"{s.slide_id}-p{j:04d}" for j in range(patches_per_slide)], coords,
                            patch_size=gen.image_size)
            rows.append({"slide_id": s.slide_id, "patient_id": s.patient_id, "time": round(s.time, 3),
                         "event": s.event, "label": s.label, "study": _study_name(s.study), "risk": s.risk})
        clinical = pd.DataFrame(rows)
        clinical.to_csv(tmp / "clinical.csv", index=False)
    return {"part": "slides", "skipped": False, "path": str(out), "slides": n_slides,
            "patches": n_slides * patches_per_slide, "events": int(clinical["event"].sum()),
            "msi": int((clinical["label"] == "MSI").sum())}


def make_demo_data(out: str | os.PathLike, image_size: int = 64, seed: int = 0, n_studies: int = 4,
                   parts: tuple[str, ...] = ("classification", "hest", "slides"), force: bool = False,
                   workers: int | None = None, **sizes) -> list[dict]:
    """Write the requested parts under ``out``; ``sizes`` are the per-part size keywords.

    ``workers`` rendering processes (default: up to 4 of the available cores); the output is the same
    for any number of workers.
    """
    workers = _default_workers() if workers is None else int(workers)
    gen = SyntheticCohort(seed=seed, n_studies=n_studies, image_size=image_size)
    writers = {"classification": (write_classification, ("n_per_class",)),
               "hest": (write_hest, ("samples_per_study", "spots_per_sample", "n_genes", "n_informative",
                                     "batch_strength")),
               "slides": (write_slides, ("n_slides", "patches_per_slide"))}
    unknown = set(parts) - set(writers)
    if unknown:
        raise ValueError(f"unknown part(s) {sorted(unknown)}; choose from {list(writers)}")
    known = {k for _, keys in writers.values() for k in keys}
    if set(sizes) - known:
        raise TypeError(f"unknown size keyword(s) {sorted(set(sizes) - known)}; accepted: {sorted(known)}")
    summaries = []
    for part in parts:
        fn, keys = writers[part]
        t0 = time.perf_counter()
        kwargs = {k: sizes[k] for k in keys if sizes.get(k) is not None}
        info = fn(Path(out) / part, gen, force=force, workers=workers, **kwargs)
        info["seconds"] = round(time.perf_counter() - t0, 2)
        summaries.append(info)
    return summaries


TASKS_FILE = "compare_tasks.yaml"


def write_tasks_file(out: str | Path, parts=("classification", "hest", "slides")) -> Path:
    """``<out>/compare_tasks.yaml``: the tasks of ``python -m eval.compare`` on the parts written (paths relative)."""
    from omegaconf import OmegaConf

    features, tasks = {}, {}
    if "hest" in parts:
        features["hest"] = {"hest_patches": "hest/patches"}
        tasks["gene_expression"] = {"features": "hest", "args": ["--task-dir", "hest", "--compare", "random,loso",
                                                                  "--folds", "5", "--genes", "var50", "--study-key", "study"]}
    if "classification" in parts:
        features["patches"] = {"csv": "classification/labels.csv"}
        tasks["linear_probe"] = {"features": "patches"}
        knn = ["--split-key", "split", "--query-split", "test", "--database-split", "train"]
        tasks["retrieval"] = {"features": "patches", "args": [*knn, "--mode", "both"]}
        # the same retrieval on mean-pooled patch tokens alone: MV_Hybrid's default embedding concatenates CLS
        # and mean tokens, and after a short pretraining the larger-norm CLS half dominates the distances
        features["patches_mean"] = {"csv": "classification/labels.csv", "embedding": "mean"}
        tasks["retrieval_mean_tokens"] = {"script": "retrieval", "features": "patches_mean", "args": [*knn, "--mode", "knn"]}
    if "slides" in parts:
        features["slides"] = {"hest_patches": "slides/patches"}
        tasks["survival"] = {"features": "slides", "args": ["--clinical", "slides/clinical.csv"]}
        tasks["mil"] = {"features": "slides", "args": ["--csv", "slides/clinical.csv", "--epochs", "10"]}
    path = Path(out) / TASKS_FILE
    path.write_text("# written by scripts/make_demo_data.py: python -m eval.compare --tasks " + TASKS_FILE + " ...\n"
                    + OmegaConf.to_yaml(OmegaConf.create({"features": features, "tasks": tasks})))
    return path


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--image-size", type=int, default=64, help="patch side in px (the field of view is 128 um)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-studies", type=int, default=4)
    p.add_argument("--parts", default="classification,hest,slides", help="comma-separated parts to write")
    p.add_argument("--force", action="store_true", help="rebuild parts that exist with other parameters")
    p.add_argument("--workers", type=int, default=None, help="rendering processes (default: up to 4 cores)")
    g = p.add_argument_group("sizes")
    g.add_argument("--n-per-class", type=int, default=60, help="classification patches per class")
    g.add_argument("--samples-per-study", type=int, default=2, help="HEST samples per study")
    g.add_argument("--spots-per-sample", type=int, default=200)
    g.add_argument("--n-genes", type=int, default=100)
    g.add_argument("--n-informative", type=int, default=40)
    g.add_argument("--batch-strength", type=float, default=0.3, help="std of the per-study log-rate offsets")
    g.add_argument("--n-slides", type=int, default=40)
    g.add_argument("--patches-per-slide", type=int, default=32)
    return p


def main(argv: list[str] | None = None) -> int:
    a = get_args_parser().parse_args(argv)
    t0 = time.perf_counter()
    summaries = make_demo_data(
        a.out, image_size=a.image_size, seed=a.seed, n_studies=a.n_studies, force=a.force, workers=a.workers,
        parts=tuple(p.strip() for p in a.parts.split(",") if p.strip()),
        n_per_class=a.n_per_class, samples_per_study=a.samples_per_study, spots_per_sample=a.spots_per_sample,
        n_genes=a.n_genes, n_informative=a.n_informative, batch_strength=a.batch_strength,
        n_slides=a.n_slides, patches_per_slide=a.patches_per_slide)
    parts = tuple(p.strip() for p in a.parts.split(",") if p.strip())
    print(f"tasks for eval.compare: {write_tasks_file(a.out, parts)}")
    for s in summaries:
        details = ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("part", "path", "skipped"))
        print(f"{s['part']:>15}: {'already complete, skipped' if s['skipped'] else 'written'} -> {s['path']}"
              + (f" ({details})" if details else ""))
    print(f"demo data in {a.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
