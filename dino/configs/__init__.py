"""Trainer configuration: the OmegaConf schema/loader (see ``config.py``)."""
from .config import (
    CONFIG_DIR,
    DEFAULT_CONFIG_PATH,
    ConfigError,
    apply_scaling_rules,
    build_config,
    get_cfg_from_args,
    load_default_config,
    resolve_config_file,
    setup,
    validate_config,
    write_config,
)

__all__ = [
    "CONFIG_DIR",
    "DEFAULT_CONFIG_PATH",
    "ConfigError",
    "apply_scaling_rules",
    "build_config",
    "get_cfg_from_args",
    "load_default_config",
    "resolve_config_file",
    "setup",
    "validate_config",
    "write_config",
]
