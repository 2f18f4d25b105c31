"""Three-level configuration: ``configs/ssl_default.yaml`` <- experiment yaml <- ``key=value``.

The default file is the schema: it is loaded in OmegaConf *struct* mode, so merging a key that
it does not define raises an error naming that key, before any work starts. ``student.model_kwargs``
is the only open dict (extra ``mambavision.create_model`` overrides).
"""
import logging
import math
import os
from pathlib import Path
from typing import List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

logger = logging.getLogger("dino")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG_PATH = REPO_ROOT / "configs" / "ssl_default.yaml"

SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")
DTYPES = ("fp32", "fp16", "bf16")
CENTERINGS = ("softmax_center", "sinkhorn_knopp")
SCALING_RULES = ("sqrt_wrt_1024", "linear_wrt_1024", "none")
MODULES = ("backbone", "dino_head", "ibot_head")


class ConfigError(ValueError):
    """A configuration value or key is invalid."""


def load_default_config() -> DictConfig:
    if not DEFAULT_CONFIG_PATH.is_file():
        raise FileNotFoundError(f"default config not found: {DEFAULT_CONFIG_PATH}")
    cfg = OmegaConf.load(DEFAULT_CONFIG_PATH)
    OmegaConf.set_struct(cfg, True)
    # The one open mapping: free-form create_model overrides.
    OmegaConf.set_struct(cfg.student.model_kwargs, False)
    return cfg


def _merge(cfg: DictConfig, other, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, other)
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = getattr(e, "full_key", None) or str(e)
        raise ConfigError(f"unknown config key {key!r} in {source} (not in {DEFAULT_CONFIG_PATH.name})") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid value in {source}: {e}") from None


def build_config(config_file: Optional[str] = None, opts: Sequence[str] = ()) -> DictConfig:
    """Merge the default, ``config_file`` and the dotlist ``opts``; validate; return the config.

    ``optim.lr`` is not yet scaled (that needs the world size): see :func:`apply_scaling_rules`.
    """
    cfg = load_default_config()
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config file not found: {config_file}")
        cfg = _merge(cfg, OmegaConf.load(config_file), config_file)
    opts = list(opts or [])
    bad = [o for o in opts if "=" not in o]
    if bad:
        raise ConfigError(f"command-line overrides must be key=value, got {bad}")
    if opts:
        cfg = _merge(cfg, OmegaConf.from_dotlist(opts), "command line")
    validate_config(cfg)
    return cfg


def _choice(value, allowed, key):
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}; expected one of {list(allowed)}")


def validate_config(cfg: DictConfig) -> None:
    """Check values that would otherwise fail late, deep inside training."""
    if cfg.train.centering == "centering":  # DINOv2's name for the same thing
        cfg.train.centering = "softmax_center"
    _choice(cfg.train.centering, CENTERINGS, "train.centering")
    _choice(cfg.optim.scaling_rule, SCALING_RULES, "optim.scaling_rule")
    _choice(cfg.compute_precision.autocast_dtype, DTYPES, "compute_precision.autocast_dtype")
    for k in ("tf32", "compile"):
        if not isinstance(cfg.compute_precision[k], bool):
            raise ConfigError(f"compute_precision.{k} must be true or false, got {cfg.compute_precision[k]!r}")
    if not isinstance(cfg.train.peak_tflops, (int, float)) or cfg.train.peak_tflops < 0:
        raise ConfigError(f"train.peak_tflops must be a number >= 0, got {cfg.train.peak_tflops!r}")
    for role in ("student", "teacher"):
        for mod in MODULES:
            c = cfg.compute_precision[role][mod]
            _choice(c.sharding_strategy, SHARDING_STRATEGIES, f"compute_precision.{role}.{mod}.sharding_strategy")
            for k in ("param_dtype", "reduce_dtype", "buffer_dtype"):
                _choice(c.mixed_precision[k], DTYPES, f"compute_precision.{role}.{mod}.mixed_precision.{k}")
    for mod in MODULES:
        # The teacher EMA pairs local shards one-to-one: student and teacher must shard alike.
        s = cfg.compute_precision.student[mod].sharding_strategy == "NO_SHARD"
        t = cfg.compute_precision.teacher[mod].sharding_strategy == "NO_SHARD"
        if s != t:
            raise ConfigError(
                f"compute_precision.student.{mod} and teacher.{mod}: NO_SHARD cannot be mixed with a sharded "
                "strategy (the teacher EMA needs matching shards)"
            )
    positive = {
        "train.batch_size_per_gpu": cfg.train.batch_size_per_gpu,
        "train.OFFICIAL_EPOCH_LENGTH": cfg.train.OFFICIAL_EPOCH_LENGTH,
        "train.saveckp_freq": cfg.train.saveckp_freq,
        "train.log_freq": cfg.train.log_freq,
        "optim.epochs": cfg.optim.epochs,
        "crops.global_crops_size": cfg.crops.global_crops_size,
        "crops.local_crops_size": cfg.crops.local_crops_size,
        "student.patch_size": cfg.student.patch_size,
    }
    for k, v in positive.items():
        if not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{k} must be a positive integer, got {v!r}")
    if cfg.train.num_workers < 0:
        raise ConfigError(f"train.num_workers must be >= 0, got {cfg.train.num_workers}")
    for k in ("global_crops_size", "local_crops_size"):
        if cfg.crops[k] % cfg.student.patch_size:
            raise ConfigError(f"crops.{k}={cfg.crops[k]} is not a multiple of student.patch_size={cfg.student.patch_size}")
    if cfg.crops.local_crops_number < 0:
        raise ConfigError("crops.local_crops_number must be >= 0")
    for k in ("global_crops_scale", "local_crops_scale"):
        lo, hi = cfg.crops[k]
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"crops.{k}={list(cfg.crops[k])} must satisfy 0 < min <= max <= 1")
    lo, hi = cfg.ibot.mask_ratio_min_max
    if not 0 <= lo <= hi <= 1:
        raise ConfigError(f"ibot.mask_ratio_min_max={[lo, hi]} must satisfy 0 <= min <= max <= 1")
    if cfg.ibot.loss_weight > 0 and (hi <= 0 or cfg.ibot.mask_sample_probability <= 0):
        raise ConfigError("ibot.loss_weight > 0 needs a positive ibot.mask_ratio_min_max and mask_sample_probability")
    if cfg.dino.loss_weight <= 0 and cfg.ibot.loss_weight <= 0:
        raise ConfigError("dino.loss_weight and ibot.loss_weight are both 0: nothing to train")
    for k in ("mean", "std"):
        if len(cfg.augmentations[k]) != 3:
            raise ConfigError(f"augmentations.{k} must have 3 values (RGB)")
    if len(cfg.augmentations.color_jitter) != 4:
        raise ConfigError("augmentations.color_jitter must be [brightness, contrast, saturation, hue]")
    for k in ("global1_blur_p", "global2_blur_p", "local_blur_p"):
        if not 0 <= cfg.augmentations[k] <= 1:
            raise ConfigError(f"augmentations.{k}={cfg.augmentations[k]} is not a probability")


def apply_scaling_rules(cfg: DictConfig, world_size: int) -> DictConfig:
    """Set ``optim.lr`` from ``optim.base_lr`` for the total batch size (DINOv2's rule)."""
    total = cfg.train.batch_size_per_gpu * world_size
    rule = cfg.optim.scaling_rule
    if rule == "sqrt_wrt_1024":
        cfg.optim.lr = float(cfg.optim.base_lr * math.sqrt(total / 1024.0))
    elif rule == "linear_wrt_1024":
        cfg.optim.lr = float(cfg.optim.base_lr * total / 1024.0)
    else:
        cfg.optim.lr = float(cfg.optim.base_lr)
    logger.info("optim.lr = %.3g (base_lr %.3g, %s, total batch %d)", cfg.optim.lr, cfg.optim.base_lr, rule, total)
    return cfg


def write_config(cfg: DictConfig, output_dir: str, name: str = "config.yaml") -> str:
    """Write the resolved config atomically to ``output_dir/name``; returns the path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, name)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def get_cfg_from_args(args) -> DictConfig:
    """Config from parsed ``dino.train`` arguments (``config_file``, ``opts``, ``output_dir``)."""
    opts: List[str] = list(getattr(args, "opts", None) or [])
    cfg = build_config(getattr(args, "config_file", None) or None, opts)
    if getattr(args, "output_dir", None):
        cfg.train.output_dir = os.path.abspath(args.output_dir)
    else:
        cfg.train.output_dir = os.path.abspath(cfg.train.output_dir)
    return cfg


def setup(args) -> DictConfig:
    """Build the config, start distributed mode, scale the lr, seed, and write ``config.yaml``.

    Mirrors DINOv2's ``dinov2.utils.config.setup``.
    """
    from dino import distributed
    from dino.utils.logging import setup_logging

    cfg = get_cfg_from_args(args)
    os.makedirs(cfg.train.output_dir, exist_ok=True)
    distributed.enable()
    setup_logging(cfg.train.output_dir, distributed.get_global_rank())
    apply_scaling_rules(cfg, distributed.get_global_size())
    if distributed.is_main_process():
        write_config(cfg, cfg.train.output_dir)
    return cfg


def config_to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def as_container(node):
    """Plain python (dict/list) of an OmegaConf node; other values unchanged."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node
