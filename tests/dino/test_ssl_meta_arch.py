"""SSLMetaArch: losses through the backbone contract, teacher EMA, param groups, teacher checkpoint."""
import math

import pytest
import torch

import mambavision
from dino.configs import build_config
from dino.data.collate import collate_data_and_cast
from dino.data.masking import MaskingGenerator
from dino.train.ssl_meta_arch import SSLMetaArch
from dino.train.train import apply_optim_scheduler, build_optimizer, build_schedulers, do_test

TINY = [
    "student.patch_size=8", "student.drop_path_rate=0.1",
    "student.model_kwargs.embed_dim=32", "student.model_kwargs.depth=2", "student.model_kwargs.num_heads=2",
    "crops.global_crops_size=32", "crops.local_crops_size=16", "crops.local_crops_number=2",
    "dino.head_n_prototypes=8", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
    "ibot.head_n_prototypes=8", "ibot.head_hidden_dim=32", "ibot.head_bottleneck_dim=16",
]


def tiny_cfg(*extra):
    return build_config(opts=TINY + list(extra))


def make_batch(cfg, batch_size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    G, Lc, n_local = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
    samples = [
        ({"global_crops": [torch.randn(3, G, G, generator=g) for _ in range(2)],
          # collate_data_and_cast cannot stack zero local crops: give it one, which the model ignores.
          "local_crops": [torch.randn(3, Lc, Lc, generator=g) for _ in range(max(n_local, 1))]}, ())
        for _ in range(batch_size)
    ]
    grid = G // cfg.student.patch_size
    return collate_data_and_cast(
        samples, mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5, dtype=torch.float32,
        n_tokens=grid * grid, mask_generator=MaskingGenerator((grid, grid), max_num_patches=0.5 * grid * grid),
    )


def build(cfg):
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    model.prepare_for_distributed_training(torch.device("cpu"))
    model.train()
    return model


@pytest.mark.parametrize("arch", ["mv_hybrid", "vit_12"])
@pytest.mark.parametrize("centering, separate", [("softmax_center", True), ("sinkhorn_knopp", False)])
def test_forward_backward(arch, centering, separate):
    cfg = tiny_cfg(f"student.arch={arch}", f"train.centering={centering}", f"ibot.separate_head={separate}")
    model = build(cfg)
    assert ("ibot_head" in model.student) is separate
    assert model.student.dino_head.mlp[0].in_features == model.student.backbone.embed_dim
    losses = model.forward_backward(make_batch(cfg), teacher_temp=0.04)
    assert set(losses) == {"dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss"}
    assert all(math.isfinite(v.item()) for v in losses.values())
    student_grads = [p.grad for p in model.student.parameters() if p.requires_grad]
    assert all(g is not None for g in student_grads)
    assert sum(g.abs().sum().item() for g in student_grads) > 0
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert not model.teacher.training and model.student.training


def test_loss_assembly_matches_dinov2():
    """Recompute the DINO losses from the module's own pieces with the DINOv2 formula."""
    cfg = tiny_cfg("train.centering=sinkhorn_knopp", "ibot.separate_head=true", "crops.local_crops_number=2")
    model = build(cfg)
    model.student.eval()  # no drop path, so a second pass reproduces the first
    batch = make_batch(cfg)
    losses = model.forward_backward(batch, teacher_temp=0.05)
    with torch.no_grad():
        t = model.teacher.backbone(batch["collated_global_crops"], is_training=True)["x_norm_clstoken"]
        a, b = t.chunk(2)
        targets = model.dino_loss.sinkhorn_knopp_teacher(model.teacher.dino_head(torch.cat([b, a])), 0.05).view(2, -1, 8)
        sg, sl = model.student.backbone([batch["collated_global_crops"], batch["collated_local_crops"]],
                                        masks=[batch["collated_masks"], None], is_training=True)
        s_local = model.student.dino_head(sl["x_norm_clstoken"]).chunk(2)
        s_global = model.student.dino_head(sg["x_norm_clstoken"])

        def ce(s, t):
            return -(t * torch.log_softmax(s / 0.1, dim=-1)).sum(-1).mean()

        n_terms = 2 * 2 + 2  # (n_global - 1) * n_global + n_local * n_global
        local = sum(ce(s, t) for s in s_local for t in targets) / n_terms
        glob = ce(s_global, targets.flatten(0, 1)) * 2 / n_terms
    assert losses["dino_local_crops_loss"].item() == pytest.approx(local.item(), rel=1e-5)
    assert losses["dino_global_crops_loss"].item() == pytest.approx(glob.item(), rel=1e-5)


def test_no_local_crops():
    cfg = tiny_cfg("crops.local_crops_number=0")
    losses = build(cfg).forward_backward(make_batch(cfg), teacher_temp=0.04)
    assert "dino_local_crops_loss" not in losses and math.isfinite(losses["dino_global_crops_loss"].item())


def test_update_teacher_ema():
    model = build(tiny_cfg())
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    t0 = [p.clone() for p in model.teacher.parameters()]
    s = [p.clone() for p in model.student.parameters()]
    model.update_teacher(1.0)
    assert all(torch.equal(a, b) for a, b in zip(model.teacher.parameters(), t0))
    model.update_teacher(0.75)
    for t, before, sp in zip(model.teacher.parameters(), t0, s):
        torch.testing.assert_close(t, 0.75 * before + 0.25 * sp)
    model.update_teacher(0.0)
    assert all(torch.equal(a, b) for a, b in zip(model.teacher.parameters(), model.student.parameters()))


def test_teacher_starts_as_student():
    model = build(tiny_cfg())
    for (ns, ps), (nt, pt) in zip(model.student.named_parameters(), model.teacher.named_parameters()):
        assert ns == nt and torch.equal(ps, pt)


def test_param_groups_and_schedules():
    cfg = tiny_cfg("optim.epochs=4", "train.OFFICIAL_EPOCH_LENGTH=5", "optim.warmup_epochs=1",
                   "optim.freeze_last_layer_epochs=1", "optim.lr=0.01", "optim.patch_embed_lr_mult=0.2",
                   "optim.layerwise_decay=1.0")
    model = build(cfg)
    opt = build_optimizer(cfg, model.get_params_groups())
    n_trainable = sum(1 for p in model.student.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_trainable
    sched = build_schedulers(cfg)
    assert sched["last_layer_lr"][4] == 0 and sched["last_layer_lr"][5] > 0
    assert sched["lr"][0] == 0 and sched["lr"][4] == pytest.approx(0.01)
    assert sched["teacher_temp"][0] == cfg.teacher.warmup_teacher_temp
    apply_optim_scheduler(opt, 0.01, 0.05, 0.0)
    names = {id(p): n for n, p in model.student.named_parameters()}
    for g in opt.param_groups:
        gnames = [names[id(p)] for p in g["params"]]
        if g["is_last_layer"]:
            assert g["lr"] == 0 and all("last_layer" in n for n in gnames)
        if any("patch_embed" in n for n in gnames):
            assert g["lr"] == pytest.approx(0.01 * 0.2)
        if any(n.endswith("bias") or "cls_token" in n for n in gnames):
            assert g["weight_decay"] == 0


def test_teacher_checkpoint_loads_with_mambavision(tmp_path):
    cfg = tiny_cfg("student.arch=mv_hybrid")
    cfg.train.output_dir = str(tmp_path)
    model = build(cfg)
    path = do_test(cfg, model, 7)
    assert path.endswith("eval/training_7/teacher_checkpoint.pth")
    ckpt = torch.load(path, weights_only=True)
    assert any(k.startswith("backbone.") for k in ckpt["teacher"])
    backbone = mambavision.load_pretrained(path)  # architecture read from the checkpoint
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), model.teacher.backbone(x))


def test_uint8_batches_are_normalised_on_the_device_with_the_config_statistics():
    """The trainer's loader ships uint8 crops; the step normalises them with augmentations.mean/std and gives
    exactly the losses and gradients of the same batch normalised by the loader."""
    from dino.data.augmentations import normalize_uint8
    from dino.train.train import build_data_loader

    cfg = tiny_cfg()
    raw = make_batch(cfg)
    g = torch.Generator().manual_seed(1)
    for k in ("collated_global_crops", "collated_local_crops"):
        raw[k] = torch.randint(0, 256, raw[k].shape, generator=g, dtype=torch.uint8)
    done = dict(raw)
    for k in ("collated_global_crops", "collated_local_crops"):
        done[k] = normalize_uint8(raw[k], cfg.augmentations.mean, cfg.augmentations.std)
    results = []
    for batch in (raw, done):
        model = build(cfg)
        torch.manual_seed(5)  # drop path
        losses = model.forward_backward(batch, teacher_temp=0.04)
        results.append((losses, [p.grad.clone() for p in model.student.parameters() if p.grad is not None]))
    (l_raw, g_raw), (l_done, g_done) = results
    assert all(torch.equal(l_raw[k], l_done[k]) for k in l_raw)
    assert all(torch.equal(a, b) for a, b in zip(g_raw, g_done))

    # the statistics are made once per device, not copied to it at every step
    model = build(cfg)
    first = model._crop_statistics(torch.device("cpu"))
    model.forward_backward(raw, teacher_temp=0.04)
    assert all(a is b for a, b in zip(first, model._crop_statistics(torch.device("cpu"))))

    loader_cfg = tiny_cfg("train.dataset_path=Synthetic:length=8:image_size=48", "train.num_workers=0",
                          "train.batch_size_per_gpu=2")
    batch = next(iter(build_data_loader(loader_cfg, 0, torch.device("cpu"))))
    assert batch["collated_global_crops"].dtype == torch.uint8 and batch["collated_local_crops"].dtype == torch.uint8
