"""The three-level config: defaults <- experiment yaml <- key=value, strict keys, shipped recipes."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import mambavision

from dino.configs import ConfigError, apply_scaling_rules, build_config, write_config
from dino.configs.config import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"
PAPER_CONFIGS = sorted(p for p in (CONFIGS / "train").glob("*.yaml") if p.stem != "paper")  # paper.yaml: the shared base


def test_defaults_are_dinov2():
    cfg = build_config()
    assert cfg.optim.base_lr == 0.004 and cfg.optim.layerwise_decay == 0.9
    assert cfg.dino.head_n_prototypes == 65536 and cfg.ibot.separate_head is False
    assert cfg.crops.global_crops_size == 224 and cfg.crops.local_crops_number == 8
    assert cfg.compute_precision.student.backbone.sharding_strategy == "SHARD_GRAD_OP"


def test_precedence_file_then_cli(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("optim:\n  epochs: 7\n  base_lr: 0.01\ntrain:\n  seed: 3\n")
    cfg = build_config(str(f), ["optim.epochs=9", "student.model_kwargs.embed_dim=32"])
    assert cfg.optim.epochs == 9  # CLI beats the file
    assert cfg.optim.base_lr == 0.01  # the file beats the default
    assert cfg.train.seed == 3
    assert cfg.optim.weight_decay == 0.04  # untouched default
    assert cfg.student.model_kwargs.embed_dim == 32  # the open dict accepts new keys


def test_unknown_key_in_file_is_named(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("optim:\n  epochs: 7\n  warmup_epoch: 3\n")
    with pytest.raises(ConfigError, match="optim.warmup_epoch"):
        build_config(str(f))


def test_unknown_key_on_cli_is_named():
    with pytest.raises(ConfigError, match="crops.global_crop_size"):
        build_config(opts=["crops.global_crop_size=64"])
    with pytest.raises(ConfigError, match="key=value"):
        build_config(opts=["optim.epochs"])


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        build_config("/definitely/nope.yaml")


@pytest.mark.parametrize(
    "opt, match",
    [
        ("train.centering=mean", "train.centering"),
        ("compute_precision.student.backbone.sharding_strategy=HYBRID", "sharding_strategy"),
        ("compute_precision.teacher.dino_head.mixed_precision.param_dtype=fp8", "param_dtype"),
        ("crops.local_crops_size=100", "multiple of student.patch_size"),
        ("optim.epochs=0", "optim.epochs"),
        ("optim.scaling_rule=cubic", "scaling_rule"),
        ("compute_precision.student.backbone.sharding_strategy=NO_SHARD", "NO_SHARD"),
        ("augmentations.local_blur_p=1.5", "local_blur_p"),
    ],
)
def test_bad_values_fail_early(opt, match):
    with pytest.raises(ConfigError, match=match):
        build_config(opts=[opt])


def test_dinov2_centering_name_is_accepted():
    assert build_config(opts=["train.centering=centering"]).train.centering == "softmax_center"


@pytest.mark.parametrize("rule, world, expected", [
    ("sqrt_wrt_1024", 24, 2e-3 * math.sqrt(64 * 24 / 1024)),
    ("linear_wrt_1024", 2, 2e-3 * 128 / 1024),
    ("none", 8, 2e-3),
])
def test_lr_scaling(rule, world, expected):
    cfg = build_config(opts=["optim.base_lr=0.002", "train.batch_size_per_gpu=64", f"optim.scaling_rule={rule}"])
    apply_scaling_rules(cfg, world)
    assert cfg.optim.lr == pytest.approx(expected, rel=1e-12)


def test_write_config_roundtrip(tmp_path):
    cfg = build_config(opts=["optim.epochs=5", "student.model_kwargs.depth=2"])
    path = write_config(cfg, str(tmp_path))
    assert Path(path).name == "config.yaml"
    back = OmegaConf.load(path)
    assert back.optim.epochs == 5 and back.student.model_kwargs.depth == 2
    # The written file is itself a valid experiment config.
    assert build_config(path).optim.epochs == 5
    assert not list(tmp_path.glob("*.tmp*"))


def test_six_paper_recipes_ship():
    assert {p.stem for p in PAPER_CONFIGS} == {"mv_hybrid", "vit_12", "vit_24", "vim_einfft", "hydra_einfft", "hydra_hybrid"}


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_recipe(path):
    cfg = build_config(str(path))
    assert cfg.student.arch == path.stem
    assert (cfg.train.batch_size_per_gpu, cfg.train.OFFICIAL_EPOCH_LENGTH, cfg.optim.epochs) == (64, 493, 200)
    assert (cfg.optim.base_lr, cfg.optim.scaling_rule, cfg.optim.warmup_epochs, cfg.optim.min_lr) == (2e-3, "sqrt_wrt_1024", 10, 1e-6)
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.optim.clip_grad) == (0.04, 0.4, 3.0)
    assert (cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult, cfg.optim.freeze_last_layer_epochs) == (1.0, 0.2, 1)
    assert (cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher) == (0.992, 1.0)
    assert (cfg.teacher.warmup_teacher_temp, cfg.teacher.teacher_temp, cfg.teacher.warmup_teacher_temp_epochs) == (0.04, 0.06, 30)
    assert cfg.train.centering == "sinkhorn_knopp"
    for head in (cfg.dino, cfg.ibot):
        assert (head.head_n_prototypes, head.head_nlayers, head.head_hidden_dim, head.head_bottleneck_dim) == (65536, 3, 2048, 256)
    assert cfg.ibot.separate_head is True
    assert (cfg.ibot.mask_sample_probability, list(cfg.ibot.mask_ratio_min_max)) == (0.5, [0.1, 0.5])
    assert cfg.dino.koleo_loss_weight == 0.1
    assert (cfg.crops.global_crops_size, list(cfg.crops.global_crops_scale)) == (256, [0.32, 1.0])
    assert (cfg.crops.local_crops_number, cfg.crops.local_crops_size, list(cfg.crops.local_crops_scale)) == (8, 112, [0.05, 0.32])
    assert list(cfg.augmentations.mean) == [0.7032, 0.5361, 0.6610] and cfg.augmentations.solarization is False
    # one source for the H&E statistics: the yaml states the card's numbers
    assert (tuple(cfg.augmentations.mean), tuple(cfg.augmentations.std)) == (mambavision.HE_MEAN, mambavision.HE_STD)
    assert list(cfg.augmentations.color_jitter) == [0.2, 0.2, 0.2, 0.1]
    assert cfg.evaluation.eval_period_iterations == 2465
    for role in ("student", "teacher"):
        for mod in ("backbone", "dino_head", "ibot_head"):
            c = cfg.compute_precision[role][mod]
            assert c.sharding_strategy == "FULL_SHARD"
            assert (c.mixed_precision.param_dtype, c.mixed_precision.reduce_dtype) == ("fp32", "fp16")
    apply_scaling_rules(cfg, 24)  # 3 nodes x 8 GPUs
    assert cfg.optim.lr == pytest.approx(2e-3 * math.sqrt(1536 / 1024))


def test_demo_config_is_tiny():
    cfg = build_config(str(CONFIGS / "demo" / "mv_hybrid_cpu.yaml"))
    assert cfg.student.arch == "mv_hybrid"
    assert cfg.student.model_kwargs.embed_dim <= 64 and cfg.crops.global_crops_size <= 64
    assert cfg.train.dataset_path.startswith("Synthetic")


def test_cli_unknown_key_fails_before_any_work(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "dino.train", "--config-file", str(CONFIGS / "demo" / "tiny.yaml"),
         "--output-dir", str(out), "optim.epochz=3"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 1
    assert "unknown config key 'optim.epochz'" in r.stderr and "Traceback" not in r.stderr
    assert not (out / "checkpoint.pth").exists() and not (out / "training_metrics.json").exists()


def test_paper_recipe_has_one_home_and_backbones_differ_only_in_arch():
    paper = OmegaConf.to_container(build_config(str(CONFIGS / "train" / "paper.yaml")))
    for arch in ("mv_hybrid", "vit_12", "vit_24", "vim_einfft", "hydra_einfft", "hydra_hybrid"):
        path = CONFIGS / "train" / f"{arch}.yaml"
        assert OmegaConf.load(path)["_base_"] == "paper.yaml"
        cfg = OmegaConf.to_container(build_config(str(path)))
        assert cfg["student"].pop("arch") == arch
        assert cfg == {**paper, "student": {k: v for k, v in paper["student"].items() if k != "arch"}}


def test_base_chain_errors_name_the_files(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match=r"_base_ cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        build_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("_base_: missing.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml \(named in .*c\.yaml\)"):
        build_config(str(tmp_path / "c.yaml"))
    # A bad key in the base is reported with the base's file name.
    (tmp_path / "base.yaml").write_text("optim:\n  base_lrr: 1.0\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ntrain:\n  seed: 3\n")
    with pytest.raises(ConfigError, match=r"base_lrr.*base\.yaml"):
        build_config(str(tmp_path / "child.yaml"))


@pytest.mark.parametrize("path", ["configs/demo/mv_hybrid_cpu.yaml", "configs/train/paper.yaml"])
def test_he_statistics_have_one_source(path):
    """Configs that train with the H&E statistics state exactly the card's numbers (mambavision.card.HE_MEAN)."""
    cfg = OmegaConf.load(REPO_ROOT / path)
    assert (tuple(cfg.augmentations.mean), tuple(cfg.augmentations.std)) == (mambavision.HE_MEAN, mambavision.HE_STD)
