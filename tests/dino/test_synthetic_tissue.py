"""The synthetic H&E renderer: determinism, class and study structure (the demo cohort: tests/scripts)."""
import numpy as np
import pytest

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
