"""DINOv2 multi-crop augmentation, with the MV_Hybrid paper's H&E settings as arguments.

Randomness comes from torch's global RNG only (torchvision v1 transforms draw every
parameter with ``torch.rand``/``torch.randint``), so seeding torch reproduces the crops.
"""

import logging

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torchvision import transforms

from dino.data.color_jitter import ColorJitter
from dino.data.photometric import SOLARIZE_THRESHOLD, PhotometricDraw
from mambavision import HE_MEAN, HE_STD  # noqa: F401  (re-exported by dino.data: the H&E statistics)

logger = logging.getLogger("dino")  # the logger setup_logging configures

SOLARIZE_P = 0.2  # DINOv2: the second global crop only
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


class SeparableGaussianBlur(transforms.GaussianBlur):
    """``torchvision.transforms.GaussianBlur`` on PIL images as two 1-D passes in SciPy.

    The 2-D kernel is the outer product of the 1-D one, so a row pass then a column pass (torch's
    "reflect" padding is SciPy's "mirror") gives torchvision's image up to float rounding before the
    final uint8 rounding (a pixel in 10^4 differs by 1), 5x faster on a 256-px crop: the blur was a
    third of the loader's time. Sigma is drawn exactly as torchvision draws it, so the RNG stream is
    unchanged. Tensors go through torchvision.
    """

    def forward(self, img):
        if not isinstance(img, Image.Image):
            return super().forward(img)
        sigma = self.get_params(self.sigma[0], self.sigma[1])
        x = np.asarray(img, dtype=np.float32)
        for axis, k in ((1, self.kernel_size[0]), (0, self.kernel_size[1])):
            w = np.exp(-0.5 * (np.linspace(-(k - 1) / 2, (k - 1) / 2, k) / sigma) ** 2)
            x = ndimage.correlate1d(x, (w / w.sum()).astype(np.float32), axis=axis, mode="mirror")
        return Image.fromarray(np.clip(np.round(x), 0, 255).astype(np.uint8), img.mode)


class GaussianBlur(transforms.RandomApply):
    """Gaussian blur (kernel 9, sigma uniform in [radius_min, radius_max]) applied with probability ``p``.

    Unlike DINOv2's class of the same name, ``p`` is the probability of blurring (DINOv2
    passes ``1 - p`` to ``RandomApply``, which inverts it; see DataAugmentationDINO).
    """

    def __init__(self, *, p=0.5, radius_min=0.1, radius_max=2.0):
        blur = SeparableGaussianBlur(kernel_size=9, sigma=(radius_min, radius_max))
        super().__init__(transforms=[blur], p=p)


def normalize_uint8(x, mean, std):
    """(..., 3, H, W) uint8 crops -> float32, exactly as torchvision's ToTensor + Normalize compute them
    (x / 255, then - mean, then / std, each rounded in fp32), so on any device the values are bit-identical
    to the loader's own normalisation. ``mean`` and ``std``: sequences, or fp32 tensors already on x's device
    (then nothing is copied)."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.to(torch.float32).div_(255).sub_(mean).div_(std)


class DataAugmentationDINO:
    """Two global crops and ``local_crops_number`` local crops of one PIL image.

    Each crop: RandomResizedCrop (bicubic) + horizontal flip (p=0.5), then ColorJitter with
    probability 0.8 (its hue step by table lookup, :mod:`dino.data.color_jitter`: the same bytes) and
    grayscale with probability 0.2, then a Gaussian blur, then
    ToTensor + Normalize(mean, std). The second global crop may also be solarised
    (threshold 128, p=0.2) when ``solarization`` is on.

    With ``normalize=False`` the crops stay uint8 (3, H, W) tensors and :func:`normalize_uint8`
    finishes them where they are used: the trainer does so on the GPU, so its loader workers skip the
    float conversion and ship a quarter of the bytes. ``photometric_on_device=True`` (with
    ``normalize=False``) also leaves the jitter, grayscale, blur and solarisation to the device: the
    crops are only cropped and flipped, and ``global_crops_params`` / ``local_crops_params`` carry the
    drawn parameters for :func:`dino.data.photometric.apply_photometric`.

    Blur probabilities are the *effective* ones. DINOv2 and the MV_Hybrid release write
    GaussianBlur(p=1.0 / 0.1 / 0.5) for global 1 / global 2 / local crops, but their
    GaussianBlur inverts p, so what they actually train with is 0.0 / 0.9 / 0.5: the
    defaults here reproduce that.

    DINOv2 defaults: color_jitter (0.4, 0.4, 0.2, 0.1), solarization on, ImageNet
    mean/std. The MV_Hybrid paper: color_jitter (0.2, 0.2, 0.2, 0.1), solarization off,
    ``HE_MEAN``/``HE_STD``, 256 px global and 112 px local crops.

    Returns a dict: ``global_crops`` [2 tensors], ``global_crops_teacher`` (the same 2),
    ``local_crops`` [local_crops_number tensors], ``offsets`` ().
    """

    def __init__(
        self,
        global_crops_scale,
        local_crops_scale,
        local_crops_number,
        global_crops_size=224,
        local_crops_size=96,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        solarization=True,
        color_jitter=(0.4, 0.4, 0.2, 0.1),
        global1_blur_p=0.0,
        global2_blur_p=0.9,
        local_blur_p=0.5,
        normalize=True,
        photometric_on_device=False,
    ):
        if len(color_jitter) != 4:
            raise ValueError(f"color_jitter must be (brightness, contrast, saturation, hue), got {color_jitter!r}")
        if photometric_on_device and normalize:
            raise ValueError("photometric_on_device needs normalize=False: the crops leave as uint8, the device "
                             "applies the photometric steps, then normalises")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 (RGB) values, got mean={mean!r} std={std!r}")
        blur_ps = {"global1_blur_p": global1_blur_p, "global2_blur_p": global2_blur_p, "local_blur_p": local_blur_p}
        for key, p in blur_ps.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{key} must be a probability in [0, 1], got {p}")
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = local_crops_number
        self.global_crops_size = global_crops_size
        self.local_crops_size = local_crops_size
        logger.info(
            "DataAugmentationDINO: global %s px scale %s, %d local %s px scale %s, jitter %s, "
            "blur p (global1, global2, local) = (%s, %s, %s), solarization %s, mean %s std %s",
            global_crops_size, self.global_crops_scale, local_crops_number, local_crops_size,
            self.local_crops_scale, tuple(color_jitter), global1_blur_p, global2_blur_p, local_blur_p,
            solarization, tuple(mean), tuple(std),
        )

        def geometric(size, scale):
            return transforms.Compose(
                [
                    transforms.RandomResizedCrop(size, scale=scale, interpolation=transforms.InterpolationMode.BICUBIC),
                    transforms.RandomHorizontalFlip(p=0.5),
                ]
            )

        self.geometric_augmentation_global = geometric(global_crops_size, self.global_crops_scale)
        self.geometric_augmentation_local = geometric(local_crops_size, self.local_crops_scale)

        brightness, contrast, saturation, hue = color_jitter
        color_jittering = transforms.Compose(
            [
                transforms.RandomApply(
                    [ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)], p=0.8
                ),
                transforms.RandomGrayscale(p=0.2),
            ]
        )
        global2_extra = [GaussianBlur(p=global2_blur_p)]
        if solarization:
            global2_extra.append(transforms.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=SOLARIZE_P))
        if normalize:
            self.normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean=mean, std=std)])
        else:
            self.normalize = transforms.PILToTensor()

        self.global_transfo1 = transforms.Compose([color_jittering, GaussianBlur(p=global1_blur_p), self.normalize])
        self.global_transfo2 = transforms.Compose([color_jittering, *global2_extra, self.normalize])
        self.local_transfo = transforms.Compose([color_jittering, GaussianBlur(p=local_blur_p), self.normalize])
        self.photometric_on_device = photometric_on_device
        if photometric_on_device:  # the same draws, applied later on the device (dino.data.photometric)
            draw = dict(color_jitter=color_jitter)
            self.draw_global1 = PhotometricDraw(blur_p=global1_blur_p, **draw)
            self.draw_global2 = PhotometricDraw(blur_p=global2_blur_p, solarize_p=SOLARIZE_P if solarization else None,
                                              **draw)
            self.draw_local = PhotometricDraw(blur_p=local_blur_p, **draw)

    def __call__(self, image):
        """PIL image (any mode; converted to RGB) -> dict of crops."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"DataAugmentationDINO expects a PIL.Image.Image, got {type(image).__name__}")
        if image.mode != "RGB":
            image = image.convert("RGB")  # grayscale, palette, RGBA (alpha dropped), 16-bit ...

        if self.photometric_on_device:
            return self._geometric_and_draws(image)
        global_crop_1 = self.global_transfo1(self.geometric_augmentation_global(image))
        global_crop_2 = self.global_transfo2(self.geometric_augmentation_global(image))
        local_crops = [
            self.local_transfo(self.geometric_augmentation_local(image)) for _ in range(self.local_crops_number)
        ]
        return {
            "global_crops": [global_crop_1, global_crop_2],
            # the teacher sees the same two global crops
            "global_crops_teacher": [global_crop_1, global_crop_2],
            "local_crops": local_crops,
            "offsets": (),
        }

    def _geometric_and_draws(self, image):
        # Per crop, geometry then the photometric draws: the order in which __call__'s transforms draw.
        crops, params = [], []
        for geometric, draw in [(self.geometric_augmentation_global, self.draw_global1),
                                (self.geometric_augmentation_global, self.draw_global2)] + \
                [(self.geometric_augmentation_local, self.draw_local)] * self.local_crops_number:
            crops.append(self.normalize(geometric(image)))
            params.append(draw())
        return {
            "global_crops": crops[:2],
            "global_crops_teacher": crops[:2],
            "local_crops": crops[2:],
            "global_crops_params": params[:2],
            "local_crops_params": params[2:],
            "offsets": (),
        }
