"""Mamba-2 state-space duality (SSD) scan: ``mamba_chunk_scan_combined`` with mamba-ssm's signature.

Per head ``h`` (scalar decay ``A_h``), with ``B``/``C`` shared by the ``h / g`` heads of a group::

    dt_t  = clamp(softplus(dt_t + dt_bias), *dt_limit)          (softplus only if dt_softplus)
    S_t   = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T                 S: (p, n) per head
    y_t   = S_t C_t + D x_t,   then  y_t *= silu(z_t)            (D and z optional)

Backends, chosen at call time:

* ``"cuda"``: mamba-ssm's fused kernels (``mamba_ssm.ops.triton.ssd_combined``, written in Triton but shipped,
  and importable only, with mamba-ssm's CUDA build), used when mamba-ssm is importable and the input is on
  CUDA. Backend names mean the same for every op here: ``cuda`` is the upstream CUDA package's kernel,
  ``triton`` the project's own Triton kernel (the SSD has none), ``torch`` plain PyTorch.
* ``"torch"``: the chunked SSD algorithm in plain PyTorch (the "ssd_minimal" formulation of
  Dao & Gu, 2024: quadratic attention-like form inside a chunk, linear recurrence between
  chunks). It runs anywhere, in fp32, and supports autograd through ordinary ops.

Force one with ``backend=`` or the environment variable ``MAMBAVISION_SSD_BACKEND=torch|cuda``.
``ssd_ref`` is a step-by-step recurrence used by the tests as the ground truth.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .dispatch import choose_backend, import_error, optional_import
from ..amp import autocast_off

__all__ = ["mamba_chunk_scan_combined", "ssd_ref", "ssd_backends"]

_ENV_VAR = "MAMBAVISION_SSD_BACKEND"
# The torch path materialises (chunk x chunk) blocks, so its cost grows with the chunk length;
# 64 was fastest on CPU at Hydra's L=257 (7x faster than 256). The result does not depend on it.
_TORCH_MAX_CHUNK = 64
_TRITON_MODULE = "mamba_ssm.ops.triton.ssd_combined"


def _triton_fn():
    """mamba-ssm's Triton entry point, or None (the import is attempted once, then cached)."""
    return optional_import(_TRITON_MODULE, "mamba_chunk_scan_combined")


def ssd_backends() -> Tuple[str, ...]:
    """Backends usable in this process (``"torch"`` always; ``"cuda"`` if mamba-ssm imports)."""
    return ("torch", "cuda") if _triton_fn() is not None else ("torch",)


def _resolve_backend(backend: Optional[str], x: torch.Tensor) -> str:
    return choose_backend(
        "SSD", backend, _ENV_VAR,
        [("cuda", x.is_cuda and _triton_fn() is not None,
          lambda: (f"mamba-ssm is not importable ({import_error(_TRITON_MODULE)})" if _triton_fn() is None
                   else f"x is on {x.device}, not CUDA"))],
    )


def _check_shapes(x, dt, A, B, C, D, z, dt_bias, initial_states) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if tuple(dt.shape) != (b, l, h):
        raise ValueError(f"dt must have shape {(b, l, h)} to match x, got {tuple(dt.shape)}")
    if tuple(A.shape) != (h,):
        raise ValueError(f"A must have shape ({h},) (one decay per head), got {tuple(A.shape)}")
    if B.dim() != 4 or tuple(B.shape[:2]) != (b, l) or B.shape != C.shape:
        raise ValueError(f"B and C must both be (batch={b}, seqlen={l}, ngroups, dstate), got {tuple(B.shape)} and {tuple(C.shape)}")
    if h % B.shape[2]:
        raise ValueError(f"ngroups={B.shape[2]} must divide nheads={h}")
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        raise ValueError(f"D must have shape ({h},) or ({h}, {p}), got {tuple(D.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have the shape of x {tuple(x.shape)}, got {tuple(z.shape)}")
    if dt_bias is not None and tuple(dt_bias.shape) != (h,):
        raise ValueError(f"dt_bias must have shape ({h},), got {tuple(dt_bias.shape)}")
    if initial_states is not None and tuple(initial_states.shape) != (b, h, p, B.shape[3]):
        raise ValueError(f"initial_states must have shape {(b, h, p, B.shape[3])}, got {tuple(initial_states.shape)}")


def _discretize_dt(dt, dt_bias, dt_softplus, dt_limit, dtype=torch.float32) -> torch.Tensor:
    """Step sizes in ``dtype``, as mamba-ssm's ``_chunk_cumsum_fwd`` (softplus threshold 20, then clamp)."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)  # threshold=20 like the Triton kernel
    lo, hi = dt_limit
    if lo > 0.0 or hi != float("inf"):
        dt = dt.clamp(min=lo, max=hi)
    return dt


def _skip_and_gate(y, x, D, z) -> torch.Tensor:
    if D is not None:
        D = D.to(y.dtype)
        y = y + x.to(y.dtype) * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = a[j+1] + ... + a[i]`` for ``i >= j`` (0 on the diagonal), ``-inf`` above it.

    Built by a masked cumulative sum rather than ``cumsum[i] - cumsum[j]``, which would cancel
    catastrophically for long chunks with large decays.
    """
    T = a.shape[-1]
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    terms = a.unsqueeze(-1).expand(*a.shape, T).masked_fill(~strictly_lower, 0.0)  # [k, j] = a_k if k > j
    out = terms.cumsum(dim=-2)
    lower = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    return out.masked_fill(~lower, float("-inf"))


def _ssd_chunked(X, logdecay, B, C, chunk: int, initial_states=None):
    """Chunked SSD on discretised inputs; every tensor fp32 and ``seqlen % chunk == 0``.

    X = x * dt (b, l, h, p); logdecay = A * dt (b, l, h); B, C (b, l, g, n). Heads are kept as
    (group, head-in-group) so B and C are never repeated across heads.
    Returns (Y (b, l, h, p), final state (b, h, p, n)).
    """
    b, l, h, p = X.shape
    g, n = B.shape[2], B.shape[3]
    r, c = h // g, l // chunk
    X = X.reshape(b, c, chunk, g, r, p)
    B = B.reshape(b, c, chunk, g, n)
    C = C.reshape(b, c, chunk, g, n)
    a = logdecay.reshape(b, c, chunk, g, r).permute(0, 3, 4, 1, 2)  # (b, g, r, c, chunk)
    a_cum = a.cumsum(dim=-1)

    # 1) Inside each chunk: y_t = sum_{s<=t} <C_t, B_s> exp(a_{s+1} + ... + a_t) X_s.
    CB = torch.einsum("bctgn,bcsgn->bgcts", C, B)
    kernel = CB.unsqueeze(2) * torch.exp(_segsum(a))  # (b, g, r, c, t, s)
    y_diag = torch.einsum("bgrcts,bcsgrp->bctgrp", kernel, X)

    # 2) State each chunk would end with if it started from zero.
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # decay from step s to the chunk's end
    chunk_states = torch.einsum("bcsgn,bgrcs,bcsgrp->bcgrpn", B, to_end, X)

    # 3) Linear recurrence over chunks (c+1 states: the initial one, then after each chunk).
    if initial_states is None:
        init = X.new_zeros(b, 1, g, r, p, n)
    else:
        init = initial_states.float().reshape(b, 1, g, r, p, n)
    states = torch.cat([init, chunk_states], dim=1)
    chunk_decay = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, g, r, c+1, c+1)
    states = torch.einsum("bgrzc,bcgrpn->bzgrpn", chunk_decay, states)
    entering, final = states[:, :-1], states[:, -1]

    # 4) Contribution of the state entering each chunk: y_t += exp(a_1 + ... + a_t) S_in C_t.
    y_off = torch.einsum("bctgn,bcgrpn,bgrct->bctgrp", C, entering, torch.exp(a_cum))
    Y = (y_diag + y_off).reshape(b, l, h, p)
    return Y, final.reshape(b, h, p, n)


def _ssd_torch(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, dt_limit):
    b, l, h, p = x.shape
    # Always fp32: exp of long decay sums and the state accumulation lose too much in bf16/fp16.
    with autocast_off(x.device.type):
        dt32 = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit)
        X = x.float() * dt32.unsqueeze(-1)
        logdecay = dt32 * A.float()
        Bf, Cf = B.float(), C.float()
        # Zero-pad the end of the sequence to whole chunks. The scan is causal, so padded steps
        # cannot change any real output; with dt = 0 there they also leave the state unchanged
        # (decay exp(0) = 1, input 0), so the final state is exact too.
        chunk_size = min(chunk_size, _TORCH_MAX_CHUNK)
        pad = (-l) % chunk_size
        if pad:
            X = F.pad(X, (0, 0, 0, 0, 0, pad))
            logdecay = F.pad(logdecay, (0, 0, 0, pad))
            Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
            Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
        y, final = _ssd_chunked(X, logdecay, Bf, Cf, chunk_size, initial_states)
        y = _skip_and_gate(y[:, :l], x, D, z)
    return y.to(x.dtype), final


# Custom kernels (mamba-ssm's extension, our Triton kernel) are opaque to torch.compile: a clean graph break.
@torch.compiler.disable
def mamba_chunk_scan_combined(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: Tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Mamba-2 SSD scan with mamba-ssm's signature and semantics.

    Args:
        x: (batch, seqlen, nheads, headdim). dt: (batch, seqlen, nheads). A: (nheads,), negative.
        B, C: (batch, seqlen, ngroups, dstate), ``ngroups`` dividing ``nheads``.
        chunk_size: block length of the chunked algorithm, a speed knob only (the torch path caps it
            at 64, which is faster there; the result is the same up to rounding).
        D: (nheads,) or (nheads, headdim) skip connection. z: like x, output gate ``y * silu(z)``.
        dt_bias: (nheads,) added to dt before the softplus. initial_states: (batch, nheads, headdim, dstate).
        backend: ``"auto"`` (default), ``"torch"`` or ``"cuda"``; overrides ``$MAMBAVISION_SSD_BACKEND``.

    Returns y (batch, seqlen, nheads, headdim) in x's dtype, and the fp32 final state
    (batch, nheads, headdim, dstate) if ``return_final_states``.
    """
    _check_shapes(x, dt, A, B, C, D, z, dt_bias, initial_states)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if _resolve_backend(backend, x) == "cuda":
        return _triton_fn()(
            x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
            dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=return_final_states,
        )
    y, final = _ssd_torch(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, dt_limit)
    return (y, final) if return_final_states else y


def ssd_ref(
    x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, dt_softplus=False,
    dt_limit=(0.0, float("inf")), return_final_states=False,
):
    """The SSD recurrence, one time step at a time (slow; the ground truth for tests).

    Same arguments and outputs as :func:`mamba_chunk_scan_combined`, without ``chunk_size``.
    Computes in fp32, or in fp64 for fp64 ``x`` (a high-precision ground truth for GPU kernels).
    """
    _check_shapes(x, dt, A, B, C, D, z, dt_bias, initial_states)
    b, l, h, p = x.shape
    r = h // B.shape[2]
    acc = torch.promote_types(x.dtype, torch.float32)
    dt32 = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit, acc)
    Bh = B.to(acc).repeat_interleave(r, dim=2)  # head k uses group k // r
    Ch = C.to(acc).repeat_interleave(r, dim=2)
    xf, A32 = x.to(acc), A.to(acc)
    state = x.new_zeros(b, h, p, B.shape[3], dtype=acc) if initial_states is None else initial_states.to(acc)
    ys = []
    for t in range(l):
        decay = torch.exp(dt32[:, t] * A32)[..., None, None]  # (b, h, 1, 1)
        inp = (dt32[:, t, :, None] * xf[:, t]).unsqueeze(-1) * Bh[:, t].unsqueeze(2)  # (b, h, p, n)
        state = decay * state + inp
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = _skip_and_gate(torch.stack(ys, dim=1), x, D, z).to(x.dtype)
    return (y, state) if return_final_states else y
