"""The synthetic H&E generator: determinism, class and study structure, expression, survival, WSIs."""
import numpy as np
import pytest
from scipy.stats import spearmanr

from dino.data.synthetic_tissue import (
    ADIPOSE,
    CLASS_NAMES,
    LYMPHOCYTES,
    MORPHOLOGY_FEATURES,
    NECROSIS,
    STROMA,
    TUMOR,
    SyntheticTissue,
)

SIZE = 48


@pytest.fixture(scope="module")
def gen():
    return SyntheticTissue(seed=0, n_studies=4, image_size=SIZE)


@pytest.fixture(scope="module")
def patches(gen):
    return [gen.patch(i) for i in range(240)]  # 40 per class, 10 per (class, study)


def _feature(name):
    return MORPHOLOGY_FEATURES.index(name)


def test_patch_is_pure_function_of_seed_and_index(gen):
    other = SyntheticTissue(seed=0, n_studies=4, image_size=SIZE)
    gen.patch(99)  # no hidden state: rendering something else first changes nothing
    a, b = gen.patch(7), other.patch(7)
    assert a.image.dtype == np.uint8 and a.image.shape == (SIZE, SIZE, 3)
    assert a.image.tobytes() == b.image.tobytes()
    np.testing.assert_array_equal(a.morphology, b.morphology)
    assert (a.label, a.study) == (b.label, b.study)
    assert gen.patch(8).image.tobytes() != a.image.tobytes()
    assert gen.patch(7 + 6 * 4).label == a.label  # same class and study, different tissue
    assert gen.patch(7 + 6 * 4).image.tobytes() != a.image.tobytes()
    assert SyntheticTissue(seed=1, image_size=SIZE).patch(7).image.tobytes() != a.image.tobytes()


def test_labels_and_studies_cycle_and_can_be_forced(gen):
    assert [gen.patch(i).label for i in range(7)] == [0, 1, 2, 3, 4, 5, 0]
    assert [gen.patch(i * 6).study for i in range(5)] == [0, 1, 2, 3, 0]
    p = gen.patch(3, label="ADIPOSE", study=2)
    assert (p.label, p.study, p.class_name) == (ADIPOSE, 2, "ADIPOSE")
    assert set(p.morphology_dict()) == set(MORPHOLOGY_FEATURES)
    with pytest.raises(ValueError, match="unknown class 'FAT'"):
        gen.patch(0, label="FAT")
    with pytest.raises(ValueError, match="study must lie in"):
        gen.patch(0, study=4)
    with pytest.raises(IndexError):
        gen.patch(-1)


def test_same_tissue_at_any_resolution():
    small, large = SyntheticTissue(image_size=32), SyntheticTissue(image_size=96)
    for i in range(6):
        a, b = small.patch(i).morphology, large.patch(i).morphology
        assert a[_feature("nuclear_density")] == b[_feature("nuclear_density")]  # same nuclei drawn
        assert a[_feature("nuclear_area")] == pytest.approx(b[_feature("nuclear_area")])
        assert abs(a[_feature("lumen_fraction")] - b[_feature("lumen_fraction")]) < 0.08


def test_classes_differ_in_pixels_and_morphology(patches):
    labels = np.array([p.label for p in patches])
    imgs = np.stack([p.image for p in patches]).astype(np.float32)
    # Haematoxylin-dark pixels (nuclei) and near-white pixels (lumen, fat), straight from RGB.
    dark = (imgs.mean(-1) < 140).mean((1, 2))
    white = (imgs.min(-1) > 200).mean((1, 2))
    assert dark[labels == LYMPHOCYTES].mean() > 0.15 > 0.01 > dark[labels == ADIPOSE].mean()
    assert white[labels == ADIPOSE].mean() > 0.6 > 0.05 > white[labels == LYMPHOCYTES].mean()

    m = np.stack([p.morphology for p in patches])
    by = {c: m[labels == c].mean(0) for c in range(len(CLASS_NAMES))}
    assert by[LYMPHOCYTES][_feature("nuclear_density")] > 5 * by[STROMA][_feature("nuclear_density")]
    assert by[STROMA][_feature("elongation")] > 2 * by[LYMPHOCYTES][_feature("elongation")]
    assert by[TUMOR][_feature("nuclear_area")] > 2 * by[LYMPHOCYTES][_feature("nuclear_area")]
    assert by[TUMOR][_feature("epithelium_fraction")] > 0.1 > by[STROMA][_feature("epithelium_fraction")]
    assert by[NECROSIS][_feature("debris_fraction")] > 0.2 > by[TUMOR][_feature("debris_fraction")]

    # Classes are separable from simple pixel statistics: nearest centroid, train/test halves.
    feats = np.concatenate([imgs.mean((1, 2)), imgs.std((1, 2)), dark[:, None], white[:, None]], 1)
    feats = (feats - feats.mean(0)) / feats.std(0)
    train, test = np.arange(len(labels)) < 120, np.arange(len(labels)) >= 120
    cent = np.stack([feats[train & (labels == c)].mean(0) for c in range(len(CLASS_NAMES))])
    pred = ((feats[test][:, None] - cent[None]) ** 2).sum(-1).argmin(1)
    assert (pred == labels[test]).mean() > 0.6  # chance is 1/6


def test_studies_shift_colour_of_the_same_tissue():
    gen = SyntheticTissue(seed=0, n_studies=4, image_size=SIZE)
    means = np.array([[gen.patch(i, study=s).image.reshape(-1, 3).mean(0) for s in range(4)] for i in range(12)])
    # Same tissue, four stainings: the per-study mean colours differ consistently across patches.
    shift = means - means.mean(1, keepdims=True)          # (patch, study, rgb)
    assert np.abs(shift.mean(0)).max() > 4.0               # a systematic shift of several grey levels
    flat = SyntheticTissue(seed=0, n_studies=4, image_size=SIZE, stain_variation=0.0)
    # Without stain variation the studies render identical pixels: the shift is the only difference.
    assert flat.patch(5, study=0).image.tobytes() == flat.patch(5, study=3).image.tobytes()


def test_expression_informative_genes_follow_morphology(gen, patches):
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
    gen = SyntheticTissue(seed=0, image_size=64)
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
