"""The project's Triton kernel for the Mamba-1 selective scan: the middle step of the dispatch
(mamba-ssm's CUDA extension -> this kernel -> the chunked PyTorch scan), for GPUs where mamba-ssm
does not build.

It computes the whole of mamba-ssm's ``selective_scan_fn`` in one pass, as mamba-ssm's kernel does:

    delta = softplus(delta + delta_bias)
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,      y_t = <C_t, h_t> + D * u_t,
    out = y * silu(z)

and returns ``(out, h_L)``. One program owns one batch element and ``BD`` channels, and walks the
sequence in chunks of ``T`` steps; a last, partial chunk gets a tile of its own, smaller size (at
L = 257 and T = 32 a full tile would spend a ninth of the work on one step). Within a chunk the
recurrence is parallel in time: for each state index the pairs ``(exp(delta A), delta B u)`` are
combined with ``tl.associative_scan`` (the affine maps compose), and the state entering the chunk is
added through the cumulative decay. So the
per-step latency of a sequential loop is gone, and every load is a coalesced [BD, T] tile.

Forward stores the state at every chunk start (B*D*N*L/T floats). Backward walks the chunks from the
end: it recomputes the chunk's states from that start state, runs the adjoint recurrence

    g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}

as a reverse scan, and forms every gradient from ``h`` and ``g`` in registers. The decay's gradient
uses ``exp(delta_t A) h_{t-1} = h_t - delta_t B_t u_t``, so no shifted state is needed. The gradients
of B and C are sums over the channels of a group: each program writes its partial sum and PyTorch adds
them (deterministic). Those of A, D and delta_bias are sums over the batch, accumulated with fp32
atomics once per program, so they are not bit-reproducible from run to run.

Needs ``triton``. With ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on
CPU tensors through Triton's interpreter, which is how the CPU test suite checks them.
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .selective_scan import _triton_interpreted

# Launch configuration (channels per program, chunk length, warps), from the sweeps in docs/performance.md
# (H200, bf16, fwd + bwd): with the tail chunk in its own tile, 4 x 8 x 2 is fastest at L = 257 (MV_Hybrid
# and Vim at 256 px) and at L = 50 (112 px), 5-13% ahead of 2 x 16 x 2, so one rule serves every length. The
# chunk length is a power of two (the scan's width); the channels per program at most BD, and they must
# divide a B/C group's channels. LAUNCH, when set, replaces the rule
# (benchmarks/bench_gpu.py sweeps it).
LAUNCH = None


def _config():
    return LAUNCH or (4, 8, 2)


@triton.jit
def _affine(a1, b1, a2, b2):
    # Composition of h -> a1 h + b1, then h -> a2 h + b2.
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _softplus(x):
    # torch's softplus (threshold 20) with an accurate log1p(e) for small e = exp(-|x|).
    e = tl.exp(-tl.abs(x))
    lp = tl.where(e < 1e-2, e * (1.0 - e * (0.5 - e / 3.0)), tl.log(1.0 + e))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + lp)


@triton.jit
def _per_channel(ptr, offs_d, mask_d, PRESENT: tl.constexpr, BD: tl.constexpr):
    # An optional (d,) vector (D, delta_bias) as fp32; zeros when absent.
    v = tl.zeros([BD], dtype=tl.float32)
    if PRESENT:
        v = tl.load(ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return v


@triton.jit
def _delta(dt_ptr, bias, ptr, m2, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    raw = tl.load(dt_ptr + ptr, mask=m2, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[:, None]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return tl.where(m2, dt, 0.0), raw


LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _last(x, offs_t, j):
    # x[..., j] of a (BD, BN, T) register tile, j a compile-time or runtime index.
    return tl.sum(tl.where(offs_t[None, None, :] == j, x, 0.0), axis=2)


@triton.jit
def _fwd_chunk(u_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, out_ptr, ckpt_ptr, carry, t0, L, row, bc_row, state, offs_n,
               mask_d, mask_n, mask_dn, Dv, bias, A2,
               HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, TT: tl.constexpr):
    # One chunk of TT steps from t0; returns the state leaving it.
    offs_t = tl.arange(0, TT)
    t = t0 + offs_t
    mask_t = t < L
    m2 = mask_d[:, None] & mask_t[None, :]
    ptr = row + t[None, :]
    tl.store(ckpt_ptr + state, carry, mask=mask_dn)
    u = tl.load(u_ptr + ptr, mask=m2, other=0.0).to(tl.float32)
    dt, _ = _delta(dt_ptr, bias, ptr, m2, HAS_BIAS, SOFTPLUS)  # 0 past L: decay 1, input 0
    bc = bc_row + offs_n[:, None] * L + t[None, :]
    m_nt = mask_n[:, None] & mask_t[None, :]
    Bt = tl.load(B_ptr + bc, mask=m_nt, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + bc, mask=m_nt, other=0.0).to(tl.float32)
    decay, h = tl.associative_scan(
        (tl.exp2(dt[:, None, :] * A2[:, :, None]), (dt * u)[:, None, :] * Bt[None, :, :]), 2, _affine)
    h += decay * carry[:, :, None]
    y = tl.sum(h * Ct[None, :, :], axis=1) + Dv[:, None] * u
    if HAS_Z:
        z = tl.load(z_ptr + ptr, mask=m2, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(out_ptr + ptr, y.to(out_ptr.dtype.element_ty), mask=m2)
    return _last(h, offs_t, TT - 1)  # steps past L keep the state: the last slot holds h at the chunk's end


@triton.jit
def _scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr, ckpt_ptr,
    L, D, N, chans_per_group, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    T: tl.constexpr, TAIL: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)  # batch offsets can pass 2**31 elements
    pid_d = tl.program_id(1)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    mask_d = offs_d < D
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    row = pid_b * D * L + offs_d[:, None] * L  # u, delta, z, out: contiguous (b, d, l)
    bc_row = (pid_b * (D // chans_per_group) + (pid_d * BD) // chans_per_group) * N * L  # B, C: (b, g, n, l)
    state = offs_d[:, None] * N + offs_n[None, :]
    Dv = _per_channel(D_ptr, offs_d, mask_d, HAS_D, BD)
    bias = _per_channel(bias_ptr, offs_d, mask_d, HAS_BIAS, BD)
    A2 = tl.load(A_ptr + state, mask=mask_dn, other=0.0).to(tl.float32) * LOG2E  # exp(x A) = exp2(x A log2 e)

    carry = tl.zeros([BD, BN], dtype=tl.float32)  # the state entering the chunk
    n_full = L // T
    for c in range(0, n_full):
        carry = _fwd_chunk(u_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, out_ptr, ckpt_ptr + (pid_b * n_chunks + c) * D * N,
                           carry, c * T, L, row, bc_row, state, offs_n, mask_d, mask_n, mask_dn, Dv, bias, A2,
                           HAS_Z, HAS_BIAS, SOFTPLUS, T)
    if TAIL > 0:  # the last L % T steps in a tile of their own size (at L = 257, T = 32: 2 slots, not 32)
        carry = _fwd_chunk(u_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, out_ptr,
                           ckpt_ptr + (pid_b * n_chunks + n_full) * D * N, carry, n_full * T, L, row, bc_row, state,
                           offs_n, mask_d, mask_n, mask_dn, Dv, bias, A2, HAS_Z, HAS_BIAS, SOFTPLUS, TAIL)
    tl.store(last_ptr + pid_b * D * N + state, carry, mask=mask_dn)


@triton.jit
def _bwd_chunk(u_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, dout_ptr, ckpt_ptr, du_ptr, ddt_ptr, dB_ptr, dC_ptr, dz_ptr,
               g_carry, dA, dD, dbias, t0, L, row, bc_row, part_row, state, offs_n, mask_d, mask_n, mask_dn,
               Dv, bias, A, A2,
               HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
               TT: tl.constexpr):
    # One chunk of TT steps from t0, walked backwards; returns dL/dh entering it and the running sums.
    offs_t = tl.arange(0, TT)
    t = t0 + offs_t
    mask_t = t < L
    m2 = mask_d[:, None] & mask_t[None, :]
    ptr = row + t[None, :]
    u = tl.load(u_ptr + ptr, mask=m2, other=0.0).to(tl.float32)
    dt, raw = _delta(dt_ptr, bias, ptr, m2, HAS_BIAS, SOFTPLUS)
    m2_next = mask_d[:, None] & (t + 1 < L)[None, :]
    dt_next, _ = _delta(dt_ptr, bias, ptr + 1, m2_next, HAS_BIAS, SOFTPLUS)  # 0 at L-1: the adjoint's decay is 1
    dout = tl.load(dout_ptr + ptr, mask=m2, other=0.0).to(tl.float32)
    dy = dout
    if HAS_Z:
        z = tl.load(z_ptr + ptr, mask=m2, other=0.0).to(tl.float32)
        sz = tl.sigmoid(z)
        dy = dout * z * sz
    h_start = tl.load(ckpt_ptr + state, mask=mask_dn, other=0.0)
    bc = bc_row + offs_n[:, None] * L + t[None, :]
    m_nt = mask_n[:, None] & mask_t[None, :]
    Bt = tl.load(B_ptr + bc, mask=m_nt, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + bc, mask=m_nt, other=0.0).to(tl.float32)
    w = dt * u
    inp = w[:, None, :] * Bt[None, :, :]
    decay, h = tl.associative_scan((tl.exp2(dt[:, None, :] * A2[:, :, None]), inp), 2, _affine)
    h += decay * h_start[:, :, None]
    pdecay, g = tl.associative_scan(
        (tl.exp2(dt_next[:, None, :] * A2[:, :, None]), dy[:, None, :] * Ct[None, :, :]), 2, _affine, reverse=True)
    g += pdecay * g_carry[:, :, None]
    tl.store(dC_ptr + part_row + bc - bc_row, tl.sum(h * dy[:, None, :], axis=0), mask=m_nt)
    tl.store(dB_ptr + part_row + bc - bc_row, tl.sum(g * w[:, None, :], axis=0), mask=m_nt)
    dw = tl.sum(g * Bt[None, :, :], axis=1)
    dlog = g * (h - inp)  # g_t * exp(delta_t A) h_{t-1}
    ddt = tl.sum(dlog * A[:, :, None], axis=1) + dw * u
    dA += tl.sum(dlog * dt[:, None, :], axis=2)
    y = tl.sum(h * Ct[None, :, :], axis=1) + Dv[:, None] * u
    du = dw * dt + Dv[:, None] * dy
    if HAS_D:
        dD += tl.sum(dy * u, axis=1)
    if SOFTPLUS:
        ddt = ddt * tl.sigmoid(raw)
    ddt = tl.where(m2, ddt, 0.0)
    if HAS_BIAS:
        dbias += tl.sum(ddt, axis=1)
    tl.store(du_ptr + ptr, du.to(du_ptr.dtype.element_ty), mask=m2)
    tl.store(ddt_ptr + ptr, ddt.to(ddt_ptr.dtype.element_ty), mask=m2)
    if HAS_Z:
        dz = dout * y * sz * (1.0 + z * (1.0 - sz))
        tl.store(dz_ptr + ptr, dz.to(dz_ptr.dtype.element_ty), mask=m2)
    return _last(g, offs_t, 0), dA, dD, dbias


@triton.jit
def _scan_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, dlast_ptr, ckpt_ptr,
    du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr,
    L, D, N, chans_per_group, n_chunks, n_dblocks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    T: tl.constexpr, TAIL: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    mask_d = offs_d < D
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    row = pid_b * D * L + offs_d[:, None] * L
    bc_row = (pid_b * (D // chans_per_group) + (pid_d * BD) // chans_per_group) * N * L
    state = offs_d[:, None] * N + offs_n[None, :]
    part_row = (pid_b * n_dblocks + pid_d) * N * L  # this program's partial sums of dB, dC: (b, d-blocks, n, l)
    Dv = _per_channel(D_ptr, offs_d, mask_d, HAS_D, BD)
    bias = _per_channel(bias_ptr, offs_d, mask_d, HAS_BIAS, BD)
    A = tl.load(A_ptr + state, mask=mask_dn, other=0.0).to(tl.float32)
    A2 = A * LOG2E

    g_carry = tl.load(dlast_ptr + pid_b * D * N + state, mask=mask_dn, other=0.0).to(tl.float32)  # dL/dh after the chunk
    dA = tl.zeros([BD, BN], dtype=tl.float32)
    dD = tl.zeros([BD], dtype=tl.float32)
    dbias = tl.zeros([BD], dtype=tl.float32)
    n_full = L // T
    if TAIL > 0:  # the last chunk comes first going backwards
        g_carry, dA, dD, dbias = _bwd_chunk(
            u_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, dout_ptr, ckpt_ptr + (pid_b * n_chunks + n_full) * D * N,
            du_ptr, ddt_ptr, dB_ptr, dC_ptr, dz_ptr, g_carry, dA, dD, dbias, n_full * T, L, row, bc_row, part_row,
            state, offs_n, mask_d, mask_n, mask_dn, Dv, bias, A, A2, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, TAIL)
    for cc in range(0, n_full):
        c = n_full - 1 - cc
        g_carry, dA, dD, dbias = _bwd_chunk(
            u_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, dout_ptr, ckpt_ptr + (pid_b * n_chunks + c) * D * N,
            du_ptr, ddt_ptr, dB_ptr, dC_ptr, dz_ptr, g_carry, dA, dD, dbias, c * T, L, row, bc_row, part_row,
            state, offs_n, mask_d, mask_n, mask_dn, Dv, bias, A, A2, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, T)
    tl.atomic_add(dA_ptr + state, dA, mask=mask_dn)
    if HAS_D:
        tl.atomic_add(dD_ptr + offs_d, dD, mask=mask_d)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + offs_d, dbias, mask=mask_d)


def _block_d(chans_per_group: int, bd: int) -> int:
    """The largest power of two up to ``bd`` that divides a group's channels (a program stays in one group)."""
    while chans_per_group % bd:
        bd //= 2
    return bd


def _launch(u, A, B, D, z, delta_bias, delta_softplus):
    """Grid, chunk count, channels per B/C group and the kernels' compile-time arguments."""
    b, d, l = u.shape
    n, groups = A.shape[1], B.shape[1]
    cpg = d // groups
    bd, chunk, warps = _config()
    bd = _block_d(cpg, bd)
    meta = dict(T=chunk, TAIL=_tail(l, chunk), BD=bd, BN=max(triton.next_power_of_2(n), 2), num_warps=warps,
                HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus)
    return (b, triton.cdiv(d, bd)), triton.cdiv(l, chunk), cpg, meta


def _tail(length: int, chunk: int) -> int:
    """Tile size of the last, partial chunk (0 when ``chunk`` divides ``length``): a power of two, at least 2."""
    rest = length % chunk
    return max(triton.next_power_of_2(rest), 2) if rest else 0


def _contiguous(*tensors):
    return [t.contiguous() if t is not None else None for t in tensors]


def _or_dummy(t, like):
    # The kernels take a pointer for every optional input; an absent one gets a placeholder it never reads.
    return t if t is not None else like.new_empty(1, dtype=torch.float32)


# Triton's CPU interpreter (the CPU tests) turns @triton.jit kernels into plain functions that wrap_triton cannot
# trace; there the two operators are opaque custom ops with explicit fake implementations instead.
_INTERPRETED = _triton_interpreted()


def _operator(name):
    return (torch.library.custom_op if _INTERPRETED else torch.library.triton_op)(name, mutates_args=())


# The kernels are registered as PyTorch operators (forward, backward, and the autograd rule joining them) with
# torch.library.triton_op, so torch.compile traces a model through the scan instead of breaking its graph there.
# Unlike an opaque custom_op, inductor also sees inside: its generated code allocates the buffers and launches
# the two kernels itself, without the Python operator call per use (about 0.3 ms of host time per forward and
# 0.6 ms per backward in the compiled DINOv2 step, H200 trace at 26a83a3, where the step waits on the host).
@_operator("mambavision::selective_scan_triton_fwd")
def _fwd_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
            D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
            delta_softplus: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, delta, A, B, C, z = _contiguous(u, delta, A, B, C, z)
    out, last, ckpt = _fwd_outputs(u, A)
    grid, n_chunks, cpg, meta = _launch(u, A, B, D, z, delta_bias, delta_softplus)
    torch.library.wrap_triton(_scan_fwd_kernel)[grid](
        u, delta, A, B, C, _or_dummy(D, u), _or_dummy(z, u), _or_dummy(delta_bias, u), out, last, ckpt,
        u.shape[2], u.shape[1], A.shape[1], cpg, n_chunks, **meta,
    )
    return out, last, ckpt


def _fwd_outputs(u, A):
    b, d, l = u.shape
    n = A.shape[1]
    f32 = dict(dtype=torch.float32)
    n_chunks = triton.cdiv(l, _config()[1])
    # out, the last state, and the state entering every chunk (what the backward restarts from)
    return (u.new_empty((b, d, l)), u.new_empty((b, d, n), **f32), u.new_empty((b, n_chunks, d, n), **f32))


@_operator("mambavision::selective_scan_triton_bwd")
def _bwd_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
            D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
            ckpt: torch.Tensor, dout: torch.Tensor, dlast: torch.Tensor, delta_softplus: bool) -> List[torch.Tensor]:
    u, delta, A, B, C, z = _contiguous(u, delta, A, B, C, z)
    b, d, l = u.shape
    n, groups = A.shape[1], B.shape[1]
    grid, n_chunks, cpg, meta = _launch(u, A, B, D, z, delta_bias, delta_softplus)
    dout, dlast = dout.contiguous(), dlast.to(torch.float32).contiguous()
    f32 = dict(dtype=torch.float32)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else None
    dA = torch.zeros_like(A, **f32)
    # Per-program partial sums over its channels (no atomics: deterministic, no contention), reduced below.
    dB_part = u.new_empty((b, grid[1], n, l), **f32)
    dC_part = u.new_empty((b, grid[1], n, l), **f32)
    dD = torch.zeros_like(D, **f32) if D is not None else None
    dbias = torch.zeros_like(delta_bias, **f32) if delta_bias is not None else None
    opt = lambda t: _or_dummy(t, u)  # noqa: E731
    torch.library.wrap_triton(_scan_bwd_kernel)[grid](
        u, delta, A, B, C, opt(D), opt(z), opt(delta_bias), dout, dlast, ckpt,
        du, ddelta, dA, dB_part, dC_part, opt(dD), opt(dz), opt(dbias),
        l, d, n, cpg, n_chunks, grid[1], **meta,
    )
    dB = dB_part.view(b, groups, grid[1] // groups, n, l).sum(2)
    dC = dC_part.view(b, groups, grid[1] // groups, n, l).sum(2)
    # A custom op cannot return None: an absent input's gradient is an empty tensor, dropped in _backward.
    cast = lambda g, like: g.to(like.dtype) if like is not None else u.new_empty(0)  # noqa: E731
    return [du, ddelta, cast(dA, A), cast(dB, B), cast(dC, C), cast(dD, D), dz if z is not None else u.new_empty(0),
            cast(dbias, delta_bias)]


if _INTERPRETED:
    _fwd_op.register_fake(lambda u, delta, A, B, C, D, z, delta_bias, delta_softplus: _fwd_outputs(u, A))

    @_bwd_op.register_fake
    def _bwd_fake(u, delta, A, B, C, D, z, delta_bias, ckpt, dout, dlast, delta_softplus):
        like = lambda t: torch.empty_like(t) if t is not None else u.new_empty(0)  # noqa: E731
        return [like(u), like(delta), like(A), like(B), like(C), like(D), like(z), like(delta_bias)]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.delta_softplus = delta_softplus
    ctx.mark_non_differentiable(output[2])


def _backward(ctx, dout, dlast, _dckpt):
    u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
    # autograd materialises an unused output's gradient as zeros, so neither is None here
    grads = _bwd_op(u, delta, A, B, C, D, z, delta_bias, ckpt, dout, dlast, ctx.delta_softplus)
    present = (u, delta, A, B, C, D, z, delta_bias)
    return (*[g if x is not None else None for g, x in zip(grads, present)], None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def triton_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """``(out, last_state)`` of the fused selective scan on the Triton kernels.

    u, delta, z: (b, d, l), any of fp32/bf16/fp16; A: (d, n); B, C: (b, g, n, l) with g dividing d;
    D, delta_bias: (d,) or None; z may be None. Returns ``out`` in u's dtype and the last state
    (b, d, n) in fp32. Gradients come back in each input's dtype.
    """
    out, last, _ = _fwd_op(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
    return out, last
