"""Pretraining speed on one GPU, in one process: the tables of docs/performance.md.

Sections (``--sections``, default all):

* ``backbones``: images/s of every backbone and of timm's ViT-S/16 (the reference a user would pick),
  bf16 autocast, train = ``forward_features`` + backward, at the shapes of DINOv2 pretraining.
  Variants in brackets: ``mv_hybrid[einfft=fft]`` (the release's EinFFT), ``mv_hybrid[scan=triton]``.
* ``scan``: the selective scan alone, fwd + bwd, per backend (mamba-ssm CUDA, ours in Triton, chunked
  PyTorch) at MV_Hybrid's and Vim's shapes, fp32 and bf16.
* ``step``: the real DINOv2 step (``SSLMetaArch.forward_backward``, gradient clipping, AdamW, teacher
  EMA) on the paper config per backbone and precision mode, with the FLOP count and MFU.
* ``loader``: the paper config's data loader alone (2 x 256 + 8 x 112 crops), per worker count.
* ``profile``: where the time of an mv_hybrid train step goes (torch.profiler), per EinFFT impl.

Results go to ``<out>/gpu_<date>_<card>_<commit>.{md,json}``.

    python benchmarks/bench_gpu.py                                    # everything
    python benchmarks/bench_gpu.py --sections step --archs mv_hybrid --precisions tf32,bf16
    python benchmarks/bench_gpu.py --device cpu --tiny --sections backbones,step   # smoke run
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import torch
import torch._dynamo
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import mambavision  # noqa: E402
from bench_backbones import CASES, TINY, make_step, measure, tiny_overrides  # noqa: E402
from bench_selective_scan import make_inputs  # noqa: E402
from mambavision.layers import EinFFT  # noqa: E402

SECTIONS = ("backbones", "scan", "step", "loader", "profile")
BACKBONES = ("timm:vit_small_patch16_224,vit_12,mv_hybrid,mv_hybrid[einfft=fft],mv_hybrid[scan=triton],"
             "vit_24,vim_einfft,hydra_einfft,hydra_hybrid")
# (label, batch, dim, length, dstate): MV_Hybrid at 256 and 112 px, Vim (d_inner 768) at 256 px (the issue's
# shapes), and MV_Hybrid at 256 px as its mixer calls the scan, with the tokens padded to a multiple of 8.
SCAN_SHAPES = [("MV_Hybrid 256 px", 64, 384, 257, 16), ("MV_Hybrid 112 px", 512, 384, 50, 16),
               ("Vim 256 px", 64, 768, 257, 16), ("MV_Hybrid 256 px, padded", 64, 384, 264, 16)]
# Precision modes of the trainer, as config overrides.
PRECISIONS = {
    "fp32": ["compute_precision.tf32=false"],  # the trainer as shipped before TF32 was on
    "tf32": ["compute_precision.tf32=true"],  # the default (the release's setting)
    "bf16": ["compute_precision.tf32=true", "compute_precision.autocast_dtype=bf16"],
    "bf16+compile": ["compute_precision.tf32=true", "compute_precision.autocast_dtype=bf16",
                     "compute_precision.compile=true"],
    "bf16+bf16-params": ["compute_precision.tf32=true", "compute_precision.autocast_dtype=bf16"] + [
        f"compute_precision.{r}.{m}.mixed_precision.{k}={v}"
        for r in ("student", "teacher") for m in ("backbone", "dino_head", "ibot_head")
        for k, v in (("param_dtype", "bf16"), ("reduce_dtype", "fp32"))],
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def scan_backend(name):
    old = os.environ.get("MAMBAVISION_SCAN_BACKEND")
    if name:
        os.environ["MAMBAVISION_SCAN_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MAMBAVISION_SCAN_BACKEND", None)
        else:
            os.environ["MAMBAVISION_SCAN_BACKEND"] = old


class TimmAsBackbone(nn.Module):
    """timm ViT behind our contract's ``forward_features`` dict (CLS first, then patches)."""

    def __init__(self, name, img_size, **overrides):
        super().__init__()
        import timm

        self.m = timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size, dynamic_img_size=True,
                                   **overrides)

    def forward_features(self, x):
        t = self.m.forward_features(x)
        return {"x_norm_clstoken": t[:, 0], "x_norm_patchtokens": t[:, 1:]}

    def forward(self, x):
        return self.m(x)


def split_specs(specs):
    """``a,b[k=v,k2=v2],c`` -> the specs, keeping the commas inside brackets."""
    return re.split(r",(?![^\[]*\])", specs)


def build_backbone(spec, tiny):
    """``name`` or ``name[key=value,...]``; keys: einfft (impl), scan (backend), compile (``blocks``: each
    block, as the trainer's ``compute_precision.compile``; ``model``: the whole forward; ``cudagraphs``: the
    whole forward in CUDA graphs, torch.compile's ``reduce-overhead``) and mode (``compile=blocks``' mode, as the
    trainer's ``compute_precision.compile_mode``: ``reduce-overhead`` replays each block as CUDA graphs).
    Returns (model, scan, graphs): graphs is whether a step must call ``cudagraph_mark_step_begin``."""
    m = re.fullmatch(r"([\w:]+)(?:\[(.*)\])?", spec)
    name, opts = m.group(1), dict(kv.split("=") for kv in (m.group(2) or "").split(",") if kv)
    if name.startswith("timm:"):
        model = TimmAsBackbone(name[5:], 256, **(TINY if tiny else {}))
    else:
        model = mambavision.create_model(name, **(tiny_overrides(name) if tiny else {}))
    if "einfft" in opts:
        for mod in model.modules():
            if isinstance(mod, EinFFT):
                mod.impl = opts["einfft"]
    how, mode = opts.get("compile"), opts.get("mode", "default")
    if mode not in ("default", "reduce-overhead") or (mode != "default" and how != "blocks"):
        raise ValueError(f"{spec}: mode must be default or reduce-overhead, and needs compile=blocks")
    if how == "blocks":
        model.compile_blocks(mode=mode)
    elif how in ("model", "cudagraphs"):
        kw = dict(dynamic=False, mode="reduce-overhead" if how == "cudagraphs" else None)
        model.forward_features = torch.compile(model.forward_features, **kw)
        model.forward = torch.compile(model.forward, **kw)
    elif how is not None:
        raise ValueError(f"{spec}: compile must be blocks, model or cudagraphs")
    return model, opts.get("scan"), how == "cudagraphs" or mode == "reduce-overhead"


# -- sections ------------------------------------------------------------------------------------
def bench_backbones(args, device, report):
    cases = [(n, s, max(1, b // 64) if args.tiny else b, t) for n, s, b, t in CASES
             if not args.cases or n in args.cases.split(",")]
    if not cases:
        raise SystemExit(f"--cases {args.cases!r}: none of {[c[0] for c in CASES]}")
    specs = split_specs(args.backbones)
    rows = {}
    for spec in specs:
        torch.manual_seed(0)
        torch._dynamo.reset()  # each row compiles afresh, as in a process of its own (no shared recompile budget)
        model, scan, graphs = build_backbone(spec, args.tiny)
        model = model.to(device)
        with scan_backend(scan):
            rows[spec] = {c[0]: measure(model, c[1], c[2], c[3], device, torch.bfloat16, args.steps, args.warmup,
                                        graphs=graphs) for c in cases}
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"  {spec}: " + ", ".join(f"{k} {v:.0f}" for k, v in rows[spec].items()), flush=True)
    base = "vit_12" if "vit_12" in rows else specs[0]
    lines = [f"Backbones, images/s, bf16 autocast (train = forward_features + backward); (x) = ratio to {base}", "",
             "| model | " + " | ".join(f"{c[0]} (bs {c[2]})" for c in cases) + " |", "|---|" + "---|" * len(cases)]
    for spec in specs:
        lines.append(f"| {spec} | " + " | ".join(
            f"{rows[spec][c[0]]:.0f} ({rows[spec][c[0]] / rows[base][c[0]]:.2f}x)" for c in cases) + " |")
    report.add("backbones", rows, lines)


def _time_ms(fn, device, warmup, reps):
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e3
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


def _kernel_ms(fn, device, reps=5):
    """GPU kernel time per call (torch.profiler: every kernel the call launches, the wrappers' copies included),
    without the host's launch gaps that an eager call's wall time also holds."""
    if device.type != "cuda":
        return float("nan")
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        sync(device)
    return sum(_kernel_times(prof, reps).values())


def bench_scan(args, device, report):
    from mambavision.ops.selective_scan import mamba_ssm_available, selective_scan_fn, triton_scan_available

    backends = [("mamba-ssm CUDA", "cuda", device.type == "cuda" and mamba_ssm_available()),
                ("Triton (ours)", "triton", device.type == "cuda" and triton_scan_available()),
                ("PyTorch chunked", "torch", True)]
    backends = [(label, be) for label, be, ok in backends if ok]
    shapes = [(lab, max(1, b // 32), d // 8, l, n) for lab, b, d, l, n in SCAN_SHAPES] if args.tiny else SCAN_SHAPES
    rows = {}
    for dtn, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for lab, b, d, l, n in shapes:
            inp = make_inputs(l, device, dt, batch=b, dim=d, dstate=n)
            for label, be in backends:
                def step():
                    y = selective_scan_fn(**inp, delta_softplus=True, backend=be)
                    y.backward(torch.ones_like(y))
                rows[f"{lab} | {dtn} | {label}"] = _time_ms(step, device, 3, 5 if args.tiny else 20)
                rows[f"{lab} | {dtn} | {label} | kernels"] = _kernel_ms(step, device)
                for t in inp.values():
                    t.grad = None
    base = backends[0][0]
    lines = [f"Selective scan, fwd + bwd, median ms of an eager call (B, D, L, N) / GPU kernel ms of that call "
             f"(torch.profiler); (x) = relative to {base}", "",
             "| shape | dtype | " + " | ".join(b[0] for b in backends) + " |", "|---|---|" + "---|" * len(backends)]
    for dtn in ("fp32", "bf16"):
        for lab, b, d, l, n in shapes:
            key = f"{lab} | {dtn} | "
            ref, kref = rows[key + base], rows[key + base + " | kernels"]
            cells = [f"{rows[key + label]:.3f} ({rows[key + label] / ref:.2f}x) / "
                     f"{rows[key + label + ' | kernels']:.3f} ({rows[key + label + ' | kernels'] / kref:.2f}x)"
                     for label, _ in backends]
            lines.append(f"| {lab}: {b}, {d}, {l}, {n} | {dtn} | " + " | ".join(cells) + " |")
    report.add("scan", rows, lines)
    if args.scan_configs and ("Triton (ours)", "triton") in backends:
        _sweep_triton(args, device, report, shapes)


def _sweep_triton(args, device, report, shapes):
    """Our kernel's launch configurations (channels per program x chunk length x warps), bf16."""
    from mambavision.ops import selective_scan_triton as sst
    from mambavision.ops.selective_scan import selective_scan_fn

    rows = {}
    configs = args.scan_configs.split(",")
    try:
        for lab, b, d, l, n in shapes:
            inp = make_inputs(l, device, torch.bfloat16, batch=b, dim=d, dstate=n)
            for cfg in configs:
                sst.LAUNCH = tuple(int(v) for v in cfg.split("x"))

                def fwd():
                    with torch.no_grad():
                        selective_scan_fn(**inp, delta_softplus=True, backend="triton")

                def both():
                    y = selective_scan_fn(**inp, delta_softplus=True, backend="triton")
                    y.backward(torch.ones_like(y))

                try:
                    rows[f"{lab} | {cfg}"] = (_time_ms(fwd, device, 3, 20), _time_ms(both, device, 3, 20),
                                              _kernel_ms(fwd, device), _kernel_ms(both, device))
                except Exception as e:  # a configuration the compiler rejects is a row, not the end of the sweep
                    print(f"  {lab} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    rows[f"{lab} | {cfg}"] = (float("nan"),) * 4
    finally:
        sst.LAUNCH = None
    lines = ["Triton scan launch configurations, bf16, median ms of an eager call, forward / forward + backward; "
             "in brackets the GPU kernel ms of the same calls", "",
             "| channels x chunk x warps | " + " | ".join(s[0] for s in shapes) + " |", "|---|" + "---|" * len(shapes)]
    for cfg in configs:
        lines.append(f"| {cfg} | " + " | ".join(
            "{:.3f} / {:.3f} ({:.3f} / {:.3f})".format(*rows[f"{s[0]} | {cfg}"]) for s in shapes) + " |")
    report.add("scan_configs", {k: list(v) for k, v in rows.items()}, lines)


def _synthetic_batch(cfg, seed=0, crops="float"):
    """A collated batch of random crops. ``crops``: ``float`` (already normalised), ``uint8`` (normalised by
    the step, as the trainer's loader ships them) or ``device`` (uint8 plus photometric parameters drawn for
    the config: the step also runs colour jitter, grayscale, blur and solarisation, augmentations.on_device)."""
    from dino.data.collate import collate_data_and_cast
    from dino.data.masking import MaskingGenerator
    from dino.train.train import build_augmentation

    g = torch.Generator().manual_seed(seed)
    G, Lc, nl = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
    aug = build_augmentation(cfg, on_device=True) if crops == "device" else None  # for its parameter draws

    def crop(size):
        if crops == "float":
            return torch.randn(3, size, size, generator=g)
        return torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)

    def sample():
        s = {"global_crops": [crop(G) for _ in range(2)], "local_crops": [crop(Lc) for _ in range(max(nl, 1))]}
        if crops == "device":
            s["global_crops_params"] = [aug.draw_global1(), aug.draw_global2()]
            s["local_crops_params"] = [aug.draw_local() for _ in range(max(nl, 1))]
        return s, ()

    samples = [sample() for _ in range(cfg.train.batch_size_per_gpu)]
    grid = G // cfg.student.patch_size
    return collate_data_and_cast(samples, mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
                                 mask_probability=cfg.ibot.mask_sample_probability, dtype=torch.float32,
                                 n_tokens=grid * grid,
                                 mask_generator=MaskingGenerator((grid, grid), max_num_patches=0.5 * grid * grid))


def _tiny_opts(arch="mv_hybrid"):
    return [f"student.model_kwargs.{k}={v}" for k, v in tiny_overrides(arch).items()] + [
            "crops.global_crops_size=64", "crops.local_crops_size=32", "crops.local_crops_number=2",
            "train.batch_size_per_gpu=4", "dino.head_n_prototypes=256", "ibot.head_n_prototypes=256",
            "dino.head_hidden_dim=128", "ibot.head_hidden_dim=128"]


def _step_row(args, device, peak, arch, mode, adamw="auto", shard=None, compile_mode=None, crops="float"):
    """One DINOv2 step configuration: time, FLOPs, MFU, memory, and whether the losses stayed finite."""
    from dino.configs import build_config
    from dino.train.ssl_meta_arch import SSLMetaArch
    from dino.train.train import build_optimizer, optimizer_step
    from dino.utils.precision import configure_tf32
    from dino.utils.throughput import count_step_flops

    opts = PRECISIONS[mode] + [f"train.batch_size_per_gpu={args.step_batch}"]
    if compile_mode:
        opts.append(f"compute_precision.compile_mode={compile_mode}")
    if shard:
        opts += [f"compute_precision.{r}.{m}.sharding_strategy={shard}"
                 for r in ("student", "teacher") for m in ("backbone", "dino_head", "ibot_head")]
    cfg = build_config(os.path.join(REPO, "configs", "train", f"{arch}.yaml"), opts + (_tiny_opts(arch) if args.tiny else []))
    configure_tf32(cfg.compute_precision.tf32)
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    model.prepare_for_distributed_training(device)
    model.train()
    opt = build_optimizer(cfg, model.get_params_groups())
    if adamw != "auto":  # the trainer's choice (fused on CUDA) against torch's foreach kernels
        for g in opt.param_groups:
            g["fused"], g["foreach"] = adamw == "fused" or None, adamw == "foreach" or None
        opt._step_supports_amp_scaling = adamw == "fused"
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = 1e-4, 0.04
    batch = _synthetic_batch(cfg, crops=crops)
    if device.type == "cuda":
        batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        ld = model.forward_backward(batch, teacher_temp=0.06)
        optimizer_step(cfg, model, opt, model.fp16_scaler)  # as the trainer: unscale, clip, step
        model.update_teacher(0.994)
        losses.append(sum(v.float() for v in ld.values()))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    flops = count_step_flops(cfg, batch)
    ms = _time_ms(step, device, args.warmup, args.steps)
    ips = cfg.train.batch_size_per_gpu / (ms / 1e3)
    fpi = flops / cfg.train.batch_size_per_gpu
    kernels = {}
    if device.type == "cuda":  # is the step bound by the GPU's work or by launching it? kernel time vs wall time
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step()
            sync(device)
        kernels = _kernel_times(prof, 2)
    if device.type == "cuda" and args.trace:  # a timeline of one step, for GPU idle gaps and host syncs
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            sync(device)
        os.makedirs(args.trace, exist_ok=True)
        name = "_".join(str(v) for v in (arch, mode, adamw, shard, compile_mode) if v)  # one file per row
        prof.export_chrome_trace(os.path.join(args.trace, re.sub(r"[^\w]+", "_", name) + ".json"))
    kernel_ms = sum(kernels.values()) if kernels else None
    host = _host_phases(model, opt, step, device)
    return dict(s_per_it=ms / 1e3, images_per_sec=ips, gflop_per_image=fpi / 1e9, kernel_ms=kernel_ms, host_ms=host,
                gpu_busy=kernel_ms / ms if kernel_ms else None, kernel_ms_by_category=kernels,
                tflops=fpi * ips / 1e12, mfu=(fpi * ips / 1e12 / peak) if peak else None,
                peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                finite=bool(torch.isfinite(torch.stack(losses)).all()), first_loss=losses[0].item(),
                last_loss=losses[-1].item())


# The parts of a step whose host time _host_phases reports: (object attribute, label).
HOST_PHASES = (("model._teacher_targets", "teacher fwd"), ("model._center_teacher", "centring"),
               ("model._student_forward", "student fwd"), ("model._losses", "losses"),
               ("torch.Tensor.backward", "backward"), ("fsdp.clip_grad_norm_", "clip"),
               ("scaler.step", "scaler + AdamW"), ("opt.step", "AdamW"), ("model.update_teacher", "EMA"))


def _host_phases(model, opt, step, device, reps=3):
    """Host (CPU) ms per step spent issuing each part of the step, timed without syncing, and the step's
    wall time: where host time ~ wall time the GPU waits for the host. A part that syncs (the grad scaler's
    inf check before a foreach AdamW step) also counts its wait."""
    from dino import fsdp

    spaces = {"model": model, "opt": opt, "fsdp": fsdp, "torch.Tensor": torch.Tensor, "scaler": model.fp16_scaler}
    acc, saved = {}, []
    for path, label in HOST_PHASES:
        space, attr = path.rsplit(".", 1)
        owner = spaces[space]
        if owner is None:
            continue
        fn = getattr(owner, attr)

        def timed(*a, _fn=fn, _label=label, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                acc[_label] = acc.get(_label, 0.0) + time.perf_counter() - t0

        saved.append((owner, attr, owner.__dict__.get(attr) if not isinstance(owner, type) else fn))
        setattr(owner, attr, timed)
    try:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        issued = time.perf_counter() - t0
        sync(device)
        wall = time.perf_counter() - t0
    finally:
        for owner, attr, old in reversed(saved):
            if old is None:
                delattr(owner, attr)  # an instance attribute we added over the class's method
            else:
                setattr(owner, attr, old)
    out = {k: 1e3 * v / reps for k, v in acc.items()}
    out["issued (all)"] = 1e3 * issued / reps
    out["wall"] = 1e3 * wall / reps
    return out


STEP_OPTIONS = {"scan": ("cuda", "triton", "torch"), "adamw": ("fused", "foreach"), "fsdp": ("on", "off"),
                "shard": ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"), "mode": ("default", "reduce-overhead"),
                "crops": ("float", "uint8", "device")}


def parse_step_mode(mode):
    """``bf16+compile[scan=triton,adamw=foreach]`` -> ("bf16+compile", {"scan": "triton", "adamw": "foreach"}).

    Options: a scan backend, the AdamW kernel, one-rank FSDP2, every sub-network's sharding strategy, the
    blocks' torch.compile mode and the crops the step receives (``crops=uint8``: normalised in the step, as from
    the trainer's loader; ``crops=device``: also the photometric augmentation, ``augmentations.on_device``)."""
    m = re.fullmatch(r"([\w+-]+)(?:\[([\w=,-]+)\])?", mode)
    if m is None or m.group(1) not in PRECISIONS:
        raise ValueError(f"step mode {mode!r}: expected one of {list(PRECISIONS)}, optionally with [key=value,...]")
    extra = dict(kv.split("=", 1) if "=" in kv else (kv, "") for kv in m.group(2).split(",")) if m.group(2) else {}
    for k, v in extra.items():
        if v not in STEP_OPTIONS.get(k, ()):
            raise ValueError(f"step mode {mode!r}: option {k}={v} is not one of "
                             + ", ".join(f"{key}={'|'.join(vals)}" for key, vals in STEP_OPTIONS.items()))
    return m.group(1), extra


@contextmanager
def _one_rank_fsdp(mode):
    """``fsdp=on``: wrap the one-GPU run's sub-networks in a one-rank FSDP2 group, as the trainer did up to
    254a456; ``fsdp=off``: plain modules, the trainer's choice now (dino/fsdp)."""
    from dino import distributed, fsdp

    old = fsdp.uses_fsdp
    if mode is not None:
        fsdp.uses_fsdp = distributed.is_enabled if mode == "on" else (lambda: False)
    try:
        yield
    finally:
        fsdp.uses_fsdp = old


def bench_step(args, device, report, peak):
    from dino import distributed

    distributed.enable(use_cuda=device.type == "cuda")  # a one-rank group on CUDA, as the trainer runs
    rows = {}
    for arch in args.archs.split(","):
        for mode in re.split(r",(?![^\[]*\])", args.precisions):  # commas inside brackets are options
            base_mode, extra = parse_step_mode(mode)
            torch._dynamo.reset()  # each row compiles afresh, as the trainer does in its own process
            with scan_backend(extra.get("scan")), _one_rank_fsdp(extra.get("fsdp")):
                rows[f"{arch} | {mode}"] = _step_row(args, device, peak, arch, base_mode, extra.get("adamw", "auto"),
                                                     extra.get("shard"), extra.get("mode"),
                                                     extra.get("crops", "float"))
            print(f"  {arch} {mode}: {rows[f'{arch} | {mode}']}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    lines = [f"DINOv2 step, paper config, batch {args.step_batch} per GPU, one GPU, synthetic "
             f"pre-collated batch (no loader); peak {peak or float('nan'):.0f} TFLOP/s (bf16 matmul, this device)", "",
             "| arch | precision | s/it | images/s | GFLOP/image | TFLOP/s | MFU | kernel ms (GPU busy) "
             "| peak mem GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, r in rows.items():
        arch, mode = k.split(" | ")
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        busy = f"{r['kernel_ms']:.0f} ({100 * r['gpu_busy']:.0f}%)" if r["kernel_ms"] else "-"
        lines.append(f"| {arch} | {mode} | {r['s_per_it']:.3f} | {r['images_per_sec']:.0f} | "
                     f"{r['gflop_per_image']:.0f} | {r['tflops']:.1f} | {mfu} | {busy} | {mem} |")
    lines += ["", "Host ms per step issuing each part (no sync; `issued` is the whole step's host time, `wall` "
              "includes draining the GPU queue)", "",
              "| arch | precision | " + " | ".join(label for _, label in HOST_PHASES) + " | issued | wall |",
              "|---|---|" + "---|" * (len(HOST_PHASES) + 2)]
    for k, r in rows.items():
        h = r["host_ms"]
        cells = [f"{h.get(label, 0.0):.1f}" for _, label in HOST_PHASES] + [f"{h['issued (all)']:.1f}",
                                                                             f"{h['wall']:.1f}"]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    report.add("step", rows, lines)


@contextmanager
def _loader_dataset(spec):
    """``train.dataset_path`` for the loader section. ``PNG:count=N[:image_size=P]`` renders N synthetic tiles into
    a temporary folder of PNG files first, so that the loader decodes files as it would real patches."""
    m = re.fullmatch(r"PNG:count=(\d+)(?::image_size=(\d+))?", spec)
    if m is None:
        yield spec
        return
    from dino.data.datasets import SyntheticDataset

    tiles = SyntheticDataset(length=int(m.group(1)), seed=0, image_size=int(m.group(2) or 256))
    with tempfile.TemporaryDirectory() as root:
        os.makedirs(os.path.join(root, "tiles"))
        for i in range(len(tiles)):
            tiles[i][0].save(os.path.join(root, "tiles", f"{i:06d}.png"))
        yield f"Folder:root={root}"


def bench_loader(args, device, report):
    with _loader_dataset(args.loader_dataset) as dataset_path:
        _bench_loader(args, device, report, dataset_path)


def _bench_loader(args, device, report, dataset_path):
    from dino.configs import build_config
    from dino.train.train import build_data_loader

    rows = {}
    for workers in [int(w) for w in args.workers.split(",")]:
        opts = [f"train.num_workers={workers}", f"train.dataset_path={dataset_path}",
                f"train.batch_size_per_gpu={args.step_batch}"] + (_tiny_opts() if args.tiny else []) + \
            [o for o in args.loader_options.split(",") if o]
        cfg = build_config(os.path.join(REPO, "configs", "train", "mv_hybrid.yaml"), opts)
        it = iter(build_data_loader(cfg, 0, device))
        n_warm, n = (2, 4) if args.tiny else (max(5, workers), 40)
        for _ in range(n_warm):
            next(it)
        t0 = time.perf_counter()
        for _ in range(n):
            next(it)
        rows[f"{workers} workers"] = cfg.train.batch_size_per_gpu * n / (time.perf_counter() - t0)
        del it
        print(f"  loader {workers} workers: {rows[f'{workers} workers']:.0f} images/s", flush=True)
    lines = [f"Data loader alone, paper config ({args.loader_dataset}, 2 x 256 + 8 x 112 crops, batch {args.step_batch}"
             f"{', ' + args.loader_options if args.loader_options else ''}), {os.cpu_count()} CPU cores", "",
             "| workers | images/s |", "|---|---|"]
    lines += [f"| {k.split()[0]} | {v:.0f} |" for k, v in rows.items()]
    report.add("loader", rows, lines)


def _category(name):
    n = name.lower()
    for cat, keys in (("FFT (cuFFT)", ("fft", "bluestein")), ("selective scan", ("selective_scan", "scan_fwd", "scan_bwd", "_scan")),
                      ("matmul (GEMM)", ("gemm", "sm90", "cutlass", "ampere", "mm_", "matmul", "xmma", "nvjet")),
                      ("attention", ("flash", "fmha", "attention", "efficient")),
                      ("copy / cast", ("copy", "cast", "convert")),
                      ("norm", ("norm",)), ("conv1d", ("conv",))):
        if any(k in n for k in keys):
            return cat
    return "elementwise / other"


def _kernel_times(prof, steps):
    """GPU kernel ms per step by category, from a torch.profiler run over ``steps`` steps."""
    cats = {}
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None)
        if t is None:
            t = getattr(ev, "self_cuda_time_total", 0.0)
        if t <= 0 or ev.key.startswith("aten::") or ev.key.startswith("cuda"):
            continue  # kernels only (CPU-side ops also carry device time totals)
        cats[_category(ev.key)] = cats.get(_category(ev.key), 0.0) + t / steps / 1e3
    return cats


def bench_profile(args, device, report):
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        print("  profile: CUDA only, skipped")
        return
    rows, lines = {}, []
    batch = 8 if args.tiny else 64
    x = torch.randn(batch, 3, 256, 256, device=device)
    for spec in split_specs(args.profile):
        model, scan, graphs = build_backbone(spec, args.tiny)
        model = model.to(device).train()
        step = make_step(model, x, True, torch.bfloat16, graphs)
        with scan_backend(scan):
            for _ in range(3):
                step()
            wall_ms = _time_ms(step, device, 1, 5)  # the step as a user sees it, launch gaps included
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step()
                sync(device)
        cats = _kernel_times(prof, 3)
        total = sum(cats.values())
        rows[spec] = {"ms_per_step": total, "wall_ms_per_step": wall_ms, **{k: v / total for k, v in cats.items()}}
        top = sorted(((getattr(e, "self_device_time_total", 0.0), e.key) for e in prof.key_averages()
                      if not e.key.startswith("aten::")), reverse=True)[:8]
        rows[spec]["top_kernels"] = [(k[:90], t / 3 / 1e3) for t, k in top]
        model = None
    skip = ("ms_per_step", "wall_ms_per_step", "top_kernels")
    cats = sorted({c for r in rows.values() for c in r if c not in skip})
    lines = [f"Train step (forward_features + backward, bs {batch}, 256 px, bf16 autocast): GPU kernel time "
             "by category (torch.profiler), and the step's wall time", "", "| category | " + " | ".join(rows) + " |",
             "|---|" + "---|" * len(rows)]
    lines += [f"| {c} | " + " | ".join(f"{100 * r.get(c, 0):.1f}%" for r in rows.values()) + " |" for c in cats]
    lines.append("| **kernel ms / step** | " + " | ".join(f"{r['ms_per_step']:.1f}" for r in rows.values()) + " |")
    lines.append("| **wall ms / step** | " + " | ".join(f"{r['wall_ms_per_step']:.1f}" for r in rows.values()) + " |")
    for spec, r in rows.items():
        lines += ["", f"Top kernels, {spec} (ms / step):"] + [f"- {t:.2f} ms  `{k}`" for k, t in r["top_kernels"]]
    report.add("profile", rows, lines)


class Report:
    def __init__(self):
        self.data, self.lines = {}, []

    def add(self, name, rows, lines):
        self.data[name] = rows
        self.lines += ["", f"## {name}", ""] + lines
        print("\n".join(["", *lines]), flush=True)


def _commit():
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbones", default=BACKBONES)
    p.add_argument("--cases", default="", help="backbones section: a subset of " + ",".join(c[0] for c in CASES))
    p.add_argument("--archs", default="mv_hybrid,vit_12", help="backbones for the step section")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help=f"subset of {list(PRECISIONS)}")
    p.add_argument("--step-batch", type=int, default=64, help="batch per GPU for step and loader (paper: 64)")
    p.add_argument("--workers", default="8,15", help="loader worker counts")
    p.add_argument("--loader-options", default="",
                   help="comma-separated config overrides of the loader section, e.g. augmentations.on_device=true "
                        "(workers only crop and flip)")
    p.add_argument("--loader-dataset", default="Synthetic:length=100000:image_size=256",
                   help="train.dataset_path of the loader section, e.g. Folder:root=/data/patches for real patches, "
                        "or PNG:count=N (N synthetic tiles saved as PNG files first)")
    p.add_argument("--scan-configs", default="2x32x2,2x32x4,4x32x4,4x16x4,2x64x2,2x64x4,4x64x4,8x16x4,8x32x4",
                   help="Triton scan launch configurations to sweep (channels x chunk x warps); '' to skip")
    p.add_argument("--profile", default="mv_hybrid[einfft=fft],mv_hybrid,mv_hybrid[scan=triton],vit_12",
                   help="backbone specs (as in --backbones) whose train step the profile section breaks down")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--trace", default="", help="step section: write a chrome trace of one step per row here")
    p.add_argument("--tiny", action="store_true", help="tiny models and batches (CPU smoke run)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    wanted = args.sections.split(",")
    bad = [s for s in wanted if s not in SECTIONS]
    if bad:
        p.error(f"unknown sections {bad}; choose from {SECTIONS}")
    from dino.utils.throughput import measure_peak_tflops

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = measure_peak_tflops(device)
    report = Report()
    head = (f"# GPU benchmark: {card}, torch {torch.__version__}, commit {_commit()}, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    head += f"\n\nbf16 matmul peak (8192^3, this device): {peak:.0f} TFLOP/s" if peak else ""
    print(head, flush=True)
    report.lines.append(head)
    for s in SECTIONS:
        if s in wanted:
            print(f"\n[{s}]", flush=True)
            if s == "step":
                bench_step(args, device, report, peak)
            else:
                globals()[f"bench_{s}"](args, device, report)
    os.makedirs(args.out, exist_ok=True)
    stem = f"gpu_{datetime.date.today():%Y%m%d}_{re.sub(r'[^A-Za-z0-9]+', '-', card)}_{re.sub(r'[^A-Za-z0-9]+', '', _commit())}"
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write("\n".join(report.lines) + "\n")
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"card": card, "torch": torch.__version__, "commit": _commit(), "peak_tflops": peak,
                   "sections": report.data}, f, indent=1, default=str)
    print(f"\nsaved {os.path.join(args.out, stem)}.{{md,json}}")


if __name__ == "__main__":
    main()
