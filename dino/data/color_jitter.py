"""torchvision's ``ColorJitter`` with its hue step on RGB PIL images done by two table lookups.

torchvision rotates a PIL image's hue by converting it to PIL's 8-bit HSV, adding the shift to H
(mod 256) and converting back. Each conversion maps one 24-bit colour to another, so it is a table of
2^24 entries. The tables are made once per process by PIL's own converter, applied to every colour, so
the result is byte for byte torchvision's for any Pillow version (tested against
``torchvision.transforms.functional.adjust_hue``). A crop then costs two gathers instead of two
per-pixel float conversions: 3-4x faster on a 256-px crop. The hue step was the largest single cost
of the DINOv2 augmentation, a third of a worker's time.

The two tables take 128 MB. :class:`ColorJitter` builds them when it is constructed (about a second), in
the process that builds the augmentation: DataLoader workers started by ``fork`` (Linux's default
before Python 3.14) share those pages; workers started by ``spawn``/``forkserver`` each build their own.
"""
import functools
from typing import Tuple

import numpy as np
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as F

_COLOURS = 1 << 24
_SIDE = 1 << 12  # the 2^24 colours as a 4096 x 4096 image


def _convert_all_colours(mode_in: str, mode_out: str) -> np.ndarray:
    """PIL's ``mode_in -> mode_out`` conversion of every 24-bit triple, as little-endian uint32 words
    ``c0 << 16 | c1 << 8 | c2`` indexed by the input word packed the same way."""
    # Bytes (c2, c1, c0, 0) per word: PIL's "BGRX" raw mode of RGB images reads and writes this layout;
    # HSV images have no such mode, so their bands are relabelled RGB on the way in and out.
    words = np.arange(_COLOURS, dtype="<u4")
    image = Image.frombuffer("RGB", (_SIDE, _SIDE), words, "raw", "BGRX", 0, 1)
    if mode_in != "RGB":
        image = Image.merge(mode_in, image.split())
    image = image.convert(mode_out)
    if mode_out != "RGB":
        image = Image.merge("RGB", image.split())
    table = np.frombuffer(image.tobytes("raw", "BGRX"), dtype="<u4").copy()
    table &= 0xFFFFFF  # the X byte is padding
    return table


@functools.lru_cache(maxsize=1)
def hue_tables() -> Tuple[np.ndarray, np.ndarray]:
    """(RGB -> HSV, HSV -> RGB), each 2^24 packed words: PIL's conversions, tabulated."""
    return _convert_all_colours("RGB", "HSV"), _convert_all_colours("HSV", "RGB")


def hue_shift(hue_factor: float) -> int:
    """The uint8 shift torchvision adds to PIL's H band for ``hue_factor`` (truncated, then mod 256)."""
    return int(np.int32(hue_factor * 255).astype(np.uint8))


def adjust_hue(img, hue_factor: float):
    """``torchvision.transforms.functional.adjust_hue``; RGB PIL images by table lookup, others by torchvision."""
    if not (isinstance(img, Image.Image) and img.mode == "RGB"):
        return F.adjust_hue(img, hue_factor)
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor ({hue_factor}) is not in [-0.5, 0.5].")
    to_hsv, to_rgb = hue_tables()
    rgb = np.frombuffer(img.tobytes("raw", "BGRX"), dtype="<u4") & 0xFFFFFF
    hsv = to_hsv.take(rgb)
    hsv += np.uint32(hue_shift(hue_factor) << 16)  # H is the top byte of the word
    hsv &= 0xFFFFFF  # H wraps mod 256, as torchvision's uint8 addition does
    return Image.frombuffer("RGB", img.size, to_rgb.take(hsv), "raw", "BGRX", 0, 1)


class ColorJitter(transforms.ColorJitter):
    """``torchvision.transforms.ColorJitter`` (same parameters, same RNG draws, same output), with the hue
    step of :func:`adjust_hue`. Builds the hue tables up front when ``hue`` is not zero."""

    def __init__(self, brightness=0, contrast=0, saturation=0, hue=0):
        super().__init__(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
        if self.hue is not None:
            hue_tables()

    def forward(self, img):
        fn_idx, brightness, contrast, saturation, hue = self.get_params(
            self.brightness, self.contrast, self.saturation, self.hue)
        for fn_id in fn_idx:
            if fn_id == 0 and brightness is not None:
                img = F.adjust_brightness(img, brightness)
            elif fn_id == 1 and contrast is not None:
                img = F.adjust_contrast(img, contrast)
            elif fn_id == 2 and saturation is not None:
                img = F.adjust_saturation(img, saturation)
            elif fn_id == 3 and hue is not None:
                img = adjust_hue(img, hue)
        return img
