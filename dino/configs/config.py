"""Three-level configuration: ``configs/ssl_default.yaml`` <- experiment yaml <- ``key=value``.

The default file is the schema: it is loaded in OmegaConf *struct* mode, so merging a key that
it does not define raises an error naming that key, before any work starts. ``student.model_kwargs``
is the only open dict (extra ``mambavision.create_model`` overrides).

Values are checked too, before any work: each one must have the type of its default (an int is
accepted for a float) and lie in its range; an error names the key and the file (or the command
line) that set it.
"""
import logging
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from dino.atomic import atomic_write

logger = logging.getLogger("dino")

REPO_ROOT = Path(__file__).resolve().parents[2]


def _config_dir() -> Path:
    """The project's ``configs/`` folder: the checkout's, else the copy a wheel installs as
    ``dino/configs/files`` (setup.py maps it there), so a plain ``pip install .`` can train."""
    checkout = REPO_ROOT / "configs"
    if (checkout / "ssl_default.yaml").is_file():
        return checkout
    return Path(__file__).resolve().parent / "files"


CONFIG_DIR = _config_dir()
DEFAULT_CONFIG_PATH = CONFIG_DIR / "ssl_default.yaml"


def resolve_config_file(path: str) -> str:
    """``path`` if it is a file; else the shipped recipe of that name (``configs/train/mv_hybrid.yaml``,
    ``train/mv_hybrid.yaml``), so the README's commands work from any folder after ``pip install``."""
    if os.path.isfile(path):
        return path
    rel = Path(path)
    if rel.parts and rel.parts[0] == "configs":
        rel = Path(*rel.parts[1:])
    shipped = CONFIG_DIR / rel
    if not rel.is_absolute() and shipped.is_file():
        return str(shipped)
    raise FileNotFoundError(f"config file not found: {path} (nor as a shipped recipe under {CONFIG_DIR})")

SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")
DTYPES = ("fp32", "fp16", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")  # torch.compile(mode=...)
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


# -- types -------------------------------------------------------------------------------------
_OPEN_KEYS = ("student.model_kwargs",)


# Checked in this order: bool is a subclass of int.
_KINDS = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"), (list, "a list"),
          (dict, "a mapping"))


def _kind(value) -> str:
    return next((name for t, name in _KINDS if isinstance(value, t)), type(value).__name__)


def _coerce(default, value, key: str, source: str):
    """``value`` converted to the type of the schema's ``default``, or a ConfigError naming key and source."""
    if default is None or value is None or key.startswith(_OPEN_KEYS):
        return value
    ok = True
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str):  # "1e-3" on the command line
            try:
                value = float(value)
            except ValueError:
                ok = False
        ok = ok and isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # e.g. train.output_dir=2024
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list)
        if ok and default and all(isinstance(d, (int, float)) and not isinstance(d, bool) for d in default):
            value = [_coerce(float(default[0]) if isinstance(default[0], float) else default[0], v, f"{key}[{i}]", source)
                     for i, v in enumerate(value)]
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    if not ok:
        shown = "" if isinstance(default, (dict, list)) else f" (the default is {default!r})"
        raise ConfigError(f"{key}={value!r} in {source}: expected {_kind(default)}{shown}")
    return value


def _typed(schema: dict, other: dict, source: str, sources: Dict[str, str], prefix: str = "") -> dict:
    """``other`` with every value coerced to the schema's type; records ``sources[key] = source``.
    Keys missing from the schema are left for the merge to report."""
    out = {}
    for k, v in other.items():
        key = f"{prefix}{k}"
        if isinstance(schema, dict) and k in schema:
            d = schema[k]
            if isinstance(d, dict) and isinstance(v, dict) and not key.startswith(_OPEN_KEYS):
                v = _typed(d, v, source, sources, f"{key}.")
            else:
                v = _coerce(d, v, key, source)
                sources[key] = source
        out[k] = v
    return out


def _checked_merge(cfg: DictConfig, other, source: str, sources: Dict[str, str]) -> DictConfig:
    if not isinstance(other, DictConfig):
        raise ConfigError(f"{source}: expected a mapping of config keys at the top level, got {_kind(as_container(other))}")
    plain = OmegaConf.to_container(other, resolve=False)
    schema = OmegaConf.to_container(cfg, resolve=False)
    return _merge(cfg, _typed(schema, plain, source, sources), source)


def _with_source(err: ConfigError, sources: Dict[str, str]) -> ConfigError:
    """Append where the key named first in the message was set (file or command line)."""
    text = str(err)
    hits = sorted((text.find(k), -len(k), s) for k, s in sources.items() if k in text)
    return ConfigError(f"{text} (set in {hits[0][2]})") if hits else err


BASE_KEY = "_base_"


def _config_chain(path: str, seen: Sequence[str] = ()) -> List:
    """``[(file, yaml), ...]`` from the outermost base to ``path``.

    An experiment yaml may start with ``_base_: other.yaml`` (relative to its own folder): it is then
    applied over that file, so the paper's recipe lives once (``configs/train/paper.yaml``) and each
    backbone's file holds only what differs.
    """
    if path in seen:
        raise ConfigError(f"{BASE_KEY} cycle: {' -> '.join([*seen, path])}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors
        raise ConfigError(f"cannot parse config file {path}: {e}") from None
    base = loaded.pop(BASE_KEY, None) if isinstance(loaded, DictConfig) else None
    if base is None:
        return [(path, loaded)]
    if not isinstance(base, str):
        raise ConfigError(f"{BASE_KEY} in {path} must be a file name, got {base!r}")
    base_path = os.path.join(os.path.dirname(os.path.abspath(path)), base)
    if not os.path.isfile(base_path):
        raise FileNotFoundError(f"{BASE_KEY}: {base} (named in {path}) not found at {base_path}")
    return _config_chain(base_path, (*seen, path)) + [(path, loaded)]


def build_config(config_file: Optional[str] = None, opts: Sequence[str] = ()) -> DictConfig:
    """Merge the default, ``config_file`` and the dotlist ``opts``; validate; return the config.

    ``optim.lr`` is not yet scaled (that needs the world size): see :func:`apply_scaling_rules`.
    """
    cfg = load_default_config()
    sources: Dict[str, str] = {}
    if config_file:
        for path, loaded in _config_chain(resolve_config_file(config_file)):
            cfg = _checked_merge(cfg, loaded, path, sources)
    opts = list(opts or [])
    bad = [o for o in opts if "=" not in o]
    if bad:
        raise ConfigError(f"command-line overrides must be key=value, got {bad}")
    if opts:
        cfg = _checked_merge(cfg, OmegaConf.from_dotlist(opts), "command line", sources)
    try:
        validate_config(cfg)
    except ConfigError as e:
        raise _with_source(e, sources) from None
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
    _choice(cfg.compute_precision.compile_mode, COMPILE_MODES, "compute_precision.compile_mode")
    if cfg.compute_precision.compile_mode != "default" and not cfg.compute_precision.compile:
        raise ConfigError(f"compute_precision.compile_mode={cfg.compute_precision.compile_mode} has no effect "
                          "without compute_precision.compile=true")
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
    _check_ranges(cfg)
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


# (key, low, high, low inclusive, high inclusive); None: unbounded on that side.
_RANGES = (
    ("train.num_workers", 0, None, True, True),
    ("train.seed", 0, None, True, True),
    ("train.max_unreadable_fraction", 0, 1, True, True),
    ("train.keep_checkpoints", 1, None, True, True),
    ("train.peak_tflops", 0, None, True, True),
    ("optim.base_lr", 0, None, False, True),
    ("optim.min_lr", 0, None, True, True),
    ("optim.weight_decay", 0, None, True, True),
    ("optim.weight_decay_end", 0, None, True, True),
    ("optim.warmup_epochs", 0, None, True, True),
    ("optim.freeze_last_layer_epochs", 0, None, True, True),
    ("optim.clip_grad", 0, None, True, True),
    ("optim.patch_embed_lr_mult", 0, None, True, True),
    ("optim.layerwise_decay", 0, 1, False, True),
    ("optim.adamw_beta1", 0, 1, True, False),
    ("optim.adamw_beta2", 0, 1, True, False),
    ("teacher.momentum_teacher", 0, 1, True, True),
    ("teacher.final_momentum_teacher", 0, 1, True, True),
    ("teacher.warmup_teacher_temp", 0, None, False, True),
    ("teacher.teacher_temp", 0, None, False, True),
    ("teacher.warmup_teacher_temp_epochs", 0, None, True, True),
    ("student.drop_path_rate", 0, 1, True, False),
    ("dino.loss_weight", 0, None, True, True),
    ("dino.koleo_loss_weight", 0, None, True, True),
    ("ibot.loss_weight", 0, None, True, True),
    ("ibot.mask_sample_probability", 0, 1, True, True),
    ("evaluation.eval_period_iterations", 0, None, True, True),
)


def _check_ranges(cfg: DictConfig) -> None:
    for key, lo, hi, lo_in, hi_in in _RANGES:
        v = OmegaConf.select(cfg, key)
        if v is None:
            continue
        too_low = lo is not None and (v < lo if lo_in else v <= lo)
        too_high = hi is not None and (v > hi if hi_in else v >= hi)
        if too_low or too_high:
            left = "[" if lo_in else "("
            right = "]" if hi_in else ")"
            raise ConfigError(f"{key}={v!r} is out of range {left}{lo}, {'inf' if hi is None else hi}{right}")
    for head in ("dino", "ibot"):
        for k in ("head_n_prototypes", "head_bottleneck_dim", "head_nlayers", "head_hidden_dim"):
            if cfg[head][k] < 1:
                raise ConfigError(f"{head}.{k}={cfg[head][k]!r} must be a positive integer")


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
    with atomic_write(path, fsync=True) as tmp, open(tmp, "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def get_cfg_from_args(args) -> DictConfig:
    """Config from parsed ``dino.train`` arguments (``config_file``, ``opts``, ``output_dir``)."""
    opts: List[str] = list(getattr(args, "opts", None) or [])
    cfg = build_config(getattr(args, "config_file", None) or None, opts)
    if getattr(args, "output_dir", None):
        cfg.train.output_dir = os.path.abspath(args.output_dir)
    elif cfg.train.output_dir in ("", "."):
        # The schema's default: a bare `python -m dino.train` must not fill the current folder.
        raise ConfigError("no output directory: pass --output-dir DIR (or set train.output_dir in the config); "
                          "checkpoints and logs are not written into the current folder by default")
    else:
        cfg.train.output_dir = os.path.abspath(cfg.train.output_dir)
    if not getattr(args, "config_file", None):
        logger.warning("no --config-file: training the full-size defaults of %s (recipes: configs/train/, "
                       "a tiny smoke test: configs/demo/tiny.yaml)", DEFAULT_CONFIG_PATH)
    return cfg


def setup(args) -> DictConfig:
    """Build the config, start distributed mode and scale the lr (DINOv2's ``dinov2.utils.config.setup``).

    Unlike DINOv2 it does not write ``config.yaml``: the trainer does, once the run is known to
    start (output dir locked, checkpoint compatible), so a refused run leaves the old file alone.
    """
    from dino import distributed
    from dino.utils.logging import setup_logging

    cfg = get_cfg_from_args(args)
    if os.path.exists(cfg.train.output_dir) and not os.path.isdir(cfg.train.output_dir):
        raise ConfigError(f"output dir {cfg.train.output_dir} exists and is not a directory")
    os.makedirs(cfg.train.output_dir, exist_ok=True)
    distributed.enable()
    setup_logging(cfg.train.output_dir, distributed.get_global_rank())
    apply_scaling_rules(cfg, distributed.get_global_size())
    return cfg


def config_to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def as_container(node):
    """Plain python (dict/list) of an OmegaConf node; other values unchanged."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node
