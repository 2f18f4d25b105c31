"""The backbone card: the one place that says what the trainer, the loaders and the evals need to know
about a registered backbone (timm's ``PretrainedCfg`` plus ``group_matcher``, as part of our contract).

The card is data: preprocessing (mean, std, eval size, interpolation), the eval pooling and the overrides
``create_model`` accepts. It also answers the structural questions asked of a built model, from the
model's own modules rather than from its parameter names, so renaming a container changes nothing:

* :meth:`BackboneCard.parameter_roles`: per parameter, the layer id for layer-wise lr decay (0 for the
  stem, i + 1 for block i, n_blocks + 1 for the final norm), whether it is weight-decayed, and whether it
  belongs to the patch embedding;
* :meth:`BackboneCard.no_weight_decay`: tokens, position embedding, SSM dynamics (A, D, dt bias) and
  every parameter of one dimension or less (biases, norm weights, LayerScale);
* :meth:`BackboneCard.ssm_layers`: every diagonal SSM of the model, as declared by its mixers.

``create_model`` attaches the registry's card to the model (``model.card``); ``load_pretrained`` attaches
the card stored in the checkpoint, which records the normalisation the weights were trained with.
"""
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import nn

# H&E statistics used by the MV_Hybrid release for pretraining and evaluation (rounded to 4 digits).
HE_MEAN = (0.7032, 0.5361, 0.6610)
HE_STD = (0.2172, 0.2608, 0.2072)
DEFAULT_NORMALIZATION_SOURCE = "default (the paper's H&E statistics)"

POOLS = ("cls", "cls+mean")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


@dataclass(frozen=True)
class SSMLayer:
    """One diagonal SSM: a mixer, or one direction of a bidirectional mixer.

    ``delta = softplus(W dt + dt_bias_applications * dt_bias)``; MambaVision's mixer adds its dt bias
    twice. Mamba-1 layers also give the projection that makes the per-token ``(dt, B, C)``.
    """

    name: str
    A_log: torch.Tensor  # Mamba-1: (d, n); Mamba-2 / Hydra: (heads,)
    D: torch.Tensor
    dt_bias: torch.Tensor
    dt_bias_applications: int = 1
    x_proj: Optional[nn.Module] = None  # Mamba-1: tokens -> [dt (dt_rank) | B (n) | C (n)]
    dt_weight: Optional[torch.Tensor] = None  # Mamba-1: (d, dt_rank)
    # The axis of x_proj's (batch-first) output that holds [dt | B | C]: 1 for a channel-first mixer, whose
    # sequence axis may also carry padding past the block's tokens.
    x_proj_dim: int = -1

    @property
    def kind(self) -> str:
        return "mamba1" if self.A_log.dim() == 2 else "mamba2"

    @property
    def A(self) -> torch.Tensor:
        """The (real, negative) state matrix diagonal, float64."""
        return -torch.exp(self.A_log.detach().double())

    def parameters(self) -> Tuple[torch.Tensor, ...]:
        """The SSM dynamics, which are never weight-decayed."""
        return (self.A_log, self.D, self.dt_bias)


class SSMMixer:
    """Mixin for token mixers that hold diagonal SSMs: :meth:`ssm_layers` declares them for the card."""

    def ssm_layers(self, prefix: str) -> Iterator[SSMLayer]:
        raise NotImplementedError


class ParamRole(NamedTuple):
    layer_id: int
    weight_decay: bool
    patch_embed: bool


@dataclass(frozen=True)
class BackboneCard:
    """What downstream code needs to know about one registered backbone. Frozen; see the module doc."""

    name: str
    paper_name: str
    pool: str  # the eval embedding: "cls", or "cls+mean" (cat[CLS, mean patch])
    accepted_overrides: Tuple[str, ...]  # keyword arguments create_model accepts
    mean: Tuple[float, ...] = HE_MEAN
    std: Tuple[float, ...] = HE_STD
    img_size: int = 224  # eval input size
    interpolation: str = "bicubic"
    normalization_source: str = DEFAULT_NORMALIZATION_SOURCE

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "accepted_overrides", tuple(sorted(self.accepted_overrides)))
        problems = []
        if self.pool not in POOLS:
            problems.append(f"pool {self.pool!r} is not one of {POOLS}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            problems.append(f"mean {self.mean} / std {self.std} must be three values each, std > 0")
        if not isinstance(self.img_size, int) or self.img_size <= 0:
            problems.append(f"img_size {self.img_size!r} must be a positive int")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}")
        if problems:
            raise ValueError(f"backbone card of {self.name!r}: " + "; ".join(problems))

    # -- records -------------------------------------------------------------------------------
    def with_normalization(self, mean, std, source: str) -> "BackboneCard":
        return dataclasses.replace(self, mean=tuple(mean), std=tuple(std), normalization_source=source)

    def preprocessing(self) -> Dict[str, Any]:
        """timm's ``pretrained_cfg`` keys: mean, std, img_size, interpolation (and where the stats come from)."""
        return {"mean": self.mean, "std": self.std, "img_size": self.img_size, "interpolation": self.interpolation,
                "normalization_source": self.normalization_source}

    def to_dict(self) -> Dict[str, Any]:
        """A plain dict (lists, strings, numbers) for checkpoints: ``torch.load(weights_only=True)`` reads it."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BackboneCard":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"backbone card record has unknown keys {unknown}; known: {sorted(fields)}")
        return cls(**d)

    # -- overrides -----------------------------------------------------------------------------
    def check_overrides(self, overrides: Mapping[str, Any]) -> None:
        unknown = sorted(set(overrides) - set(self.accepted_overrides))
        if unknown:
            raise TypeError(f"create_model({self.name!r}): unknown override(s) {unknown}; "
                            f"accepted: {', '.join(self.accepted_overrides)}")

    # -- structure of a built model ------------------------------------------------------------
    def ssm_layers(self, model: nn.Module) -> Iterator[SSMLayer]:
        """Every diagonal SSM of ``model``, in module order, as its mixers declare them (none for a ViT)."""
        for prefix, module in model.named_modules():
            if isinstance(module, SSMMixer):
                yield from module.ssm_layers(prefix)

    def parameter_roles(self, model: nn.Module) -> Dict[str, ParamRole]:
        """Layer id, weight decay and patch-embedding membership of every parameter of ``model`` (a backbone
        of the contract), keyed by its name in ``model``; found by identity from the modules that hold them."""
        n = model.n_blocks
        layer = {id(p): i + 1 for i, blk in enumerate(model.blocks) for p in blk.parameters()}
        patch = {id(p) for p in model.patch_embed.parameters()}
        stem = patch | {id(p) for p in model.token_parameters()}
        frozen_dynamics = {id(p) for s in self.ssm_layers(model) for p in s.parameters()}
        no_wd = stem - patch | frozen_dynamics
        roles = {}
        for name, p in model.named_parameters():
            layer_id = 0 if id(p) in stem else layer.get(id(p), n + 1)
            roles[name] = ParamRole(layer_id, not (id(p) in no_wd or p.ndim <= 1), id(p) in patch)
        return roles

    def layer_ids(self, model: nn.Module) -> Dict[str, int]:
        return {k: r.layer_id for k, r in self.parameter_roles(model).items()}

    def no_weight_decay(self, model: nn.Module) -> set:
        return {k for k, r in self.parameter_roles(model).items() if not r.weight_decay}


def backbone_cards(model: nn.Module) -> Iterator[Tuple[str, nn.Module, BackboneCard]]:
    """``(prefix, backbone, card)`` for every backbone inside ``model`` (itself, or e.g. ``student.backbone``)."""
    for prefix, module in model.named_modules():
        card = getattr(module, "card", None)
        if isinstance(card, BackboneCard):
            yield prefix, module, card
