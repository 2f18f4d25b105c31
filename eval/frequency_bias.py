"""Frequency response of diagonal SSM mixers: why negative-real (S4D-Real) eigenvalues favour low frequencies.

For one channel with diagonal state matrix ``A`` (n states), step ``delta`` and input/output
vectors ``B``, ``C``, the discretised system has

* zero-order hold: ``Abar = exp(delta A)``, ``Bbar = (Abar - 1) / A * B``; or Mamba's simplified
  Euler rule ``Bbar = delta B`` (``Abar`` is exp in both);
* impulse response ``K[t] = sum_n C_n Bbar_n Abar_n^t`` for ``t = 0..L-1`` (L = tokens);
* transfer function ``H(w) = sum_t K[t] e^{-iwt} = sum_n C_n Bbar_n (1 - (Abar_n e^{-iw})^L) / (1 - Abar_n e^{-iw})``.

A complex-init SSM (S4D-Lin, ``A_n = -1/2 + i pi n``) is used with conjugate pairs, so its real
kernel is ``2 Re K``; a real-init kernel is ``K`` itself. Metrics are computed on ``|rfft(kernel)|``
over ``w in [0, pi]``: low-frequency energy fraction, spectral centroid, total variation.

The model scan asks the backbone's card for its SSM layers (``model.card.ssm_layers(model)``, which
its mixers declare): Mamba-1 layers (A (d, n), one per direction for Vim) and Mamba-2/Hydra layers
(one scalar A per head). B, C and delta are input-dependent in
these models; :func:`scan_model` uses unit ``B = C = 1`` and the input-independent part of the
step, ``delta = softplus(k * bias)`` (k = 2 for MambaVision's mixer, which adds the dt bias twice).
:func:`data_driven_params` instead runs images through the model and uses the token- and
image-averaged ``delta_t = softplus(W dt_t + k b)``, ``B_t`` and ``C_t`` of each Mamba-1 mixer
(a time-invariant, mean-field surrogate of the selective scan).

Command line (also ``python eval/frequency_bias.py``):

Two sources of SSM parameters:

* an initialisation only (default): ``--init s4d-real s4d-lin``, d_state 16, Mamba's log-uniform
  step sizes in [1e-3, 0.1], ``B = C = 1`` (or ``--bc random``: standard normal);
* a backbone: ``--model mv_hybrid`` (fresh, ``--model-kwargs JSON`` overrides) or
  ``--checkpoint ckpt.pth [--model NAME]`` (via ``mambavision.load_pretrained``). Every SSM layer
  of its card is analysed with unit B, C and ``delta = softplus(k * dt bias)`` (as above), next to the same layer with S4D-Lin eigenvalues. With
  ``--delta-source images --image-dir DIR`` the Mamba-1 layers use delta, B and C averaged over
  the tokens of those images instead (Mamba-2/Hydra layers keep the bias-only step).

Writes ``frequency_bias.json`` / ``.md`` and ``frequency_bias.png`` (mean |H(w)|, log-y, and the
per-layer low-frequency energy).

    python -m eval.frequency_bias --out-dir out/freq
    python -m eval.frequency_bias --checkpoint teacher_checkpoint.pth --model mv_hybrid --out-dir out/freq_mv
"""
import argparse
import math
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dino.data.datasets.folder import IMG_EXTENSIONS
from eval.common import LOG, add_common_args, parse_cli, parse_model_kwargs, save_figure, write_report


def s4d_init(kind: str, d_model: int, d_state: int = 16) -> torch.Tensor:
    """Diagonal A (d_model, d_state), complex128: 's4d-real' ``-(n+1)`` or 's4d-lin' ``-1/2 + i pi n``."""
    n = torch.arange(d_state, dtype=torch.float64)
    if kind == "s4d-real":
        a = torch.complex(-(n + 1), torch.zeros_like(n))
    elif kind == "s4d-lin":
        a = torch.complex(torch.full_like(n, -0.5), math.pi * n)
    else:
        raise ValueError(f"unknown init {kind!r}; use 's4d-real' or 's4d-lin'")
    return a.expand(d_model, d_state).clone()


def mamba_dt_init(d_model: int, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Mamba's step sizes: log-uniform in [dt_min, dt_max], clamped at ``floor``; (d_model,) float64."""
    u = torch.rand(d_model, generator=generator, dtype=torch.float64)
    return torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp_min(floor)


def discretize(A: torch.Tensor, B: torch.Tensor, delta: torch.Tensor, method: str = "zoh"):
    """``(Abar, Bbar)`` for A, B (d, n) and delta (d,); ``method`` 'zoh' or 'euler' (Mamba's ``Bbar = delta B``)."""
    A = A.to(torch.complex128)
    B = B.to(torch.complex128)
    dA = delta.to(torch.float64)[:, None] * A
    Abar = torch.exp(dA)
    if method == "zoh":
        Bbar = (Abar - 1) / A * B
    elif method == "euler":
        Bbar = delta.to(torch.float64)[:, None] * B
    else:
        raise ValueError(f"unknown discretisation {method!r}; use 'zoh' or 'euler'")
    return Abar, Bbar


def impulse_response(Abar: torch.Tensor, Bbar: torch.Tensor, C: torch.Tensor, L: int) -> torch.Tensor:
    """Complex kernel ``K[t] = sum_n C_n Bbar_n Abar_n^t``, shape (d, L)."""
    t = torch.arange(L, dtype=torch.float64)
    powers = torch.exp(torch.log(Abar)[..., None] * t)  # (d, n, L); log of a nonzero complex is fine
    return ((C.to(torch.complex128) * Bbar)[..., None] * powers).sum(1)


def analytic_transfer(Abar: torch.Tensor, Bbar: torch.Tensor, C: torch.Tensor, L: int, omega: torch.Tensor) -> torch.Tensor:
    """Closed-form ``H(w)`` of the length-L kernel at frequencies ``omega``, shape (d, len(omega))."""
    z = Abar[..., None] * torch.exp(-1j * omega.to(torch.float64))  # (d, n, W)
    return ((C.to(torch.complex128) * Bbar)[..., None] * (1 - z ** L) / (1 - z)).sum(1)


def real_kernel(K: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """The real kernel a real-valued layer applies: ``K`` for real A, ``2 Re K`` for conjugate-pair complex A."""
    return K.real * (2.0 if bool((A.imag != 0).any()) else 1.0)


def transfer_magnitude(kernel: torch.Tensor) -> torch.Tensor:
    """``|H(w_k)|`` at ``w_k = 2 pi k / L``, k = 0..L//2 (rfft of each row)."""
    return torch.fft.rfft(kernel, dim=-1).abs()


def spectral_metrics(H: torch.Tensor, cutoff: float = 0.1) -> Dict[str, torch.Tensor]:
    """Per-channel metrics of magnitude spectra H (d, W) on frequencies ``f = w / pi in [0, 1]``.

    * ``low_freq_energy``: share of ``|H|^2`` in the lowest ``cutoff`` fraction of the W bins;
    * ``centroid``: ``sum f |H|^2 / sum |H|^2``;
    * ``total_variation``: ``sum |diff(H / max H)|`` (1 for a monotone low-pass, larger when ripply).
    """
    W = H.shape[-1]
    n_low = max(1, math.ceil(cutoff * W))
    power = H ** 2
    total = power.sum(-1).clamp_min(1e-300)
    f = torch.linspace(0, 1, W, dtype=H.dtype)
    Hn = H / H.amax(-1, keepdim=True).clamp_min(1e-300)
    return {
        "low_freq_energy": power[..., :n_low].sum(-1) / total,
        "centroid": (power * f).sum(-1) / total,
        "total_variation": Hn.diff(dim=-1).abs().sum(-1),
    }


@dataclass
class SSMParams:
    """One diagonal SSM (a layer, or one direction of a bidirectional layer)."""

    name: str
    A: torch.Tensor      # (d, n) complex128
    delta: torch.Tensor  # (d,) float64
    kind: str            # 'mamba1' or 'mamba2'

    def unit_bc(self):
        ones = torch.ones_like(self.A)
        return ones, ones


def analyze(p: SSMParams, L: int = 257, method: str = "zoh", cutoff: float = 0.1, B=None, C=None) -> Dict:
    """Kernel, magnitude spectrum and channel-mean metrics of one SSM (unit B, C unless given)."""
    if B is None or C is None:
        B, C = p.unit_bc()
    Abar, Bbar = discretize(p.A, B, p.delta, method)
    kernel = real_kernel(impulse_response(Abar, Bbar, C, L), p.A)
    H = transfer_magnitude(kernel)
    m = spectral_metrics(H, cutoff)
    Hn = H / H.amax(-1, keepdim=True).clamp_min(1e-300)
    return {"name": p.name, "kind": p.kind, "d": int(p.A.shape[0]), "n": int(p.A.shape[1]),
            "delta_mean": float(p.delta.mean()), **{k: float(v.mean()) for k, v in m.items()},
            "mean_H": Hn.mean(0)}


def _softplus64(x: torch.Tensor) -> torch.Tensor:
    return F.softplus(x.detach().double())


def ssm_params_of(layer) -> SSMParams:
    """One of the card's SSM layers (:class:`mambavision.SSMLayer`) with unit B, C and the bias-only step."""
    A = layer.A if layer.kind == "mamba1" else layer.A[:, None]  # Mamba-2: one state per head
    delta = _softplus64(layer.dt_bias_applications * layer.dt_bias)
    return SSMParams(layer.name, torch.complex(A, torch.zeros_like(A)), delta, layer.kind)


def scan_model(model: nn.Module) -> List[SSMParams]:
    """Every SSM of a backbone, in module order, as its card lists them."""
    return [ssm_params_of(layer) for layer in model.card.ssm_layers(model)]


def counterfactual(p: SSMParams, kind: str) -> SSMParams:
    """The same layer (d, n, delta) with A replaced by an S4D initialisation, for a real-vs-complex comparison."""
    n = max(p.A.shape[1], 1)
    return SSMParams(f"{p.name} [{kind}]", s4d_init(kind, p.A.shape[0], n), p.delta, p.kind)


@torch.no_grad()
def data_driven_params(model: nn.Module, batches: Iterable[torch.Tensor]) -> List[Tuple[SSMParams, torch.Tensor, torch.Tensor]]:
    """``(params, B, C)`` per Mamba-1 SSM with delta, B and C averaged over tokens and images.

    Hooks the ``x_proj`` of every Mamba-1 layer of the card; ``batches`` are image tensors on the
    model's device, run through ``model.forward_features``. Mamba-2 / Hydra layers (no per-token
    projection of their own) are not included.
    """
    acc, hooks, params = {}, [], []
    tokens = [0]  # the blocks' sequence length for this batch: a mixer may pad its own sequence past it

    def count_tokens(_m, args):
        tokens[0] = args[0].shape[1]

    hooks.append(model.blocks[0].register_forward_pre_hook(count_tokens))
    for layer in model.card.ssm_layers(model):
        if layer.kind != "mamba1" or layer.x_proj is None:
            continue
        key = len(params)
        params.append(ssm_params_of(layer))
        acc[key] = [0.0, 0.0, 0.0, 0]

        def hook(_m, _inp, out, key=key, layer=layer):
            out = out.detach().double().movedim(layer.x_proj_dim, -1)[:, : tokens[0]]  # (b, tokens, r + 2n)
            out = out.reshape(-1, out.shape[-1])
            n, r = layer.A_log.shape[1], layer.dt_weight.shape[1]
            dt = F.softplus(out[:, :r] @ layer.dt_weight.double().T + layer.dt_bias_applications * layer.dt_bias.double())
            a = acc[key]
            a[0] = a[0] + dt.sum(0)
            a[1] = a[1] + out[:, r:r + n].sum(0)
            a[2] = a[2] + out[:, r + n:].sum(0)
            a[3] += out.shape[0]

        hooks.append(layer.x_proj.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out = []
    for key, p in enumerate(params):
        dt_sum, b_sum, c_sum, count = acc[key]
        if count == 0:
            raise RuntimeError(f"no tokens reached {p.name}; did the model run?")
        d = p.A.shape[0]
        B = (b_sum / count).to(torch.complex128).expand(d, -1).clone()
        C = (c_sum / count).to(torch.complex128).expand(d, -1).clone()
        out.append((SSMParams(p.name, p.A, dt_sum / count, p.kind), B, C))
    return out


# --------------------------------------------------------------------------- command line
def _build_model(args):
    import mambavision

    kwargs = parse_model_kwargs(args.model_kwargs)
    if args.checkpoint:
        return mambavision.load_pretrained(args.checkpoint, args.model, **kwargs)
    return mambavision.create_model(args.model, **kwargs).eval()


def _image_batches(image_dir: str, card, img_size: int, max_images: int, batch_size: int, device):
    """Image batches from ``image_dir``, normalised as the card says (unreadable files are skipped and counted)."""
    from PIL import Image

    from eval.extract_features import resize_uint8

    if not os.path.isdir(image_dir):
        raise SystemExit(f"--image-dir not found: {image_dir}")
    files = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(IMG_EXTENSIONS))[:max_images]
    mean = torch.tensor(card.mean).view(3, 1, 1)
    std = torch.tensor(card.std).view(3, 1, 1)
    imgs, bad = [], 0
    for f in files:
        try:
            with Image.open(os.path.join(image_dir, f)) as im:
                arr = resize_uint8(np.asarray(im.convert("RGB")), img_size, card.interpolation).astype(np.float32) / 255.0
        except (OSError, ValueError) as e:
            bad += 1
            LOG.warning("skipping unreadable image %s: %s", f, e)
            continue
        imgs.append((torch.from_numpy(arr).permute(2, 0, 1) - mean) / std)
    if bad:
        LOG.warning("%d of %d images could not be read", bad, len(files))
    if not imgs:
        raise SystemExit(f"no readable image ({', '.join(IMG_EXTENSIONS)}) in {image_dir}")
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
    p.add_argument("--model-kwargs", default="{}", help="JSON overrides for create_model, e.g. '{\"depth\": 2}'")
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
    args = parse_cli(build_parser(), argv)
    if not 0 < args.cutoff < 1:
        raise SystemExit(f"--cutoff must be in (0, 1), got {args.cutoff}")
    kw = dict(L=args.seq_len, method=args.method, cutoff=args.cutoff)
    layers: List[Dict] = []
    curves: Dict[str, np.ndarray] = {}
    if args.model or args.checkpoint:
        model = _build_model(args)
        ssms = [(p, None, None) for p in scan_model(model)]
        if not ssms:
            raise SystemExit(f"model {args.model or args.checkpoint!r} has no SSM layer (its card lists none) to analyse")
        n_images = 0
        if args.delta_source == "images":
            if not args.image_dir:
                raise SystemExit("--delta-source images needs --image-dir")
            device = next(model.parameters()).device
            batches, n_images = _image_batches(args.image_dir, model.card, args.img_size, args.max_images, args.batch_size,
                                               device)
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
