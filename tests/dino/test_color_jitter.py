"""The table-lookup hue step gives torchvision's bytes: every colour, every shift, and the same RNG stream."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as F

from dino.data import augmentations
from dino.data.augmentations import DataAugmentationDINO
from dino.data.color_jitter import ColorJitter, adjust_hue, hue_shift


def all_colours() -> Image.Image:
    words = np.arange(1 << 24, dtype=np.uint32)
    rgb = np.stack([words >> 16, (words >> 8) & 255, words & 255], -1).astype(np.uint8)
    return Image.fromarray(rgb.reshape(4096, 4096, 3), "RGB")


@pytest.mark.parametrize("factor", [0.1, -0.37])
def test_every_colour_matches_torchvision(factor):
    img = all_colours()
    ours, ref = np.asarray(adjust_hue(img, factor)), np.asarray(F.adjust_hue(img, factor))
    assert ours.shape == ref.shape and np.array_equal(ours, ref)


def test_every_shift_matches_torchvision_on_a_tile():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8), "RGB")  # not square: size order
    for factor in np.concatenate([np.linspace(-0.5, 0.5, 41), [1e-3, -1e-3, 0.0, 0.0999, -0.2]]):
        ours = adjust_hue(img, float(factor))
        assert ours.mode == "RGB" and ours.size == img.size
        assert np.array_equal(np.asarray(ours), np.asarray(F.adjust_hue(img, float(factor)))), factor
        assert hue_shift(float(factor)) == int(np.int32(factor * 255).astype(np.uint8))


def test_other_inputs_go_through_torchvision():
    rng = np.random.default_rng(1)
    rgba = Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), "RGBA")
    grey = rgba.convert("L")
    tensor = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    for img in (rgba, grey):
        assert np.array_equal(np.asarray(adjust_hue(img, 0.2)), np.asarray(F.adjust_hue(img, 0.2)))
    assert torch.equal(adjust_hue(tensor, 0.2), F.adjust_hue(tensor, 0.2))
    with pytest.raises(ValueError, match="hue_factor"):
        adjust_hue(rgba.convert("RGB"), 0.6)


def test_color_jitter_draws_and_returns_what_torchvision_does():
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB") for _ in range(12)]
    args = dict(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1)
    outputs = []
    for jitter in (ColorJitter(**args), transforms.ColorJitter(**args)):
        torch.manual_seed(0)
        outputs.append([np.asarray(jitter(img)) for img in images] + [torch.rand(3).numpy()])  # + the RNG after
    for ours, ref in zip(*outputs):
        assert np.array_equal(ours, ref)


def test_dino_augmentation_is_unchanged(monkeypatch):
    """DataAugmentationDINO with torchvision's ColorJitter and with ours: the same crops from the same seed."""
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
    kwargs = dict(global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32), local_crops_number=2,
                  global_crops_size=32, local_crops_size=16, solarization=False, color_jitter=(0.2, 0.2, 0.2, 0.1),
                  normalize=False)
    crops = []
    for jitter in (ColorJitter, transforms.ColorJitter):
        monkeypatch.setattr(augmentations, "ColorJitter", jitter)
        aug = DataAugmentationDINO(**kwargs)
        torch.manual_seed(0)
        out = [aug(image) for _ in range(8)]
        crops.append([c for o in out for c in o["global_crops"] + o["local_crops"]])
    assert all(torch.equal(a, b) for a, b in zip(*crops))
