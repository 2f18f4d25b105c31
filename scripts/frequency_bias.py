#!/usr/bin/env python
"""Frequency bias of SSM mixers: the paper's claim that negative-real eigenvalues (S4D-Real) act as
low-pass filters over the token sequence, made measurable.

Two sources of SSM parameters:

* an initialisation only (default): ``--init s4d-real s4d-lin``, d_state 16, Mamba's log-uniform
  step sizes in [1e-3, 0.1], ``B = C = 1`` (or ``--bc random``: standard normal);
* a backbone: ``--model mv_hybrid`` (fresh, ``--model-arg key=value`` overrides) or
  ``--checkpoint ckpt.pth [--model NAME]`` (via ``mambavision.load_pretrained``). Every module
  with ``A_log`` is analysed with unit B, C and ``delta = softplus(k * dt bias)`` (see
  :mod:`eval.frequency_bias`), next to the same layer with S4D-Lin eigenvalues. With
  ``--delta-source images --image-dir DIR`` the Mamba-1 layers use delta, B and C averaged over
  the tokens of those images instead (Mamba-2/Hydra layers keep the bias-only step).

Writes ``frequency_bias.json`` / ``.md`` and ``frequency_bias.png`` (mean |H(w)|, log-y, and the
per-layer low-frequency energy). The maths lives in :mod:`eval.frequency_bias`.

    python scripts/frequency_bias.py --out-dir out/freq
    python scripts/frequency_bias.py --checkpoint teacher_checkpoint.pth --model mv_hybrid --out-dir out/freq_mv
"""
import argparse
import os
from typing import Dict, List

import numpy as np
import torch

from eval.common import HE_MEAN, HE_STD, LOG, add_common_args, save_figure, set_seed, setup_logging, write_report
from eval.frequency_bias import SSMParams, analyze, counterfactual, data_driven_params, mamba_dt_init, s4d_init, scan_model

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def _model_kwargs(pairs: List[str]) -> Dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--model-arg expects key=value, got {pair!r}")
        k, v = pair.split("=", 1)
        out[k] = _parse_value(v)
    return out


def _build_model(args):
    import mambavision

    kwargs = _model_kwargs(args.model_arg)
    if args.checkpoint:
        return mambavision.load_pretrained(args.checkpoint, args.model, **kwargs)
    return mambavision.create_model(args.model, **kwargs).eval()


def _image_batches(image_dir: str, img_size: int, max_images: int, batch_size: int, device):
    """H&E-normalised image batches from ``image_dir`` (unreadable files are skipped and counted)."""
    from PIL import Image

    if not os.path.isdir(image_dir):
        raise SystemExit(f"--image-dir not found: {image_dir}")
    files = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_EXTS))[:max_images]
    mean = torch.tensor(HE_MEAN).view(3, 1, 1)
    std = torch.tensor(HE_STD).view(3, 1, 1)
    imgs, bad = [], 0
    for f in files:
        try:
            with Image.open(os.path.join(image_dir, f)) as im:
                arr = np.asarray(im.convert("RGB").resize((img_size, img_size), Image.BILINEAR), dtype=np.float32) / 255.0
        except (OSError, ValueError) as e:
            bad += 1
            LOG.warning("skipping unreadable image %s: %s", f, e)
            continue
        imgs.append((torch.from_numpy(arr).permute(2, 0, 1) - mean) / std)
    if bad:
        LOG.warning("%d of %d images could not be read", bad, len(files))
    if not imgs:
        raise SystemExit(f"no readable image ({', '.join(IMAGE_EXTS)}) in {image_dir}")
    x = torch.stack(imgs)
    return [x[i:i + batch_size].to(device) for i in range(0, len(x), batch_size)], len(imgs)


def _plot(curves: Dict[str, np.ndarray], layers: List[Dict], path: str, cutoff: float) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, h in curves.items():
        axes[0].semilogy(np.linspace(0, 1, len(h)), h, label=label)
    axes[0].axvspan(0, cutoff, color="grey", alpha=0.15, label=f"lowest {cutoff:.0%}")
    axes[0].set(xlabel="frequency ω/π", ylabel="mean normalised |H(ω)|", title="SSM transfer function")
    axes[0].legend(fontsize=7)
    groups: Dict[str, List[float]] = {}
    for r in layers:
        groups.setdefault(r["source"], []).append(r["low_freq_energy"])
    width = 0.8 / max(1, len(groups))
    n_layers = max(len(v) for v in groups.values())
    for j, (src, vals) in enumerate(groups.items()):
        axes[1].bar(np.arange(len(vals)) + j * width, vals, width, label=src)
    axes[1].set_xticks(np.arange(n_layers) + width * (len(groups) - 1) / 2, [str(i) for i in range(n_layers)])
    axes[1].set(xlabel="SSM layer (in module order)", ylabel=f"energy fraction below {cutoff:.0%} of band", ylim=(0, 1),
                title="low-frequency energy per layer")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", nargs="+", choices=["s4d-real", "s4d-lin"], default=["s4d-real", "s4d-lin"],
                   help="initialisations to analyse when no model is given")
    p.add_argument("--model", help="registry name (mambavision.list_models()); with --checkpoint: its architecture")
    p.add_argument("--checkpoint", help="checkpoint for mambavision.load_pretrained")
    p.add_argument("--model-arg", action="append", default=[], help="create_model override key=value (repeatable)")
    p.add_argument("--delta-source", choices=["bias", "images"], default="bias",
                   help="model layers: delta = softplus(k * dt bias) with B=C=1, or averages over --image-dir")
    p.add_argument("--image-dir", help="images (png/jpg/tif) for --delta-source images")
    p.add_argument("--img-size", type=int, default=256, help="images are resized to this square size")
    p.add_argument("--max-images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--d-model", type=int, default=384, help="channels for --init")
    p.add_argument("--d-state", type=int, default=16, help="states per channel for --init")
    p.add_argument("--dt-min", type=float, default=1e-3)
    p.add_argument("--dt-max", type=float, default=0.1)
    p.add_argument("--bc", choices=["ones", "random"], default="ones", help="B and C for --init")
    p.add_argument("--seq-len", type=int, default=257, help="kernel length L (256 patches + CLS at 256 px / 16)")
    p.add_argument("--method", choices=["zoh", "euler"], default="zoh", help="discretisation of B")
    p.add_argument("--cutoff", type=float, default=0.1, help="low-frequency band: this fraction of [0, pi]")
    add_common_args(p, default_out="eval_out/frequency_bias")
    return p


def main(argv=None) -> Dict:
    args = build_parser().parse_args(argv)
    setup_logging()
    set_seed(args.seed)
    if not 0 < args.cutoff < 1:
        raise SystemExit(f"--cutoff must be in (0, 1), got {args.cutoff}")
    kw = dict(L=args.seq_len, method=args.method, cutoff=args.cutoff)
    layers: List[Dict] = []
    curves: Dict[str, np.ndarray] = {}
    if args.model or args.checkpoint:
        model = _build_model(args)
        ssms = [(p, None, None) for p in scan_model(model)]
        if not ssms:
            raise SystemExit(f"model {args.model or args.checkpoint!r} has no SSM (no module with A_log) to analyse")
        n_images = 0
        if args.delta_source == "images":
            if not args.image_dir:
                raise SystemExit("--delta-source images needs --image-dir")
            device = next(model.parameters()).device
            batches, n_images = _image_batches(args.image_dir, args.img_size, args.max_images, args.batch_size, device)
            measured = {p.name: (p, B, C) for p, B, C in data_driven_params(model, batches)}
            ssms = [measured.get(p.name, (p, B, C)) for p, B, C in ssms]
        for p, B, C in ssms:
            origin = "images" if B is not None else "bias, B=C=1"
            for src, q in (("model", p), ("same Δ, S4D-Lin A", counterfactual(p, "s4d-lin"))):
                layers.append({"source": src, "delta_from": origin, **analyze(q, B=B, C=C, **kw)})
        source = (args.checkpoint or f"fresh {args.model}") + (f", {n_images} images" if n_images else "")
    else:
        g = torch.Generator().manual_seed(args.seed)
        delta = mamba_dt_init(args.d_model, args.dt_min, args.dt_max, generator=g)
        shape = (args.d_model, args.d_state)
        if args.bc == "random":
            B, C = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
        else:
            B = C = torch.ones(shape, dtype=torch.float64)
        for init in args.init:
            p = SSMParams(init, s4d_init(init, *shape), delta, "init")
            layers.append({"source": init, **analyze(p, B=B, C=C, **kw)})
        source = "initialisation"
    for src in dict.fromkeys(r["source"] for r in layers):
        curves[src] = np.mean([r["mean_H"].numpy() for r in layers if r["source"] == src], axis=0)
    os.makedirs(args.out_dir, exist_ok=True)
    plot = _plot(curves, layers, os.path.join(args.out_dir, "frequency_bias.png"), args.cutoff)
    metrics = ("low_freq_energy", "centroid", "total_variation")
    rows = [{"source": r["source"], "layer": r["name"], "Δ from": r.get("delta_from", "Mamba dt init"), "Δ mean": r["delta_mean"],
             **{m: r[m] for m in metrics}} for r in layers]
    summary = {src: {m: float(np.mean([r[m] for r in layers if r["source"] == src])) for m in metrics} for src in curves}
    results = {"source": source, "args": vars(args), "summary": summary, "plots": [plot],
               "layers": [{k: v for k, v in r.items() if k != "mean_H"} for r in layers],
               "mean_H": {k: v.tolist() for k, v in curves.items()}}
    notes = [f"Kernel length L={args.seq_len}, {args.method} discretisation, unit B=C unless --bc random.",
             f"low_freq_energy: share of |H|^2 in the lowest {args.cutoff:.0%} of [0, π]; centroid in units of π; "
             "total_variation of |H|/max|H| (1 = monotone low-pass).",
             "Model layers (delta_from = 'bias, B=C=1') use delta = softplus(k * dt bias) (k = 2 for MambaVision's mixer); "
             "'images' layers use delta, B and C averaged over the tokens of the given images."]
    write_report(args.out_dir, "frequency_bias", results, rows, title=f"SSM frequency bias ({source})", notes=notes)
    return results


if __name__ == "__main__":
    main()
