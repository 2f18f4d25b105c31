"""The demo cohort on top of the synthetic renderer: expression, survival, whole-slide images."""
import numpy as np
import pytest
from scipy.stats import spearmanr

from dino.data.synthetic_tissue import LYMPHOCYTES, NECROSIS, TUMOR, SyntheticTissue
from scripts.synthetic_cohort import SyntheticCohort


@pytest.fixture(scope="module")
def gen():
    return SyntheticCohort(seed=0, n_studies=4, image_size=48)


def test_cohort_patches_are_the_renderers(gen):
    plain = SyntheticTissue(seed=0, n_studies=4, image_size=48)
    assert all(gen.patch(i).image.tobytes() == plain.patch(i).image.tobytes() for i in (0, 7, 23))
    assert repr(gen).startswith("SyntheticCohort(seed=0")


def test_expression_informative_genes_follow_morphology(gen):
    patches = gen.patches(range(240))  # 40 per class, 10 per (class, study)
    morph = np.stack([p.morphology for p in patches])
    study = np.array([p.study for p in patches])
    expr = gen.expression(morph, study, n_genes=30, n_informative=12, batch_strength=0.6)
    assert expr.counts.shape == (len(patches), 30) and expr.counts.dtype == np.int64 and expr.counts.min() >= 0
    assert expr.informative.sum() == 12 and len(expr.genes) == 30
    np.testing.assert_array_equal(expr.counts, gen.expression(morph, study, n_genes=30, n_informative=12,
                                                              batch_strength=0.6).counts)
    y = np.log1p(expr.counts)
    x = np.c_[np.ones(len(morph)), (morph - morph.mean(0)) / morph.std(0)]
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    r2 = 1 - ((y - x @ beta) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)
    assert np.median(r2[expr.informative]) > 0.3
    assert r2[~expr.informative].max() < 0.15
    # The batch effect: noise genes still differ between studies, by about the planted strength.
    noise = y[:, ~expr.informative]
    study_means = np.stack([noise[study == s].mean(0) for s in range(4)])
    assert study_means.std(0).mean() > 0.25
    none = gen.expression(morph, study, n_genes=30, n_informative=12, batch_strength=0.0)
    y0 = np.log1p(none.counts)[:, ~none.informative]
    assert np.stack([y0[study == s].mean(0) for s in range(4)]).std(0).mean() < 0.15
    with pytest.raises(ValueError, match="columns"):
        gen.expression(morph[:, :3], study)


def test_slides_survival_follows_risk_and_msi_follows_lymphocytes(gen):
    slides = gen.slides(300, patches_per_slide=40, msi_fraction=0.3, hazard_ratio=2.5)
    risk = np.array([s.risk for s in slides])
    time = np.array([s.time for s in slides])
    event = np.array([s.event for s in slides])
    assert 0.3 < event.mean() < 0.95 and (time > 0).all()
    assert spearmanr(risk, time)[0] < -0.25
    bad = np.array([np.isin(s.patch_labels, [TUMOR, NECROSIS]).mean() for s in slides])
    assert spearmanr(risk, bad)[0] > 0.4
    msi = np.array([s.label == "MSI" for s in slides])
    lymph = np.array([(s.patch_labels == LYMPHOCYTES).mean() for s in slides])
    assert 0.15 < msi.mean() < 0.45 and lymph[msi].mean() > 2 * lymph[~msi].mean()
    assert len({s.slide_id for s in slides}) == 300
    s = slides[3]
    p = gen.slide_patch(s, 5)
    assert p.label == s.patch_labels[5] and p.study == s.study
    assert p.image.tobytes() == gen.slide_patch(s, 5).image.tobytes()
    assert p.image.tobytes() != gen.slide_patch(slides[4], 5).image.tobytes()


def test_slide_image_has_tissue_regions_on_white_glass():
    gen = SyntheticCohort(seed=0, image_size=64)
    wsi = gen.slide_image(512, index=1, margin=0.1)
    assert wsi.image.shape == (512, 512, 3) and wsi.image.dtype == np.uint8
    assert 0.05 < wsi.tissue_mask.mean() < 0.8
    np.testing.assert_array_equal(wsi.class_map >= 0, wsi.tissue_mask)
    assert len(np.unique(wsi.class_map[wsi.tissue_mask])) >= 2
    edge = np.r_[wsi.image[:40].reshape(-1, 3), wsi.image[-40:].reshape(-1, 3)]
    assert not wsi.tissue_mask[:40].any() and edge.mean() > 225  # empty glass margins
    rgb = wsi.image.astype(np.float32)
    sat = rgb.max(-1) - rgb.min(-1)
    assert sat[wsi.tissue_mask].mean() > 3 * sat[~wsi.tissue_mask].mean()  # what CLAM segments on
    assert wsi.image.tobytes() == gen.slide_image(512, index=1, margin=0.1).image.tobytes()
