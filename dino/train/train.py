"""DINOv2 self-supervised training: ``python -m dino.train --config-file F --output-dir D [key=value ...]``.

Reliability beyond upstream DINOv2:

* exact resume from ``<output_dir>/checkpoint.pth`` (model, optimiser, scaler, loss centres, RNG
  states, and the sampler position, which is a pure function of the iteration);
* atomic checkpoints that do not depend on the world size;
* a NaN/inf loss stops the run with :class:`NonFiniteLossError` naming the iteration, before the
  optimiser step, and the newest kept checkpoint (``train.keep_checkpoints``) that precedes the
  divergence; a non-finite state is never saved;
* SIGUSR1/SIGUSR2/SIGTERM (SLURM pre-emption) or :func:`request_preemption` finish the current
  iteration, save a resumable checkpoint and return (DataLoader workers ignore these signals); after a
  time-limit signal (USR1/USR2) rank 0 requeues the SLURM job (:mod:`dino.utils.preemption`, the one
  requeue path of the sbatch script and of submitit);
* one run per output dir (:mod:`dino.utils.run_lock`); stale temporary files are removed at start,
  ``--no-resume`` moves an earlier run aside (:mod:`dino.utils.run_dir`); ``config.yaml`` is written
  once the checkpoint is known to fit (:mod:`dino.utils.resume_checks`);
* unreadable samples are replaced and budgeted (:mod:`dino.data.unreadable`).
"""
import argparse
import logging
import math
import os
import time
from functools import partial
from typing import Dict

import torch

from dino import distributed, fsdp
from dino.configs.config import ConfigError, config_to_yaml, setup, write_config
from dino.data.loaders import make_data_loader, make_dataset
from dino.data.unreadable import UnreadableBudget
from dino.train.ssl_meta_arch import SSLMetaArch, backbone_config
from dino.utils.checkpoint import (
    describe_last_healthy,
    forget_checkpoints_after,
    load_checkpoint,
    load_file,
    load_model_weights,
    resume_path,
    restore_rng_state,
    saved_rng_state,
    save_checkpoint,
    save_teacher_checkpoint,
)
from dino.utils.logging import MetricsWriter
from dino.utils import preemption
from dino.utils.preemption import preemption_requested, request_preemption  # noqa: F401  (public here)
from dino.utils.precision import configure_tf32
from dino.utils.resume_checks import check_resume
from dino.utils.run_dir import prepare_output_dir
from dino.utils.throughput import Throughput, count_step_flops, measure_peak_tflops
from dino.utils.schedules import CosineScheduler

logger = logging.getLogger("dino")


class NonFiniteLossError(FloatingPointError):
    """A loss was NaN or inf; the run stopped without taking the optimiser step."""


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("python -m dino.train", description="DINOv2 SSL training", add_help=add_help)
    parser.add_argument("--config-file", default="", metavar="FILE", help="experiment yaml over configs/ssl_default.yaml")
    parser.add_argument("--output-dir", "--output_dir", default="", help="logs and checkpoints (default: train.output_dir)")
    parser.add_argument("--no-resume", action="store_true",
                        help="start from scratch; an earlier run in the output dir is moved to previous_runs/")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides as key=value (e.g. optim.epochs=10)")
    return parser


# -- optimisation ------------------------------------------------------------------------------
class AdamW(torch.optim.AdamW):
    """torch's AdamW, taking FSDP's sharded grad scaler on the fused kernel too.

    Given a fused optimizer, a grad scaler hands it the inf flag as ``optimizer.found_inf`` instead of
    syncing on it; ``ShardedGradScaler``'s flag has shape (1,), which the fused step cannot subtract from
    its 0-dim step counts (torch 2.11-2.14), so it is viewed as a scalar first."""

    def step(self, closure=None):
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and found_inf.dim():
            self.found_inf = found_inf.reshape(())
        return super().step(closure)


def build_optimizer(cfg, params_groups):
    """AdamW; on CUDA torch's fused kernel, the same update: one launch per group where the foreach
    version issues a dozen (the step is bound by the host), and it reads the grad scaler's inf flag on
    the GPU, so a scaled step does not sync."""
    groups = list(params_groups)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return AdamW(groups, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2), fused=True if on_cuda else None)


def build_schedulers(cfg) -> Dict[str, CosineScheduler]:
    """Per-iteration schedules; one epoch is ``train.OFFICIAL_EPOCH_LENGTH`` iterations."""
    epoch = cfg.train.OFFICIAL_EPOCH_LENGTH
    total = cfg.optim.epochs * epoch
    lr = dict(base_value=cfg.optim.lr, final_value=cfg.optim.min_lr, total_iters=total,
              warmup_iters=cfg.optim.warmup_epochs * epoch, start_warmup_value=0)
    last_layer_lr = CosineScheduler(**lr)
    last_layer_lr.schedule[: cfg.optim.freeze_last_layer_epochs * epoch] = 0  # prototypes frozen at first
    warm_temp = cfg.teacher.warmup_teacher_temp_epochs * epoch
    return {
        "lr": CosineScheduler(**lr),
        "wd": CosineScheduler(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total),
        "mom": CosineScheduler(cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher, total),
        "teacher_temp": CosineScheduler(cfg.teacher.teacher_temp, cfg.teacher.teacher_temp, warm_temp,
                                        warmup_iters=warm_temp, start_warmup_value=cfg.teacher.warmup_teacher_temp),
        "last_layer_lr": last_layer_lr,
    }


def apply_optim_scheduler(optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    for g in optimizer.param_groups:
        g["weight_decay"] = wd * g["wd_multiplier"]
        g["lr"] = (last_layer_lr if g["is_last_layer"] else lr) * g["lr_multiplier"]


def optimizer_step(cfg, model, optimizer, scaler) -> None:
    """Gradient clipping per student sub-network, then the (loss-scaled under fp16) AdamW step."""
    if scaler is not None and cfg.optim.clip_grad:
        scaler.unscale_(optimizer)
    if cfg.optim.clip_grad:
        for m in model.student.values():
            fsdp.clip_grad_norm_(m, cfg.optim.clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


# -- data --------------------------------------------------------------------------------------
def build_augmentation(cfg, on_device=None):
    """The config's ``DataAugmentationDINO``, shipping uint8 crops; ``on_device`` overrides
    ``augmentations.on_device``."""
    from dino.data.augmentations import DataAugmentationDINO

    aug = cfg.augmentations
    return DataAugmentationDINO(
        tuple(cfg.crops.global_crops_scale),
        tuple(cfg.crops.local_crops_scale),
        cfg.crops.local_crops_number,
        global_crops_size=cfg.crops.global_crops_size,
        local_crops_size=cfg.crops.local_crops_size,
        mean=tuple(aug.mean),
        std=tuple(aug.std),
        solarization=bool(aug.solarization),
        color_jitter=tuple(aug.color_jitter),
        global1_blur_p=aug.global1_blur_p,
        global2_blur_p=aug.global2_blur_p,
        local_blur_p=aug.local_blur_p,
        normalize=False,  # uint8 crops; SSLMetaArch normalises them on the device (a quarter of the bytes)
        photometric_on_device=bool(aug.on_device if on_device is None else on_device),
    )


def build_data_loader(cfg, start_iter: int, device: torch.device):
    from dino.data.collate import collate_data_and_cast
    from dino.data.masking import MaskingGenerator

    transform = build_augmentation(cfg)
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    mask_generator = MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid)
    collate_fn = partial(
        collate_data_and_cast,
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
        n_tokens=grid * grid,
        mask_generator=mask_generator,
        dtype=torch.float32,  # the FSDP2 mixed-precision policy casts inputs on GPU
    )
    dataset = make_dataset(cfg.train.dataset_path, transform=transform)
    return make_data_loader(
        dataset,
        cfg.train.batch_size_per_gpu,
        num_workers=cfg.train.num_workers,
        seed=cfg.train.seed,
        start_iteration=start_iter,
        rank=distributed.get_global_rank(),
        world_size=distributed.get_global_size(),
        collate_fn=collate_fn,
        pin_memory=device.type == "cuda",
    )


# -- checkpoints -------------------------------------------------------------------------------
def _load_initial_weights(model: SSLMetaArch, path: str) -> None:
    """``MODEL.WEIGHTS``: a training checkpoint, or a teacher checkpoint loaded into both networks."""
    ckpt = load_file(path)
    if isinstance(ckpt.get("model"), dict):
        load_model_weights(model, ckpt["model"])
    elif isinstance(ckpt.get("teacher"), dict):
        load_model_weights(model.teacher, ckpt["teacher"])
        load_model_weights(model.student, ckpt["teacher"])
    else:
        raise KeyError(f"MODEL.WEIGHTS={path}: expected a 'model' (training) or 'teacher' checkpoint")
    logger.info("initial weights from %s", path)


def do_test(cfg, model: SSLMetaArch, iteration: int) -> str:
    """Teacher checkpoint for evaluation: ``<output_dir>/eval/training_<iteration>/teacher_checkpoint.pth``."""
    path = os.path.join(cfg.train.output_dir, "eval", f"training_{iteration}", "teacher_checkpoint.pth")
    save_teacher_checkpoint(path, model, backbone_config(cfg))
    return path


# -- loop --------------------------------------------------------------------------------------
def do_train(cfg, model: SSLMetaArch, resume: bool = True) -> Dict:
    """Train ``model`` (already prepared for distributed training) as configured.

    Returns ``{"iteration": last completed iteration, "preempted": bool, "metrics": last values}``.
    """
    out_dir = cfg.train.output_dir
    device = model.device
    model.train()
    optimizer = build_optimizer(cfg, model.get_params_groups())
    scaler = model.fp16_scaler
    schedules = build_schedulers(cfg)
    max_iter = cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH
    extra = {"config": config_to_yaml(cfg), "backbone_config": backbone_config(cfg),
             "batch_size_per_gpu": cfg.train.batch_size_per_gpu}

    start_iter, rng_state = 0, None
    ckpt_path = os.path.join(out_dir, "checkpoint.pth")
    found = resume_path(out_dir) if resume else None
    if found:
        world = distributed.get_global_size()
        ckpt = load_checkpoint(found, model, optimizer, scaler, restore_rng=False,
                               check=lambda c: check_resume(c, cfg, found, world))
        start_iter = ckpt["iteration"] + 1
        extra["unreadable_samples"] = int(ckpt.get("unreadable_samples", 0))
        if distributed.is_main_process():
            forget_checkpoints_after(out_dir, ckpt["iteration"])
        rng_state = saved_rng_state(ckpt)
        logger.info("resuming from %s at iteration %d", found, start_iter)
    elif cfg.MODEL.WEIGHTS:
        _load_initial_weights(model, cfg.MODEL.WEIGHTS)
    if distributed.is_main_process():
        write_config(cfg, out_dir)  # only now: the run is locked and the checkpoint fits

    writer = MetricsWriter(out_dir, enabled=distributed.is_main_process())
    speed = Throughput(cfg.train.batch_size_per_gpu, distributed.get_global_size(),
                       cfg.train.peak_tflops or measure_peak_tflops(device))
    writer.truncate_from(start_iter)
    data_loader = build_data_loader(cfg, start_iter, device)
    unreadable = UnreadableBudget(cfg.train.max_unreadable_fraction, len(data_loader.dataset),
                                  cfg.train.batch_size_per_gpu * distributed.get_global_size(),
                                  extra.get("unreadable_samples", 0))
    if rng_state is not None:
        restore_rng_state(rng_state)  # last, so nothing above shifts the streams

    iteration, preempted, values = start_iter - 1, False, {}
    if start_iter < max_iter:
        logger.info("training iterations %d..%d", start_iter, max_iter - 1)
    else:
        logger.info("training already complete (%d iterations); checking the final teacher checkpoint", max_iter)
    try:
        data_iter = iter(data_loader)
        for iteration in range(start_iter, max_iter):
            waited = time.perf_counter()
            data = next(data_iter)
            writer.waited_for_data(time.perf_counter() - waited)
            # Python floats: numpy scalars would end up in the optimiser state and the checkpoint.
            lr, wd = float(schedules["lr"][iteration]), float(schedules["wd"][iteration])
            mom, teacher_temp = float(schedules["mom"][iteration]), float(schedules["teacher_temp"][iteration])
            last_layer_lr = float(schedules["last_layer_lr"][iteration])
            apply_optim_scheduler(optimizer, lr, wd, last_layer_lr)

            optimizer.zero_grad(set_to_none=True)
            if iteration == start_iter:  # once per process, on a meta copy: the real step is untouched
                speed.set_step_flops(count_step_flops(cfg, data))
            loss_dict = model.forward_backward(data, teacher_temp=teacher_temp)

            # Mean losses over ranks and the pre-emption flag, in one message.
            names = sorted(loss_dict)
            stats = torch.stack([loss_dict[k].float() for k in names] + [
                data["unreadable"].to(device=device, dtype=torch.float32), torch.tensor(float(preemption_requested()), device=device)])
            if distributed.get_global_size() > 1:
                torch.distributed.all_reduce(stats)
            stats = stats.cpu().tolist()
            world = distributed.get_global_size()
            losses = {k: v / world for k, v in zip(names, stats[:-2])}
            stop = stats[-1] > 0
            extra["unreadable_samples"] = unreadable.update(int(stats[-2]), iteration)
            total_loss = sum(losses.values())
            if not math.isfinite(total_loss):
                raise NonFiniteLossError(
                    f"non-finite loss at iteration {iteration}: "
                    + ", ".join(f"{k}={v}" for k, v in losses.items())
                    + ". Stopped before the optimiser step; "
                    + describe_last_healthy(out_dir, iteration)
                )

            optimizer_step(cfg, model, optimizer, scaler)
            model.update_teacher(mom)

            writer.tick()
            values = dict(lr=lr, wd=wd, mom=mom, last_layer_lr=last_layer_lr, teacher_temp=teacher_temp,
                          current_batch_size=int(data["collated_global_crops"].shape[0] // 2),
                          total_loss=total_loss, **losses)
            writer.update(**values)
            if (iteration + 1) % cfg.train.log_freq == 0 or iteration == start_iter or iteration + 1 == max_iter or stop:
                writer.write(iteration, max_iter, {**values, **speed.values(writer.iter_time)})

            if cfg.evaluation.eval_period_iterations > 0 and (iteration + 1) % cfg.evaluation.eval_period_iterations == 0:
                do_test(cfg, model, iteration)
            if (iteration + 1) % cfg.train.saveckp_freq == 0 or iteration + 1 == max_iter or stop:
                save_checkpoint(ckpt_path, model, optimizer, scaler, iteration, extra, keep=cfg.train.keep_checkpoints)
            if stop:
                preempted = True
                logger.warning("pre-emption requested: saved %s at iteration %d, exiting", ckpt_path, iteration)
                break
        else:
            # The final teacher, for evaluation; also written by a rerun after a kill during this save.
            final = os.path.join(out_dir, "eval", f"training_{max_iter - 1}", "teacher_checkpoint.pth")
            if not distributed.all_gather_object(os.path.isfile(final))[0]:
                do_test(cfg, model, max_iter - 1)
    finally:
        writer.close()
    return {"iteration": iteration, "preempted": preempted, "metrics": values}


def main(argv=None) -> Dict:
    args = get_args_parser().parse_args(argv)
    cfg = setup(args)
    if not cfg.train.dataset_path:  # no silent fallback to synthetic tissue
        raise ConfigError("train.dataset_path is not set: pass train.dataset_path=Folder:root=DIR (or "
                          "WSICoords:slides=DIR:coords=DIR; Synthetic for a demo)")
    fresh = args.no_resume
    if fresh and preemption.is_requeued_run():  # --no-resume was meant for the first start, not a requeue
        logger.warning("requeued SLURM job (restart %s): resuming, --no-resume applies to the first start only",
                       os.environ["SLURM_RESTART_COUNT"])
        fresh = False
    lock = None
    preemption.clear()
    previous_handlers = preemption.install_handlers()  # for setup too: a signal then stops at the first iteration
    try:
        lock = prepare_output_dir(cfg.train.output_dir, fresh=fresh)  # one run per output dir
        logger.info("config:\n%s", config_to_yaml(cfg))
        configure_tf32(cfg.compute_precision.tf32)
        # Same initial weights on every rank; rank-specific streams afterwards (DINOv2: seed + rank).
        distributed.fix_random_seeds(cfg.train.seed)
        model = SSLMetaArch(cfg)
        model.prepare_for_distributed_training(distributed.get_device())
        distributed.fix_random_seeds(distributed.seed_for_rank(cfg.train.seed))
        rank0 = distributed.is_main_process()
        result = do_train(cfg, model, resume=not fresh)
    finally:
        preemption.restore_handlers(previous_handlers)
        if lock is not None:
            lock.release()
        distributed.disable()
    # After the collective save and with the output dir released: the requeued job may start at once.
    result["requeued"] = bool(result["preempted"] and preemption.requeue_requested() and rank0
                              and preemption.requeue_slurm_job())
    return result
