"""Model registry: name -> (model class, default config, backbone card). Nothing else lives here."""
import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List

from torch import nn

from .card import BackboneCard


def _constructor_keys(cls: type) -> List[str]:
    params = inspect.signature(cls.__init__).parameters
    return [k for k in params if k != "self" and params[k].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    cls: type
    card: BackboneCard
    default_cfg: Dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def paper_name(self) -> str:
        return self.card.paper_name

    def accepted_keys(self) -> List[str]:
        return list(self.card.accepted_overrides)


_REGISTRY: Dict[str, ModelEntry] = {}


def register_model(name: str, cls: type, pool: str, paper_name: str = "", description: str = "",
                   **default_cfg) -> ModelEntry:
    """Register ``cls`` under ``name`` with the keyword arguments that make it the paper's model; ``pool`` is
    its eval embedding ("cls" or "cls+mean"). The card accepts exactly the constructor's keyword arguments."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    card = BackboneCard(name=name, paper_name=paper_name or name, pool=pool, accepted_overrides=_constructor_keys(cls))
    unknown = set(default_cfg) - set(card.accepted_overrides)
    if unknown:
        raise TypeError(f"default config of {name!r} has keys {sorted(unknown)} that {cls.__name__} does not accept")
    entry = ModelEntry(name, cls, card, dict(default_cfg), description)
    _REGISTRY[name] = entry
    return entry


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}") from None


def get_card(name: str) -> BackboneCard:
    """The registry's card of ``name`` (a checkpoint's own card is ``load_pretrained(...).card``)."""
    return get_entry(name).card


def list_models() -> List[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered backbone; ``overrides`` replace its defaults (timm-style: ``img_size``,
    ``patch_size``, ``embed_dim``, ``depth``, ``drop_path_rate``, ...). An override that the card does not
    accept is a TypeError naming it. The model carries the card as ``model.card``.
    """
    entry = get_entry(name)
    entry.card.check_overrides(overrides)
    cfg = {**entry.default_cfg, **overrides}
    model = entry.cls(**cfg)
    model.model_name = name
    model.model_cfg = cfg
    model.card = entry.card
    return model
