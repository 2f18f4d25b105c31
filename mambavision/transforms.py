"""Preprocessing that matches how a backbone was trained, for feature extraction in a notebook.

>>> model = mambavision.load_pretrained("teacher_checkpoint.pth")
>>> tf = mambavision.eval_transform(card=model.card)   # the card's size, interpolation, mean and std
>>> emb = model(tf(pil_image).unsqueeze(0))
"""
from typing import Optional, Sequence

from .card import BackboneCard


def eval_transform(img_size: Optional[int] = None, mean: Optional[Sequence[float]] = None,
                   std: Optional[Sequence[float]] = None, card: Optional[BackboneCard] = None):
    """PIL image -> normalised (3, img_size, img_size) tensor: RGB, resize, normalise.

    Every value left out comes from ``card`` (a model's ``model.card``); without a card, the defaults of
    the paper's backbones: 224 px, bicubic, the H&E statistics. ``img_size`` must be a multiple of the
    backbone's patch size (16 for the paper's models).
    """
    from torchvision import transforms  # only needed here; keeps ``import mambavision`` light

    card = card or BackboneCard  # the class holds the defaults
    interpolation = transforms.InterpolationMode(card.interpolation)
    size = img_size or card.img_size
    return transforms.Compose([
        transforms.Lambda(lambda im: im.convert("RGB")),
        transforms.Resize((size, size), interpolation=interpolation),
        transforms.ToTensor(),
        transforms.Normalize(card.mean if mean is None else mean, card.std if std is None else std),
    ])
