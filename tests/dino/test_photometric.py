"""augmentations.on_device: the workers draw what the CPU pipeline draws, the device computes what PIL computes."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as F

from dino.data.augmentations import DataAugmentationDINO
from dino.data.loaders import make_dataset
from dino.data.photometric import (BLUR, FACTORS, GRAY, JITTER, N_PARAMS, ORDER, SIGMA, SOLARIZE,
                                   apply_photometric)
from dino.train import train as train_mod

KWARGS = dict(global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32), local_crops_number=3,
              global_crops_size=40, local_crops_size=24, normalize=False)


def run(aug, images, seed=0):
    torch.manual_seed(seed)
    out = [aug(im) for im in images]
    return out, torch.rand(4)  # and the RNG stream after


@pytest.mark.parametrize("recipe", [dict(solarization=True, color_jitter=(0.4, 0.4, 0.2, 0.1)),
                                    dict(solarization=False, color_jitter=(0.2, 0.2, 0.2, 0.1)),
                                    dict(solarization=False, color_jitter=(0.3, 0.0, 0.5, 0.0))],
                         ids=["dinov2", "mv_hybrid paper", "no contrast, no hue"])
def test_device_crops_are_the_cpu_pipelines(recipe):
    images = [make_dataset("Synthetic:length=6:image_size=64")[i][0] for i in range(6)]
    images.append(Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 60, 3), dtype=np.uint8)))
    ref, ref_rng = run(DataAugmentationDINO(**KWARGS, **recipe), images)
    dev, dev_rng = run(DataAugmentationDINO(**KWARGS, **recipe, photometric_on_device=True), images)
    assert torch.equal(ref_rng, dev_rng)  # the same draws: exact resume and the geometric crops hold
    differing = total = 0
    for kind in ("global", "local"):
        crops = torch.stack([c for o in dev for c in o[f"{kind}_crops"]])
        params = torch.stack([p for o in dev for p in o[f"{kind}_crops_params"]])
        assert params.shape == (crops.shape[0], N_PARAMS)
        d = (apply_photometric(crops, params).int() - torch.stack([c for o in ref for c in o[f"{kind}_crops"]]).int())
        assert d.abs().max() <= 1  # the blur's fp32 sums, added in another order
        differing, total = differing + int((d != 0).sum()), total + d.numel()
    assert differing <= 1e-3 * total
    assert all(t is s for o in dev for t, s in zip(o["global_crops_teacher"], o["global_crops"], strict=True))


def params_for(n, **steps):
    """Parameter vectors with only ``steps`` applied (jitter factors by name, others on/off or sigma)."""
    p = torch.zeros(n, N_PARAMS)
    p[:, ORDER] = torch.arange(4, dtype=torch.float32)
    p[:, FACTORS] = float("nan")
    for k, name in enumerate(("brightness", "contrast", "saturation", "hue")):
        if name in steps:
            p[:, JITTER], p[:, FACTORS.start + k] = 1.0, steps[name]
    for col, name in ((GRAY, "gray"), (SOLARIZE, "solarize")):
        p[:, col] = float(steps.get(name, 0))
    if "sigma" in steps:
        p[:, BLUR], p[:, SIGMA] = 1.0, steps["sigma"]
    return p


@pytest.mark.parametrize("step, pil", [
    (dict(brightness=1.37), lambda im: F.adjust_brightness(im, 1.37)),
    (dict(brightness=0.61), lambda im: F.adjust_brightness(im, 0.61)),
    (dict(contrast=1.8), lambda im: F.adjust_contrast(im, 1.8)),
    (dict(contrast=0.33), lambda im: F.adjust_contrast(im, 0.33)),
    (dict(saturation=1.5), lambda im: F.adjust_saturation(im, 1.5)),
    (dict(saturation=0.2), lambda im: F.adjust_saturation(im, 0.2)),
    (dict(hue=0.093), lambda im: F.adjust_hue(im, 0.093)),
    (dict(hue=-0.41), lambda im: F.adjust_hue(im, -0.41)),
    (dict(gray=1), lambda im: F.rgb_to_grayscale(im, num_output_channels=3)),
    (dict(solarize=1), lambda im: F.solarize(im, 128)),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_each_step_is_pils_to_the_byte(step, pil):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)) for _ in range(3)]
    crops = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
    out = apply_photometric(crops, params_for(len(images), **step))
    ref = torch.stack([torch.from_numpy(np.array(pil(im).convert("RGB"))).permute(2, 0, 1) for im in images])
    assert torch.equal(out, ref)


def test_jitter_runs_in_each_crops_drawn_order():
    rng = np.random.default_rng(2)
    im = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    crop = torch.from_numpy(np.array(im)).permute(2, 0, 1)
    factors = dict(brightness=1.3, contrast=0.7, saturation=1.4, hue=0.05)
    ops = [lambda x: F.adjust_brightness(x, 1.3), lambda x: F.adjust_contrast(x, 0.7),
           lambda x: F.adjust_saturation(x, 1.4), lambda x: F.adjust_hue(x, 0.05)]
    orders = [(3, 1, 0, 2), (0, 1, 2, 3), (2, 3, 1, 0)]
    p = params_for(len(orders), **factors)
    p[:, ORDER] = torch.tensor(orders, dtype=torch.float32)
    out = apply_photometric(crop.expand(len(orders), -1, -1, -1).contiguous(), p)
    for i, order in enumerate(orders):
        ref = im
        for k in order:
            ref = ops[k](ref)
        assert torch.equal(out[i], torch.from_numpy(np.array(ref)).permute(2, 0, 1)), order
    assert not torch.equal(out[0], out[1])  # the order matters, so this test can fail


def test_compiled_steps_give_the_same_crops():
    """compute_precision.compile also compiles the photometric steps (on CPU here, inductor's C++ backend)."""
    torch.manual_seed(0)
    aug = DataAugmentationDINO(**KWARGS, solarization=True, color_jitter=(0.4, 0.4, 0.2, 0.1),
                               photometric_on_device=True)
    out = [aug(make_dataset("Synthetic:length=3:image_size=48")[i][0]) for i in range(3)]
    crops = torch.stack([c for o in out for c in o["local_crops"]])
    params = torch.stack([p for o in out for p in o["local_crops_params"]])
    d = apply_photometric(crops, params, compile=True).int() - apply_photometric(crops, params).int()
    assert d.abs().max() <= 1 and (d != 0).float().mean() < 1e-3


def test_no_tensor_is_made_from_host_data_inside(monkeypatch):
    """On a GPU a tensor built from Python values is a blocking copy that waits for the whole queue."""
    crops = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8)
    params = params_for(4, brightness=1.2, contrast=0.8, saturation=1.1, hue=0.05, gray=1, sigma=1.0, solarize=1)
    apply_photometric(crops, params)  # the hue tables exist before the patch

    def refuse(*a, **k):
        raise AssertionError("a tensor from host data inside apply_photometric")

    monkeypatch.setattr(torch, "tensor", refuse)
    monkeypatch.setattr(torch, "as_tensor", refuse)
    apply_photometric(crops, params)


def test_bad_inputs_name_the_problem():
    crops = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        apply_photometric(crops.float(), params_for(2))
    with pytest.raises(ValueError, match="params of shape"):
        apply_photometric(crops, params_for(3))
    with pytest.raises(ValueError, match="normalize=False"):
        DataAugmentationDINO((0.3, 1), (0.05, 0.3), 1, photometric_on_device=True)


def test_trainer_on_device_gives_the_cpu_pipelines_losses(tmp_path):
    losses = {}
    for on_device in (False, True):
        out = tmp_path / str(on_device)
        train_mod.main(["--config-file", "configs/demo/tiny.yaml", "--output-dir", str(out),
                        "train.OFFICIAL_EPOCH_LENGTH=3", "optim.epochs=1",
                        f"augmentations.on_device={str(on_device).lower()}"])
        losses[on_device] = [json.loads(line)["total_loss"] for line in open(out / "training_metrics.json")]
    assert len(losses[True]) >= 2 and losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_on_device_must_be_a_boolean():
    from dino.configs import build_config
    from dino.configs.config import ConfigError

    assert build_config("configs/demo/tiny.yaml", ["augmentations.on_device=true"]).augmentations.on_device is True
    with pytest.raises(ConfigError, match="augmentations.on_device='sometimes' in command line: expected a boolean"):
        build_config("configs/demo/tiny.yaml", ["augmentations.on_device=sometimes"])
