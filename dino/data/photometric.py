"""DINOv2's photometric augmentation moved from the loader workers to the training device.

``augmentations.on_device: true`` splits each crop's augmentation in two. The loader worker still
draws every random parameter, in the order and with the calls torchvision's transforms make (so the
RNG stream, and with it exact resume and the geometric crops, are unchanged), but applies only the
geometric part (RandomResizedCrop, flip). It ships the uint8 crop and a vector of the photometric
parameters (:class:`PhotometricDraw`). The trainer applies colour jitter (in the drawn order),
grayscale, blur and solarisation to the whole batch on the GPU (:func:`apply_photometric`), then
normalises.

Every step reproduces what PIL does to a uint8 image, not a float approximation: blends in fp32
truncated to uint8 (``ImageEnhance``), ITU-R 601 luma in PIL's integer arithmetic, contrast against
the rounded mean luma, the hue step through the same PIL-made tables as
:mod:`dino.data.color_jitter`, the separable blur with the same fp32 weights and rounding, and
solarisation at 128. So the crops are the CPU pipeline's, except that the blur's fp32 sums are added
in another order (a channel in a few pixels per million differs by 1; tested).

Why: on the CPU these steps are about two thirds of a worker's time per sample; on the GPU they are
elementwise passes over the batch.
"""
import functools
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torchvision import transforms

from dino.data.color_jitter import hue_tables

# The parameter vector of one crop.
JITTER, ORDER, FACTORS, GRAY, BLUR, SIGMA, SOLARIZE = 0, slice(1, 5), slice(5, 9), 9, 10, 11, 12
N_PARAMS = 13
BLUR_KERNEL = 9
SOLARIZE_THRESHOLD = 128


class PhotometricDraw:
    """Draws one crop's photometric parameters exactly as ``RandomApply(ColorJitter, p)``,
    ``RandomGrayscale``, the blur's ``RandomApply`` + sigma and ``RandomSolarize`` draw them (same calls on
    torch's global RNG, same order), and returns them as a float32 vector of :data:`N_PARAMS` entries."""

    def __init__(self, color_jitter: Sequence[float], jitter_p: float = 0.8, grayscale_p: float = 0.2,
                 blur_p: float = 0.0, sigma: Tuple[float, float] = (0.1, 2.0), solarize_p: Optional[float] = None):
        brightness, contrast, saturation, hue = color_jitter
        self.jitter = transforms.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
        self.jitter_p, self.grayscale_p, self.blur_p, self.sigma, self.solarize_p = (
            jitter_p, grayscale_p, blur_p, tuple(sigma), solarize_p)
        if hue:
            hue_tables()  # built in the main process, which applies the hue step on the device

    def __call__(self) -> torch.Tensor:
        p = torch.zeros(N_PARAMS)
        p[ORDER] = torch.arange(4, dtype=torch.float32)
        p[FACTORS] = float("nan")  # a step whose factor is not drawn (e.g. hue=0) is skipped, as ColorJitter does
        if not self.jitter_p < torch.rand(1):  # RandomApply applies its transforms unless p < rand
            j = self.jitter
            order, *factors = j.get_params(j.brightness, j.contrast, j.saturation, j.hue)
            p[JITTER] = 1.0
            p[ORDER] = order.to(torch.float32)
            for k, f in enumerate(factors):
                if f is not None:
                    p[FACTORS.start + k] = f
        if torch.rand(1) < self.grayscale_p:
            p[GRAY] = 1.0
        if not self.blur_p < torch.rand(1):
            p[BLUR] = 1.0
            p[SIGMA] = transforms.GaussianBlur.get_params(*self.sigma)
        if self.solarize_p is not None and torch.rand(1).item() < self.solarize_p:
            p[SOLARIZE] = 1.0
        return p


# -- the PIL operations on (n, 3, H, W) float tensors holding uint8 values ----------------------------
def _luma(x):
    """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, as an (n, 1, H, W) tensor of levels."""
    r, g, b = x.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) >> 16).unsqueeze(1).to(x.dtype)


def _blend(degenerate, x, alpha):
    """``Image.blend(degenerate, x, alpha)`` on uint8 images: fp32 interpolation, clipped, truncated."""
    return (degenerate + alpha * (x - degenerate)).clamp(0, 255).floor()


def _hue(x, factor, to_hsv, to_rgb):
    v = x.to(torch.int32)
    hsv = to_hsv[((v[:, 0] << 16) | (v[:, 1] << 8) | v[:, 2]).long()]
    # torchvision's shift: int32(factor * 255), wrapped to uint8, added to H (the top byte) mod 256
    shift = torch.trunc(factor.to(torch.float64).view(-1, 1, 1) * 255).to(torch.int32)
    hsv = (((hsv >> 16) + shift) & 255) << 16 | (hsv & 0xFFFF)
    rgb = to_rgb[hsv.long()]
    return torch.stack([(rgb >> 16) & 255, (rgb >> 8) & 255, rgb & 255], dim=1).to(x.dtype)


_TABLES = {}


def _device_tables(device):
    tables = _TABLES.get(device)
    if tables is None:
        tables = _TABLES[device] = tuple(torch.from_numpy(t.astype("int32")).to(device) for t in hue_tables())
    return tables


def _blur(x, sigma):
    """SeparableGaussianBlur with a per-crop sigma: a 9-tap row pass, then a column pass, reflect-padded,
    fp32 sums (elementwise, so no TF32), rounded to even like NumPy."""
    r = BLUR_KERNEL // 2
    offsets = torch.arange(-r, r + 1, dtype=torch.float64, device=x.device)
    sigma = torch.where(sigma > 0, sigma, 1.0).to(torch.float64)  # crops without blur: any finite kernel
    w = torch.exp(-0.5 * (offsets / sigma.view(-1, 1)) ** 2)
    w = (w / w.sum(1, keepdim=True)).to(torch.float32)  # (n, 9), as the CPU pass builds them
    n, c, h, wd = x.shape
    padded = F.pad(x, (r, r, 0, 0), mode="reflect")
    rows = sum(padded[..., k:k + wd] * w[:, k].view(n, 1, 1, 1) for k in range(BLUR_KERNEL))
    padded = F.pad(rows, (0, 0, r, r), mode="reflect")
    cols = sum(padded[..., k:k + h, :] * w[:, k].view(n, 1, 1, 1) for k in range(BLUR_KERNEL))
    return cols.round().clamp(0, 255)


def apply_photometric(crops: torch.Tensor, params: torch.Tensor, compile: bool = False) -> torch.Tensor:
    """uint8 crops (n, 3, H, W) and their :class:`PhotometricDraw` vectors (n, :data:`N_PARAMS`) -> the
    augmented uint8 crops. No host syncs: every choice is a per-crop select. ``compile``: through
    ``torch.compile`` (one graph per crop size; the fused kernels may contract a blend's multiply-add, so a
    rare channel can differ by 1)."""
    if crops.dtype != torch.uint8 or crops.dim() != 4 or crops.shape[1] != 3:
        raise ValueError(f"apply_photometric expects uint8 (n, 3, H, W) crops, got {tuple(crops.shape)} {crops.dtype}")
    if params.shape != (crops.shape[0], N_PARAMS):
        raise ValueError(f"apply_photometric: params of shape {tuple(params.shape)}, expected "
                         f"({crops.shape[0]}, {N_PARAMS})")
    fn = _compiled() if compile else _apply
    return fn(crops, params.to(device=crops.device, dtype=torch.float32), *_device_tables(crops.device))


@functools.lru_cache(maxsize=1)
def _compiled():
    return torch.compile(_apply, dynamic=False)


def _apply(crops, params, to_hsv, to_rgb):
    def on(col):
        return params[:, col].view(-1, 1, 1, 1) > 0.5

    x = crops.to(torch.float32)
    jitter = params[:, JITTER] > 0.5
    order = params[:, ORDER].round().to(torch.int64)
    factors = params[:, FACTORS]
    drawn = ~torch.isnan(factors)
    # [1, 1, 1, 0] made on the device: a host tensor here would be a blocking copy behind the GPU queue
    neutral = (torch.arange(4, device=factors.device) < 3).to(factors.dtype)
    factors = torch.where(drawn, factors, neutral)
    for position in range(4):  # each crop's drawn order of brightness (0), contrast (1), saturation (2), hue (3)
        op = order[:, position]
        chosen = (jitter & drawn.gather(1, op.view(-1, 1)).view(-1)).view(-1, 1, 1, 1)
        op = op.view(-1, 1, 1, 1)
        # Brightness, contrast and saturation are all ImageEnhance blends, against black, the mean luma
        # (rounded, as int(ImageStat mean + 0.5)) and the luma: one blend with a per-crop degenerate image.
        luma = _luma(x)
        mean = torch.floor(luma.to(torch.float64).mean(dim=(1, 2, 3), keepdim=True) + 0.5).to(x.dtype)
        degenerate = torch.where(op == 0, 0.0, torch.where(op == 1, mean, luma))
        alpha = factors.gather(1, op.view(-1, 1).clamp(max=2)).view(-1, 1, 1, 1)
        stepped = torch.where(op == 3, _hue(x, factors[:, 3], to_hsv, to_rgb), _blend(degenerate, x, alpha))
        x = torch.where(chosen, stepped, x)
    x = torch.where(on(GRAY), _luma(x).expand_as(x), x)
    x = torch.where(on(BLUR), _blur(x, params[:, SIGMA]), x)
    x = torch.where(on(SOLARIZE) & (x >= SOLARIZE_THRESHOLD), 255 - x, x)
    return x.to(torch.uint8)
