"""Multi-crop augmentation, iBOT block masking and batch collation."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from dino.data import (
    HE_MEAN,
    HE_STD,
    DataAugmentationDINO,
    GaussianBlur,
    MaskingGenerator,
    collate_data_and_cast,
)


def _paper_aug(n_local=3):
    """The MV_Hybrid paper's settings at test size (64 px global, 32 px local)."""
    return DataAugmentationDINO(
        (0.32, 1.0), (0.05, 0.32), n_local, global_crops_size=64, local_crops_size=32,
        mean=HE_MEAN, std=HE_STD, solarization=False, color_jitter=(0.2, 0.2, 0.2, 0.1),
    )


def _noise_image(mode="RGB", size=72):
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (size, size, 4), dtype=np.uint8), "RGBA")
    return rgba if mode == "RGBA" else rgba.convert(mode)


# ---------------------------------------------------------------- augmentations
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_crops_structure_and_sizes_for_any_pil_mode(mode):
    out = _paper_aug(n_local=3)(_noise_image(mode))
    assert set(out) == {"global_crops", "global_crops_teacher", "local_crops", "offsets"}
    assert [tuple(c.shape) for c in out["global_crops"]] == [(3, 64, 64)] * 2
    assert [tuple(c.shape) for c in out["local_crops"]] == [(3, 32, 32)] * 3
    assert all(t is s for t, s in zip(out["global_crops_teacher"], out["global_crops"]))
    assert out["offsets"] == ()
    assert all(c.dtype == torch.float32 for c in out["global_crops"] + out["local_crops"])


def test_normalisation_uses_given_mean_and_std():
    # A uniform gray image is unchanged by crop, flip, jitter without colour, grayscale and
    # blur, so each channel must come out as (128/255 - mean) / std.
    aug = DataAugmentationDINO(
        (0.5, 1.0), (0.2, 0.5), 1, global_crops_size=32, local_crops_size=16,
        mean=HE_MEAN, std=HE_STD, color_jitter=(0.0, 0.0, 0.0, 0.0),
    )
    out = aug(Image.new("RGB", (48, 48), (128, 128, 128)))
    expected = (128 / 255 - torch.tensor(HE_MEAN)) / torch.tensor(HE_STD)
    for crop in out["global_crops"] + out["local_crops"]:
        torch.testing.assert_close(crop.mean((1, 2)), expected, atol=0.02, rtol=0)


def test_uint8_crops_normalised_later_are_bit_identical_to_the_loaders_own():
    """normalize=False ships uint8 crops (a quarter of the bytes through the workers' queues); normalize_uint8,
    which the trainer runs on the GPU, must give exactly the values that ToTensor + Normalize give."""
    from dino.data.augmentations import normalize_uint8

    kw = dict(global_crops_size=64, local_crops_size=32, mean=HE_MEAN, std=HE_STD, solarization=True,
              color_jitter=(0.2, 0.2, 0.2, 0.1))
    img = _noise_image()
    torch.manual_seed(3)
    ref = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 3, **kw)(img)
    torch.manual_seed(3)
    raw = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 3, normalize=False, **kw)(img)
    crops = raw["global_crops"] + raw["local_crops"]
    assert all(c.dtype == torch.uint8 for c in crops) and raw["global_crops_teacher"][0] is raw["global_crops"][0]
    for c, r in zip(crops, ref["global_crops"] + ref["local_crops"]):
        assert torch.equal(normalize_uint8(c, HE_MEAN, HE_STD), r)
    # batched, as the trainer calls it on (N, 3, H, W)
    batch = torch.stack(raw["local_crops"])
    assert torch.equal(normalize_uint8(batch, HE_MEAN, HE_STD), torch.stack(ref["local_crops"]))
    # collation keeps uint8 crops as they are (a cast to float would drop the normalisation)
    gen = MaskingGenerator((4, 4), max_num_patches=8)
    out = collate_data_and_cast([(raw, 0), (raw, 1)], (0.1, 0.5), 0.5, torch.float32, n_tokens=16, mask_generator=gen)
    assert out["collated_global_crops"].dtype == torch.uint8 and out["collated_local_crops"].dtype == torch.uint8


def test_crops_reproducible_under_torch_seed():
    aug, img = _paper_aug(), _noise_image()
    torch.manual_seed(3)
    a = aug(img)
    torch.manual_seed(3)
    b = aug(img)
    torch.manual_seed(4)
    c = aug(img)
    for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"]):
        assert torch.equal(x, y)
    assert not torch.equal(a["global_crops"][0], c["global_crops"][0])


def test_gaussian_blur_probability_means_probability_of_blurring():
    img = _noise_image(size=32)
    never, always = GaussianBlur(p=0.0), GaussianBlur(p=1.0)
    for _ in range(5):
        assert np.array_equal(np.asarray(never(img)), np.asarray(img))
        blurred = np.asarray(always(img)).astype(float)
        assert blurred.std() < np.asarray(img).astype(float).std()  # blur smooths noise


def test_solarization_only_when_enabled():
    from torchvision import transforms

    def has_solarize(aug):
        return any(isinstance(t, transforms.RandomSolarize) for t in aug.global_transfo2.transforms)

    assert has_solarize(DataAugmentationDINO((0.3, 1), (0.05, 0.3), 1))  # DINOv2 default
    assert not has_solarize(_paper_aug())


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="PIL"):
        _paper_aug()(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="global2_blur_p"):
        DataAugmentationDINO((0.3, 1), (0.05, 0.3), 1, global2_blur_p=1.5)


# ---------------------------------------------------------------- masking
def test_mask_count_bounded_by_budget_and_close_to_it():
    gen = MaskingGenerator((8, 8), max_num_patches=32)
    counts = [int(gen(20).sum()) for _ in range(100)]
    assert max(counts) <= 20
    assert np.mean(counts) >= 18  # blocks are added until the budget is (almost) met
    assert gen(0).dtype == bool and gen(0).shape == (8, 8) and not gen(0).any()


def test_single_block_is_a_filled_rectangle_not_spanning_the_grid():
    gen = MaskingGenerator((10, 12), max_num_patches=40)
    for _ in range(50):
        mask = np.zeros((10, 12), dtype=bool)
        added = gen._mask(mask, 40)
        rows, cols = np.nonzero(mask)
        assert added == mask.sum() > 0
        box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all(), "one block must be one contiguous rectangle"
        assert box.shape[0] < 10 and box.shape[1] < 12
        assert gen.min_num_patches - 2 <= added <= 40


def test_masks_reproducible_under_python_seed_and_use_no_other_rng():
    gen = MaskingGenerator((8, 8), max_num_patches=32)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    random.seed(7)
    a = [gen(25) for _ in range(5)]
    random.seed(7)
    b = [gen(25) for _ in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()


# ---------------------------------------------------------------- collate
def _samples(batch=4, n_local=3):
    aug, img = _paper_aug(n_local), _noise_image()
    return [(aug(img), i) for i in range(batch)]


def test_collate_shapes_order_and_mask_bookkeeping():
    samples = _samples(batch=4, n_local=3)
    gen = MaskingGenerator((8, 8), max_num_patches=32)
    out = collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float16, n_tokens=64, mask_generator=gen)

    assert out["collated_global_crops"].shape == (8, 3, 64, 64)
    assert out["collated_local_crops"].shape == (12, 3, 32, 32)
    assert out["collated_global_crops"].dtype == torch.float16
    # crop-major order: row i * B + b is crop i of sample b
    assert torch.equal(out["collated_global_crops"][1 * 4 + 2], samples[2][0]["global_crops"][1].half())
    assert torch.equal(out["collated_local_crops"][2 * 4 + 3], samples[3][0]["local_crops"][2].half())

    masks = out["collated_masks"]
    assert masks.dtype == torch.bool and masks.shape == (8, 64)
    per_image = masks.sum(-1)
    assert int((per_image > 0).sum()) == 4  # int(8 * 0.5) images masked
    assert int(per_image.max()) <= int(64 * 0.5)
    n = int(masks.sum())
    assert out["n_masked_patches"].dtype == torch.long and out["n_masked_patches"].tolist() == [n]
    assert torch.equal(out["mask_indices_list"], masks.flatten().nonzero().flatten())
    assert out["masks_weight"].shape == (n,)
    # each masked image's weights sum to 1, so the total is the number of masked images
    assert out["masks_weight"].sum().item() == pytest.approx(4.0)
    assert n <= out["upperbound"] <= 4 * 32


def test_collate_reproducible_under_python_seed():
    samples = _samples(batch=3, n_local=1)
    gen = MaskingGenerator((8, 8), max_num_patches=32)

    def masks(seed):
        random.seed(seed)
        return collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32, 64, gen)["collated_masks"]

    assert torch.equal(masks(11), masks(11))
    assert not torch.equal(masks(11), masks(12))


def test_collate_without_masking_and_bad_inputs():
    samples = _samples(batch=2, n_local=1)
    gen = MaskingGenerator((8, 8), max_num_patches=32)
    out = collate_data_and_cast(samples, (0.1, 0.5), 0.0, torch.float32, 64, gen)
    assert not out["collated_masks"].any() and out["n_masked_patches"].item() == 0
    assert out["masks_weight"].numel() == 0 and out["upperbound"] == 0

    with pytest.raises(ValueError, match="n_tokens=49"):
        collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32, 49, gen)
    with pytest.raises(ValueError, match="mask_generator"):
        collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32, 64, None)
    ragged = [samples[0], ({**samples[1][0], "local_crops": samples[1][0]["local_crops"] * 2}, 1)]
    with pytest.raises(ValueError, match="local_crops"):
        collate_data_and_cast(ragged, (0.1, 0.5), 0.5, torch.float32, 64, gen)


def test_separable_blur_equals_torchvision_and_keeps_the_rng_stream():
    import numpy as np
    from PIL import Image
    from torchvision import transforms

    from dino.data.augmentations import SeparableGaussianBlur

    img = Image.fromarray((np.random.RandomState(0).rand(64, 48, 3) * 255).astype(np.uint8))
    torch.manual_seed(0)
    ref = [np.asarray(transforms.GaussianBlur(9, (0.1, 2.0))(img)).astype(int) for _ in range(5)]
    after_ref = torch.rand(1)
    torch.manual_seed(0)
    new = [np.asarray(SeparableGaussianBlur(9, (0.1, 2.0))(img)).astype(int) for _ in range(5)]
    assert torch.equal(torch.rand(1), after_ref)  # same sigma draws, same stream afterwards
    for a, b in zip(ref, new):
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3  # float rounding before uint8 only
    gray = img.convert("L")
    assert np.asarray(SeparableGaussianBlur(9, (1.0, 1.0))(gray)).shape == (64, 48)
