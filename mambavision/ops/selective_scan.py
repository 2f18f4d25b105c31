"""Mamba-1 selective scan (Gu & Dao, 2023) with mamba-ssm's signature and semantics.

For every batch ``b``, channel ``d`` and state index ``n`` the scan runs the linear recurrence

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,      y_t = <C_t, h_t> + D * u_t,

then gates ``out = y * silu(z)`` when ``z`` is given. ``delta`` is first shifted by
``delta_bias`` and passed through softplus when asked.

``selective_scan_fn`` dispatches at call time:

1. mamba-ssm's CUDA kernel, when ``mamba_ssm`` imports and the input is on CUDA;
2. the project's Triton kernel (:mod:`.selective_scan_triton`) on CUDA without mamba-ssm, for
   time-varying B and C (every model here) and fp32/bf16/fp16 inputs; like mamba-ssm's it fuses the
   delta bias, softplus, D and the gate, and reads the inputs in their own dtype;
3. otherwise a chunked pure-PyTorch scan (:class:`_ChunkedScan`) whose backward recomputes
   each chunk, so memory grows with ``B*D*N*chunk_size`` rather than ``B*D*N*L``.

Set ``backend=`` or the environment variable ``MAMBAVISION_SCAN_BACKEND`` to ``cuda``,
``triton`` or ``torch`` to force one (``auto`` is the default). ``selective_scan_ref`` is the plain per-step
loop, kept as the obviously-correct reference for tests and benchmarks.
"""
import os
from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import choose_backend, import_error, optional_import
from ..amp import autocast_off

BACKEND_ENV = "MAMBAVISION_SCAN_BACKEND"
# auto picks our Triton kernel over mamba-ssm's up to this length, where it is the faster one (H200 sweep).
SHORT_SEQUENCE = 64
DEFAULT_CHUNK_SIZE = 32  # fastest fwd+bwd on 2 CPU cores at L=257; ~B*D*N*32*4 bytes per buffer


def _mamba_ssm_scan():
    """mamba-ssm's CUDA ``selective_scan_fn``, or None when it cannot be imported."""
    return optional_import("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")


def mamba_ssm_available() -> bool:
    """True when mamba-ssm's CUDA selective scan can be imported."""
    return _mamba_ssm_scan() is not None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # fp32 like mamba-ssm for half/bf16/fp32 inputs; fp64 stays fp64 so gradcheck is meaningful.
    return torch.promote_types(x.dtype, torch.float32)


def _check_inputs(u, delta, A, B, C, D, z, delta_bias):
    """Validate shapes as mamba-ssm expects them; returns (batch, dim, length, dstate)."""
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, length), got shape {tuple(u.shape)}")
    b, d, l = u.shape
    if l == 0:
        raise ValueError("selective scan needs a sequence length of at least 1")
    if tuple(delta.shape) != (b, d, l):
        raise ValueError(f"delta must have u's shape {(b, d, l)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (dim={d}, dstate), got {tuple(A.shape)}")
    if A.is_complex():
        raise NotImplementedError("complex A is not supported; the project's models use real A")
    n = A.shape[1]
    for name, X in (("B", B), ("C", C)):
        if X.dim() == 2:
            ok = tuple(X.shape) == (d, n)
        elif X.dim() == 3:
            ok = tuple(X.shape) == (b, n, l)
        elif X.dim() == 4:
            ok = X.shape[0] == b and X.shape[2:] == (n, l) and X.shape[1] > 0 and d % X.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"{name} must be (dim={d}, dstate={n}), (batch={b}, dstate={n}, length={l}) or "
                f"(batch={b}, groups dividing {d}, dstate={n}, length={l}); got {tuple(X.shape)}"
            )
    if D is not None and tuple(D.shape) != (d,):
        raise ValueError(f"D must be (dim={d},), got {tuple(D.shape)}")
    if delta_bias is not None and tuple(delta_bias.shape) != (d,):
        raise ValueError(f"delta_bias must be (dim={d},), got {tuple(delta_bias.shape)}")
    if z is not None and tuple(z.shape) != (b, d, l):
        raise ValueError(f"z must have u's shape {(b, d, l)}, got {tuple(z.shape)}")
    return b, d, l, n


def _triton_scan():
    """The project's Triton scan (:mod:`.selective_scan_triton`), or None without triton."""
    return optional_import("mambavision.ops.selective_scan_triton", "triton_selective_scan")


def triton_scan_available() -> bool:
    """True when the project's Triton selective scan can be imported (triton is installed)."""
    return _triton_scan() is not None


def _triton_interpreted() -> bool:
    # Triton's CPU interpreter, for tests; auto picks it on CPU tensors only when the user set it.
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


@torch.compiler.assume_constant_result
def _resolve_backend(backend: Optional[str], device_type: str, dtype: torch.dtype, time_varying_bc: bool,
                     compiling: bool = False, length: Optional[int] = None, symbolic: bool = False) -> str:
    # Plain arguments, no tensors: under torch.compile the choice is made once at trace time, as a constant.
    if device_type == "meta":
        return "torch"  # shapes and FLOPs only (the trainer counts a step's FLOPs on a meta copy): no kernel runs
    on_cuda = device_type == "cuda"
    # symbolic: traced with dynamic shapes, where the kernels' grid and launch rule (Python ints) cannot be formed
    triton_ok = ((on_cuda or _triton_interpreted()) and dtype != torch.float64 and not symbolic
                 and time_varying_bc and triton_scan_available())  # CPU runs never import triton

    def triton_why_not():
        if not triton_scan_available():
            return f"triton does not import ({import_error('mambavision.ops.selective_scan_triton')})"
        if not (on_cuda or _triton_interpreted()):
            return f"it needs CUDA tensors (or TRITON_INTERPRET=1), got u on {device_type}"
        if symbolic:
            return "under torch.compile it needs static shapes (dynamic=False), and this trace has symbolic ones"
        return "it supports fp32/bf16/fp16 inputs with time-varying B and C (batch, [groups,] dstate, length)"

    fast = [("cuda", on_cuda and mamba_ssm_available(),
             lambda: ("it needs mamba-ssm (pip install mamba-ssm), which does not import" if not mamba_ssm_available()
                      else f"it needs CUDA tensors, got u on {device_type}")),
            ("triton", triton_ok, triton_why_not)]
    if compiling or (length is not None and length <= SHORT_SEQUENCE):
        # Under torch.compile, auto prefers the kernel the compiler can trace through: the compiled mv_hybrid
        # DINOv2 step ran at 202 images/s with it against 183 with mamba-ssm's graph break (docs/performance.md).
        # On short sequences ours is also faster in an eager call: 0.56x of mamba-ssm's wall time at 112 px (L = 50).
        # At 257 tokens its kernels are faster too (0.71x of the GPU time), but an eager call there is bound by
        # launching them (1.10x the wall time in bf16), and an eager mv_hybrid train step runs at 574 images/s
        # with it against 679 with mamba-ssm's (H200, docs/performance.md), so eager long sequences keep mamba-ssm.
        fast.reverse()
    return choose_backend("selective-scan", backend, BACKEND_ENV, fast)


def selective_scan_fn(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
    *, backend: Optional[str] = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
):
    """Mamba-1 selective scan with mamba-ssm's signature.

    Args:
        u, delta: (batch, dim, length).
        A: (dim, dstate), real (negative for a stable scan).
        B, C: (dim, dstate) shared over time, (batch, dstate, length), or
            (batch, groups, dstate, length) with channel ``d`` in group ``d // (dim // groups)``.
        D: optional (dim,) skip connection. z: optional (batch, dim, length) gate.
        delta_bias: optional (dim,), added to ``delta`` before the softplus.
        delta_softplus: apply softplus to ``delta``.
        return_last_state: also return the final state (batch, dim, dstate), in fp32. The torch backend
            backpropagates through it; mamba-ssm's CUDA backward ignores its gradient (upstream behaviour).
        backend: ``"auto"`` (default, or ``$MAMBAVISION_SCAN_BACKEND``), ``"cuda"``, ``"triton"`` or ``"torch"``.
        chunk_size: time steps per chunk of the torch backend (memory vs. Python overhead).

    Returns:
        ``out`` (batch, dim, length) in ``u``'s dtype, or ``(out, last_state)``.

    Under ``torch.compile`` the Triton backend is traced (its kernels are custom ops), so the graph
    runs through the scan, and ``auto`` prefers it to mamba-ssm's extension, which (like the chunked
    PyTorch scan) is a graph break.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    compiling = torch.compiler.is_compiling()  # only a trace has symbolic shapes: eager calls skip the check
    choice = _resolve_backend(backend, u.device.type, u.dtype, B.dim() > 2 and C.dim() > 2, compiling, u.shape[-1],
                              compiling and not all(isinstance(s, int) for s in (*u.shape, *B.shape)))
    if choice == "cuda":
        return _cuda_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if choice == "triton":  # fused: bias, softplus, D and the gate in the kernel, inputs in their dtype
        B, C = _match_groups(B, C)
        out, last_state = _triton_scan()(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return (out, last_state) if return_last_state else out
    return _torch_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_size)


@torch.compiler.disable  # an opaque extension: a clean graph break
def _cuda_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    return _mamba_ssm_scan()(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


@torch.compiler.disable  # a Python loop over chunks: nothing for the compiler to fuse
def _torch_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_size):
    # The scan decides its own precision; autocast must not push its products to bf16.
    with autocast_off(u.device.type):
        ct = _compute_dtype(u)
        delta = _prepare_delta(delta.to(ct), delta_bias, delta_softplus)
        A, B, C = A.to(ct), B.to(ct), C.to(ct)
        B, C = _match_groups(B, C)
        y, last_state = _ChunkedScan.apply(u.to(ct), delta, A, B, C, chunk_size)
        out = _finish(y, u.to(ct), D, z, u.dtype)
    return (out, last_state) if return_last_state else out


def _prepare_delta(delta, delta_bias, delta_softplus):
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _finish(y, u, D, z, out_dtype):
    """Adds the D skip and the silu(z) gate, then casts to the input dtype."""
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype).contiguous()


def _match_groups(B, C):
    """Brings variable B and C to one group layout (b, g, n, l); constant (d, n) stays as is."""
    B = B.unsqueeze(1) if B.dim() == 3 else B
    C = C.unsqueeze(1) if C.dim() == 3 else C
    if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        gb, gc = B.shape[1], C.shape[1]
        g = max(gb, gc)
        if g % min(gb, gc):
            raise ValueError(f"B and C group counts must divide one another, got {gb} and {gc}")
        # Group j of the finer layout lies inside group j // k of the coarser one.
        B = B.repeat_interleave(g // gb, dim=1)
        C = C.repeat_interleave(g // gc, dim=1)
    return B, C


class _ChunkedScan(torch.autograd.Function):
    """The core recurrence ``y_t = <C_t, h_t>`` over time in chunks, with a recomputing backward.

    Internally everything is time-major with the channel axis split into (groups, heads):
    states are (T, b, g, h, n), so one time step is a contiguous slab and the sequential part
    is a single fused multiply-add per step. Only the state at each chunk start is kept for the
    backward, which recomputes the chunk's states and runs the adjoint recurrence
    ``g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}`` backwards in time.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, chunk_size):
        b, d, l = u.shape
        g = B.shape[1] if B.dim() == 4 else C.shape[1] if C.dim() == 4 else 1
        u_t, delta_t = _time_major(u, g), _time_major(delta, g)
        A_t, B_t, C_t = A.reshape(g, d // g, -1), _time_major_bc(B, g), _time_major_bc(C, g)
        starts = []
        h = u.new_zeros(b, g, d // g, A.shape[1])
        y = u.new_empty(l, b, g, d // g)
        for t0 in range(0, l, chunk_size):
            t1 = min(t0 + chunk_size, l)
            starts.append(h)
            _, states = _chunk_states(h, delta_t[t0:t1], u_t[t0:t1], A_t, _chunk(B_t, t0, t1))
            h = states[-1].clone()
            y[t0:t1] = _contract_state(states[1:], _chunk(C_t, t0, t1))
            del states
        ctx.save_for_backward(u_t, delta_t, A_t, B_t, C_t, torch.stack(starts))
        ctx.chunk_size = chunk_size
        ctx.shapes = (b, d, l, g, B.dim() == 4, C.dim() == 4)
        return y.reshape(l, b, d).permute(1, 2, 0), h.reshape(b, d, -1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dlast):
        u_t, delta_t, A_t, B_t, C_t, starts = ctx.saved_tensors
        b, d, l, g, var_b, var_c = ctx.shapes
        T = ctx.chunk_size
        with autocast_off(dy.device.type):
            dy_t = _time_major(dy.to(u_t.dtype), g)
            carry = dlast.to(u_t.dtype).reshape(b, g, d // g, -1)  # dL/dh at the chunk's last step
            du, ddelta = torch.empty_like(u_t), torch.empty_like(delta_t)
            dA = torch.zeros_like(A_t)
            dB, dC = torch.zeros_like(B_t), torch.zeros_like(C_t)
            for i in reversed(range(len(starts))):
                t0, t1 = i * T, min((i + 1) * T, l)
                dlt, uu, dyy = delta_t[t0:t1], u_t[t0:t1], dy_t[t0:t1]
                Bc, Cc = _chunk(B_t, t0, t1), _chunk(C_t, t0, t1)
                decay, states = _chunk_states(starts[i], dlt, uu, A_t, Bc)
                h_prev, h = states[:-1], states[1:]
                # Adjoint: grad[t] = dy_t C_t + decay[t+1] * grad[t+1], seeded by the later chunks.
                grad = dyy.unsqueeze(-1) * (Cc.unsqueeze(-2) if Cc.dim() == 4 else Cc)
                grad[-1] += carry
                for t in range(t1 - t0 - 2, -1, -1):
                    grad[t].addcmul_(decay[t + 1], grad[t + 1])
                carry = decay[0] * grad[0]
                w = dlt * uu  # the input term is w * B
                if var_c:
                    dC[t0:t1] = torch.einsum("tbghn,tbgh->tbgn", h, dyy)
                else:
                    dC += torch.einsum("tbghn,tbgh->ghn", h, dyy)
                if var_b:
                    dB[t0:t1] = torch.einsum("tbghn,tbgh->tbgn", grad, w)
                    dw = torch.einsum("tbghn,tbgn->tbgh", grad, Bc)
                else:
                    dB += torch.einsum("tbghn,tbgh->ghn", grad, w)
                    dw = torch.einsum("tbghn,ghn->tbgh", grad, Bc)
                # d/d(delta*A) of the decay term: grad * decay * h_prev (reuses grad's memory).
                dlog = grad.mul_(decay).mul_(h_prev)
                del decay, states, h, h_prev
                dA += torch.einsum("tbghn,tbgh->ghn", dlog, dlt)
                ddelta[t0:t1] = torch.einsum("tbghn,ghn->tbgh", dlog, A_t) + dw * uu
                du[t0:t1] = dw * dlt
                del dlog, grad
        need = ctx.needs_input_grad
        return (
            _batch_major(du) if need[0] else None,
            _batch_major(ddelta) if need[1] else None,
            dA.reshape(d, -1) if need[2] else None,
            _bc_back(dB, var_b, d) if need[3] else None,
            _bc_back(dC, var_c, d) if need[4] else None,
            None,
        )


def _time_major(x, g):
    """(b, d, l) -> contiguous (l, b, g, d // g)."""
    b, d, l = x.shape
    return x.permute(2, 0, 1).reshape(l, b, g, d // g).contiguous()


def _batch_major(x):
    """(l, b, g, h) -> (b, g * h, l)."""
    l, b = x.shape[:2]
    return x.reshape(l, b, -1).permute(1, 2, 0)


def _time_major_bc(X, g):
    """Variable (b, g, n, l) -> (l, b, g, n); constant (d, n) -> (g, d // g, n)."""
    if X.dim() == 4:
        return X.permute(3, 0, 1, 2).contiguous()
    return X.reshape(g, X.shape[0] // g, X.shape[1])


def _bc_back(dX, variable, d):
    return dX.permute(1, 2, 3, 0) if variable else dX.reshape(d, -1)


def _chunk(X, t0, t1):
    """Time slice of a variable (l, b, g, n) tensor; constant (g, h, n) tensors pass through."""
    return X[t0:t1] if X.dim() == 4 else X


def _chunk_states(h0, delta, u, A, B):
    """States of one chunk, with the chunk's start state in front.

    Returns ``decay`` (T, b, g, h, n) = exp(delta * A) and ``states`` (T + 1, b, g, h, n) with
    ``states[0] = h0`` and ``states[t + 1] = h_t``.
    """
    T = delta.shape[0]
    decay = torch.exp(delta.unsqueeze(-1) * A)
    states = torch.empty((T + 1,) + decay.shape[1:], dtype=decay.dtype, device=decay.device)
    states[0] = h0
    Bb = B.unsqueeze(-2) if B.dim() == 4 else B
    torch.mul((delta * u).unsqueeze(-1), Bb, out=states[1:])
    for t in range(T):  # the only sequential part: one fused multiply-add per step
        states[t + 1].addcmul_(decay[t], states[t])
    return decay, states


def _contract_state(h, C):
    """y = sum_n h * C for a chunk of states (T, b, g, h, n)."""
    if C.dim() == 4:
        return torch.einsum("tbghn,tbgn->tbgh", h, C)
    return torch.einsum("tbghn,ghn->tbgh", h, C)


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """Sequential reference: the recurrence one time step at a time, differentiable by autograd.

    Same arguments and returns as :func:`selective_scan_fn`. Slow (a Python loop over the
    length); meant for tests and as the benchmark baseline.
    """
    b, d, l, n = _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    ct = _compute_dtype(u)
    with autocast_off(u.device.type):
        delta = _prepare_delta(delta.to(ct), delta_bias, delta_softplus)
        uf, A = u.to(ct), A.to(ct)

        def per_channel(X):  # -> (b, d, n, l) or (d, n)
            X = X.to(ct)
            if X.dim() == 3:
                return X.unsqueeze(1)
            if X.dim() == 4:
                return X.repeat_interleave(d // X.shape[1], dim=1)
            return X

        B, C = per_channel(B), per_channel(C)
        h = uf.new_zeros(b, d, n)
        ys = []
        for t in range(l):
            Bt = B[..., t] if B.dim() == 4 else B
            Ct = C[..., t] if C.dim() == 4 else C
            dt = delta[:, :, t, None]
            h = torch.exp(dt * A) * h + dt * Bt * uf[:, :, t, None]
            ys.append((h * Ct).sum(-1))
        out = _finish(torch.stack(ys, dim=-1), uf, D, z, u.dtype)
    return (out, h) if return_last_state else out
