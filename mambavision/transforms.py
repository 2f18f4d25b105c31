"""Preprocessing that matches how the backbones were trained, for feature extraction in a notebook.

>>> tf = mambavision.eval_transform(224)
>>> emb = model(tf(pil_image).unsqueeze(0))
"""
from typing import Sequence

# H&E statistics used by the MV_Hybrid release for pretraining and evaluation (rounded to 4 digits).
HE_MEAN = (0.7032, 0.5361, 0.6610)
HE_STD = (0.2172, 0.2608, 0.2072)


def eval_transform(img_size: int = 224, mean: Sequence[float] = HE_MEAN, std: Sequence[float] = HE_STD):
    """PIL image -> normalised (3, img_size, img_size) tensor: RGB, bicubic resize, H&E normalisation.

    ``img_size`` must be a multiple of the backbone's patch size (16 for the paper's models).
    """
    from torchvision import transforms  # only needed here; keeps ``import mambavision`` light

    return transforms.Compose([
        transforms.Lambda(lambda im: im.convert("RGB")),
        transforms.Resize((img_size, img_size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
