"""Model registry: name -> (model class, default config). Nothing else lives here."""
import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List

from torch import nn


@dataclass(frozen=True)
class ModelEntry:
    name: str
    cls: type
    default_cfg: Dict[str, Any] = field(default_factory=dict)
    paper_name: str = ""
    description: str = ""

    def accepted_keys(self) -> List[str]:
        params = inspect.signature(self.cls.__init__).parameters
        return [k for k in params if k != "self" and params[k].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]


_REGISTRY: Dict[str, ModelEntry] = {}


def register_model(name: str, cls: type, paper_name: str = "", description: str = "", **default_cfg) -> ModelEntry:
    """Register ``cls`` under ``name`` with the keyword arguments that make it the paper's model."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    entry = ModelEntry(name, cls, dict(default_cfg), paper_name or name, description)
    unknown = set(default_cfg) - set(entry.accepted_keys())
    if unknown:
        raise TypeError(f"default config of {name!r} has keys {sorted(unknown)} that {cls.__name__} does not accept")
    _REGISTRY[name] = entry
    return entry


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}") from None


def list_models() -> List[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered backbone; ``overrides`` replace its defaults (timm-style:
    ``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``drop_path_rate``, ...).
    """
    entry = get_entry(name)
    unknown = set(overrides) - set(entry.accepted_keys())
    if unknown:
        raise TypeError(
            f"create_model({name!r}): unknown override(s) {sorted(unknown)}; accepted: {', '.join(entry.accepted_keys())}"
        )
    cfg = {**entry.default_cfg, **overrides}
    model = entry.cls(**cfg)
    model.model_name = name
    model.model_cfg = cfg
    return model
