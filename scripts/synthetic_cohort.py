"""The demo cohort: ground truth on top of the synthetic H&E renderer, for the evaluations' demo data.

:class:`SyntheticCohort` is a :class:`dino.data.synthetic_tissue.SyntheticTissue` (same patches for
the same seed) that adds what only ``scripts/make_demo_data.py`` and the tests need:

* **Spot expression**: Poisson counts from a known log-linear model of morphology, with informative
  and pure-noise genes and a per-study, per-gene batch offset (:meth:`SyntheticCohort.expression`).
* **Slides with survival**: patch bags whose class mixture follows a latent risk, Weibull survival
  driven by that risk with independent censoring, and an MSI/MSS label planted through the
  lymphocyte fraction (:meth:`SyntheticCohort.slides`).
* **Whole-slide images**: large RGB canvases of tissue regions on white glass
  (:meth:`SyntheticCohort.slide_image`).

Like the patches, every output is a pure function of the seed and the call's arguments. This module
is not part of the installed packages; it is imported from a checkout as ``scripts.synthetic_cohort``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from dino.data.synthetic_tissue import LYMPHOCYTES, MORPHOLOGY_FEATURES, MPP, SyntheticPatch, SyntheticTissue, keyed_rng

__all__ = ["SyntheticCohort", "GeneModel", "Expression", "SyntheticSlide", "SlideImage"]

# Approximate population mean / std of each morphology feature over the six classes; used to put
# features on a common scale in the expression model. Fixed constants so the gene model never
# depends on which patches happen to be drawn.
_FEATURE_MEAN = np.array([110.0, 18.0, 1.9, 0.5, 0.14, 0.22, 0.07, 0.45, 0.08])
_FEATURE_STD = np.array([90.0, 14.0, 0.95, 0.5, 0.13, 0.32, 0.1, 0.28, 0.19])

# Random streams of the cohort; 1 and 2 are the renderer's (patches, study styles).
_S_GENES, _S_COUNTS, _S_SLIDES, _S_WSI, _S_SLIDE_PATCH = range(3, 8)


@dataclass(frozen=True)
class GeneModel:
    """The known log-linear expression model: log rate = base + z(morphology) @ weights.T + study offset."""

    genes: tuple[str, ...]
    informative: np.ndarray     # (G,) bool: genes with any non-zero morphology weight
    base_log_rate: np.ndarray   # (G,)
    weights: np.ndarray         # (G, F) on standardised morphology features
    study_offset: np.ndarray    # (n_studies, G) additive log-rate batch effect
    batch_strength: float       # std of study_offset

    def log_rate(self, morphology: np.ndarray, study: np.ndarray) -> np.ndarray:
        """Expected log counts, (N, G), for morphology (N, F) and integer studies (N,)."""
        morphology = np.atleast_2d(np.asarray(morphology, dtype=np.float64))
        study = np.atleast_1d(np.asarray(study)).astype(np.int64)
        if morphology.shape[1] != len(MORPHOLOGY_FEATURES):
            raise ValueError(f"morphology must have {len(MORPHOLOGY_FEATURES)} columns "
                             f"{MORPHOLOGY_FEATURES}, got shape {morphology.shape}")
        if study.shape[0] != morphology.shape[0]:
            raise ValueError(f"got {morphology.shape[0]} morphology rows but {study.shape[0]} study ids")
        if study.min(initial=0) < 0 or study.max(initial=0) >= self.study_offset.shape[0]:
            raise ValueError(f"study ids must lie in [0, {self.study_offset.shape[0]}), got {np.unique(study)}")
        z = np.clip((morphology - _FEATURE_MEAN) / _FEATURE_STD, -4.0, 4.0)
        return self.base_log_rate + z @ self.weights.T + self.study_offset[study]


@dataclass
class Expression:
    """Spot x gene raw counts drawn from a :class:`GeneModel`."""

    counts: np.ndarray       # (N, G) int64
    log_rate: np.ndarray     # (N, G) the noiseless log rate they were drawn from
    model: GeneModel

    @property
    def genes(self) -> tuple[str, ...]:
        return self.model.genes

    @property
    def informative(self) -> np.ndarray:
        return self.model.informative


@dataclass
class SyntheticSlide:
    """One patient's slide: a bag of patches with clinical ground truth."""

    slide_id: str
    patient_id: str
    study: int
    risk: float                  # latent risk (standard normal); drives mixture and hazard
    label: str                   # "MSI" or "MSS"
    time: float                  # observed time (months): min(event time, censoring time)
    event: int                   # 1 = death observed, 0 = censored
    class_fractions: np.ndarray  # (n_classes,) mixture the patches were drawn from
    patch_labels: np.ndarray     # (P,) class of each patch
    patch_keys: np.ndarray       # (P,) keys for SyntheticCohort.slide_patch


@dataclass
class SlideImage:
    """A whole-slide RGB image and its ground-truth maps."""

    image: np.ndarray        # (H, W, 3) uint8
    tissue_mask: np.ndarray  # (H, W) bool
    class_map: np.ndarray    # (H, W) int8, -1 outside tissue
    study: int
    mpp: float = MPP


class SyntheticCohort(SyntheticTissue):
    """:class:`SyntheticTissue` plus spot expression, patients with survival and whole-slide images."""

    # -- expression -------------------------------------------------------------------------------
    def gene_model(self, n_genes: int = 50, n_informative: int | None = None, batch_strength: float = 0.5,
                   seed: int = 0) -> GeneModel:
        """The (fixed, known) expression model for ``n_genes`` genes; see :class:`GeneModel`.

        Informative genes each load on 1-3 morphology features; the rest depend on nothing but the
        study offset and Poisson noise. Gene order is shuffled so names carry no information.
        """
        n_informative = n_genes // 2 if n_informative is None else int(n_informative)
        if not 0 <= n_informative <= n_genes or n_genes < 1:
            raise ValueError(f"need 0 <= n_informative <= n_genes and n_genes >= 1, got {n_informative}, {n_genes}")
        rng = keyed_rng(self.seed, _S_GENES, seed, n_genes, n_informative)
        F = len(MORPHOLOGY_FEATURES)
        informative = np.zeros(n_genes, bool)
        informative[rng.permutation(n_genes)[:n_informative]] = True
        weights = np.zeros((n_genes, F))
        for g in np.flatnonzero(informative):
            k = int(rng.integers(1, 4))
            weights[g, rng.choice(F, k, replace=False)] = rng.choice([-1, 1], k) * rng.uniform(0.35, 0.8, k)
        return GeneModel(
            genes=tuple(f"GENE{g:03d}" for g in range(n_genes)),
            informative=informative,
            base_log_rate=rng.uniform(math.log(3), math.log(60), n_genes),
            weights=weights,
            study_offset=rng.normal(0, batch_strength, (self.n_studies, n_genes)),
            batch_strength=float(batch_strength),
        )

    def expression(self, morphology: np.ndarray, study: np.ndarray | int, n_genes: int = 50,
                   n_informative: int | None = None, batch_strength: float = 0.5, seed: int = 0) -> Expression:
        """Draw Poisson spot x gene counts for the given morphology rows (N, F) and studies (N,)."""
        model = self.gene_model(n_genes, n_informative, batch_strength, seed)
        morphology = np.atleast_2d(np.asarray(morphology, np.float64))
        study = np.broadcast_to(np.asarray(study, np.int64), (morphology.shape[0],))
        log_rate = model.log_rate(morphology, study)
        counts = keyed_rng(self.seed, _S_COUNTS, seed, morphology.shape[0]).poisson(np.exp(log_rate))
        return Expression(counts=counts.astype(np.int64), log_rate=log_rate, model=model)

    # -- slides with survival ---------------------------------------------------------------------
    # Class log-odds of a slide's patches: baseline + risk loading; MSI adds immune infiltrate.
    _MIX_BASE = np.array([1.0, 0.2, 0.6, -0.4, -1.2, -0.8])
    _MIX_RISK = np.array([0.5, -0.7, 0.0, -0.3, 0.9, 0.0])
    _MSI_LYMPH = 1.6

    def slides(self, n_slides: int, patches_per_slide: int = 64, msi_fraction: float = 0.3,
               hazard_ratio: float = 2.0, median_survival: float = 36.0, censoring: float = 0.3,
               seed: int = 0) -> list[SyntheticSlide]:
        """Draw ``n_slides`` patients with a latent risk, survival and an MSI/MSS label.

        * risk ~ N(0, 1) shifts the class mixture towards tumour and necrosis;
        * event time ~ Weibull(shape 1.3) with hazard multiplied by ``hazard_ratio`` per unit risk;
        * censoring time ~ exponential at a rate that censors about ``censoring`` of patients,
          independent of everything else (plus administrative censoring at 10 years);
        * MSI (prob ``msi_fraction``, independent of risk) raises the lymphocyte log-odds.
        """
        if n_slides < 1 or patches_per_slide < 1:
            raise ValueError(f"n_slides and patches_per_slide must be >= 1, got {n_slides}, {patches_per_slide}")
        rng = keyed_rng(self.seed, _S_SLIDES, seed, n_slides, patches_per_slide)
        shape = 1.3
        beta = math.log(hazard_ratio)
        scale0 = median_survival / math.log(2) ** (1 / shape)
        out = []
        for k in range(n_slides):
            risk = float(rng.normal())
            msi = bool(rng.random() < msi_fraction)
            logits = self._MIX_BASE + self._MIX_RISK * risk
            logits[LYMPHOCYTES] += self._MSI_LYMPH * msi
            p = np.exp(logits - logits.max())
            p /= p.sum()
            labels = np.repeat(np.arange(self.n_classes), rng.multinomial(patches_per_slide, p))
            rng.shuffle(labels)
            # Weibull proportional hazards: S(t) = exp(-(t/scale)^shape * exp(beta * risk)).
            t_event = scale0 * (rng.exponential() * math.exp(-beta * risk)) ** (1 / shape)
            c_rate = censoring / max(1e-6, 1 - censoring) / median_survival * math.log(2)
            t_cens = min(rng.exponential(1 / c_rate) if censoring > 0 else np.inf, 120.0)
            out.append(SyntheticSlide(
                slide_id=f"SLIDE_{k:04d}", patient_id=f"PATIENT_{k:04d}",
                study=int(rng.integers(self.n_studies)), risk=risk, label="MSI" if msi else "MSS",
                time=float(min(t_event, t_cens)), event=int(t_event <= t_cens),
                class_fractions=p, patch_labels=labels,
                patch_keys=np.arange(patches_per_slide, dtype=np.int64) + k * (1 << 20) + seed * (1 << 40),
            ))
        return out

    def slide_patch(self, slide: SyntheticSlide, j: int) -> SyntheticPatch:
        """Render the ``j``-th patch of ``slide`` (its class and study are the slide's)."""
        label = int(slide.patch_labels[j])
        return self._render(keyed_rng(self.seed, _S_SLIDE_PATCH, int(slide.patch_keys[j])), label, slide.study)

    # -- whole-slide images ---------------------------------------------------------------------
    def slide_image(self, size: int | tuple[int, int] = 2048, index: int = 0, study: int | None = None,
                    classes: Sequence[int | str] | None = None, n_regions: int = 6, margin: float = 0.12,
                    tile: int | None = None) -> SlideImage:
        """Compose a whole-slide image: tissue fragments of several classes on white glass.

        Args:
            size: (height, width) or side in pixels at 0.5 um/px.
            index: which slide; different indices give different tissue layouts.
            classes: classes the regions are drawn from (default: all).
            n_regions: number of Voronoi regions the tissue is divided into.
            margin: fraction of each side kept empty (glass).
            tile: render tile size in px (default ``image_size``); patches are rendered per tile.
        """
        H, W = (size, size) if isinstance(size, int) else map(int, size)
        tile = int(tile or self.image_size)
        rng = keyed_rng(self.seed, _S_WSI, index)
        study = int(rng.integers(self.n_studies)) if study is None else self._check_study(study)
        classes = list(range(self.n_classes)) if classes is None else [self._check_label(c) for c in classes]

        # Tissue: a few soft blobs plus noise, thresholded, kept inside the margins (low-res, then upsampled).
        lh, lw = max(16, H // 32), max(16, W // 32)
        ys, xs = np.mgrid[0:lh, 0:lw].astype(np.float32)
        ys, xs = (ys + 0.5) / lh, (xs + 0.5) / lw
        field_ = np.zeros((lh, lw), np.float32)
        for _ in range(int(rng.integers(2, 5))):
            cy, cx = rng.uniform(margin + 0.15, 1 - margin - 0.15, 2)
            sy, sx = rng.uniform(0.12, 0.25, 2)
            field_ += np.exp(-((ys - cy) ** 2 / (2 * sy ** 2) + (xs - cx) ** 2 / (2 * sx ** 2)))
        low = rng.standard_normal((10, 10)).astype(np.float32)  # smooth ragged edges, no specks
        field_ += 0.3 * np.asarray(Image.fromarray(low).resize((lw, lh), Image.BICUBIC))
        inside = (ys > margin) & (ys < 1 - margin) & (xs > margin) & (xs < 1 - margin)
        field_ = np.where(inside, field_, -1.0).astype(np.float32)
        big = np.asarray(Image.fromarray(field_).resize((W, H), Image.BILINEAR))
        tissue = big > 0.5
        # Regions: nearest of n_regions seeds, each seed a class.
        seeds = rng.uniform(margin, 1 - margin, (n_regions, 2))
        seed_cls = np.array(classes)[rng.integers(0, len(classes), n_regions)]
        d = (ys[None] - seeds[:, 0, None, None]) ** 2 + (xs[None] - seeds[:, 1, None, None]) ** 2
        low_cls = seed_cls[d.argmin(0)].astype(np.int8)
        class_map = np.asarray(Image.fromarray(low_cls).resize((W, H), Image.NEAREST)).astype(np.int8)
        class_map = np.where(tissue, class_map, -1).astype(np.int8)

        bg = self.styles[study].background.astype(np.float32)
        image = np.broadcast_to(bg, (H, W, 3)).astype(np.float32)
        image += rng.normal(0, 1.0, (H, W, 3)).astype(np.float32)
        for ty in range(0, H, tile):
            for tx in range(0, W, tile):
                cm = class_map[ty:ty + tile, tx:tx + tile]
                for c in np.unique(cm):
                    if c < 0:
                        continue
                    key = (ty // tile) * 65536 + (tx // tile)
                    p = self._render(keyed_rng(self.seed, _S_WSI, index, key + 1, int(c)), int(c), study, size=tile)
                    m = cm == c
                    image[ty:ty + tile, tx:tx + tile][m] = p.image[:m.shape[0], :m.shape[1]][m]
        return SlideImage(np.clip(image, 0, 255).astype(np.uint8), tissue, class_map, study)
