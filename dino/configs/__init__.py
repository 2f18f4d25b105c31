"""Trainer configuration: the OmegaConf schema/loader (see ``config.py``)."""
from .config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    apply_scaling_rules,
    build_config,
    get_cfg_from_args,
    load_default_config,
    setup,
    validate_config,
    write_config,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ConfigError",
    "apply_scaling_rules",
    "build_config",
    "get_cfg_from_args",
    "load_default_config",
    "setup",
    "validate_config",
    "write_config",
]
