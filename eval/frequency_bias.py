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

The model scan finds every module with an ``A_log`` parameter and is duck-typed (no mambavision
import): Mamba-1 mixers (``A_log`` (d, n), ``dt_proj``; Vim's backward ``A_b_log``/``dt_proj_b``)
and Mamba-2/Hydra mixers (``A_log`` (h,), ``dt_bias``). B, C and delta are input-dependent in
these models; :func:`scan_model` uses unit ``B = C = 1`` and the input-independent part of the
step, ``delta = softplus(k * bias)`` (k = 2 for MambaVision's mixer, which adds the dt bias twice).
:func:`data_driven_params` instead runs images through the model and uses the token- and
image-averaged ``delta_t = softplus(W dt_t + k b)``, ``B_t`` and ``C_t`` of each Mamba-1 mixer
(a time-invariant, mean-field surrogate of the selective scan).
"""
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# How often a mixer class adds its dt bias before the softplus (MambaVision: dt_proj(x) + delta_bias).


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


def ssm_params_of(name: str, module: nn.Module) -> List[SSMParams]:
    """The diagonal SSM(s) held by ``module`` (empty if it has no ``A_log``)."""
    out = []
    A_log = getattr(module, "A_log", None)
    if not isinstance(A_log, torch.Tensor):
        return out
    if A_log.dim() == 2 and hasattr(module, "dt_proj"):  # Mamba-1: A (d, n), delta from dt_proj.bias
        k = getattr(module, "dt_bias_applications", 1)
        for sfx, label in (("", ""), ("_b", " (bwd)")):
            a_log = getattr(module, f"A{sfx}_log", None)
            dt_proj = getattr(module, f"dt_proj{sfx}", None)
            if a_log is None or dt_proj is None:
                continue
            A = -torch.exp(a_log.detach().double())
            out.append(SSMParams(name + label, torch.complex(A, torch.zeros_like(A)), _softplus64(k * dt_proj.bias), "mamba1"))
    elif A_log.dim() == 1 and hasattr(module, "dt_bias"):  # Mamba-2 / Hydra: one scalar A per head
        A = -torch.exp(A_log.detach().double())[:, None]
        out.append(SSMParams(name, torch.complex(A, torch.zeros_like(A)), _softplus64(module.dt_bias), "mamba2"))
    else:
        raise ValueError(f"module {name!r} has A_log {tuple(A_log.shape)} but neither dt_proj (Mamba-1) nor dt_bias (Mamba-2)")
    return out


def scan_model(model: nn.Module) -> List[SSMParams]:
    """Every SSM in ``model``, in module order."""
    found = []
    for name, module in model.named_modules():
        found.extend(ssm_params_of(name, module))
    return found


def counterfactual(p: SSMParams, kind: str) -> SSMParams:
    """The same layer (d, n, delta) with A replaced by an S4D initialisation, for a real-vs-complex comparison."""
    n = max(p.A.shape[1], 1)
    return SSMParams(f"{p.name} [{kind}]", s4d_init(kind, p.A.shape[0], n), p.delta, p.kind)


@torch.no_grad()
def data_driven_params(model: nn.Module, batches: Iterable[torch.Tensor]) -> List[Tuple[SSMParams, torch.Tensor, torch.Tensor]]:
    """``(params, B, C)`` per Mamba-1 SSM with delta, B and C averaged over tokens and images.

    Hooks every ``x_proj``/``x_proj_b`` of modules with a 2-D ``A_log``; ``batches`` are image
    tensors on the model's device, run through ``model.forward_features``. Mamba-2 / Hydra layers
    (no ``x_proj``) are not included.
    """
    acc, hooks, params = {}, [], []
    for name, module in model.named_modules():
        for p in ssm_params_of(name, module):
            sfx = "_b" if p.name.endswith("(bwd)") else ""
            x_proj, dt_proj = getattr(module, f"x_proj{sfx}", None), getattr(module, f"dt_proj{sfx}", None)
            if p.kind != "mamba1" or x_proj is None:
                continue
            k = getattr(module, "dt_bias_applications", 1)
            n = p.A.shape[1]
            key = len(params)
            params.append(p)
            acc[key] = [0.0, 0.0, 0.0, 0]

            def hook(_m, _inp, out, key=key, dt_proj=dt_proj, k=k, n=n):
                out = out.detach().double().reshape(-1, out.shape[-1])
                r = out.shape[1] - 2 * n
                dt = F.softplus(out[:, :r] @ dt_proj.weight.double().T + k * dt_proj.bias.double())
                a = acc[key]
                a[0] = a[0] + dt.sum(0)
                a[1] = a[1] + out[:, r:r + n].sum(0)
                a[2] = a[2] + out[:, r + n:].sum(0)
                a[3] += out.shape[0]

            hooks.append(x_proj.register_forward_hook(hook))
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
