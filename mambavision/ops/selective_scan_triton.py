"""The project's Triton kernel for the Mamba-1 selective scan: the middle step of the dispatch
(mamba-ssm's CUDA extension -> this kernel -> the chunked PyTorch scan), for GPUs where mamba-ssm
does not build.

It computes the whole of mamba-ssm's ``selective_scan_fn`` in one pass, as mamba-ssm's kernel does:

    delta = softplus(delta + delta_bias)
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,      y_t = <C_t, h_t> + D * u_t,
    out = y * silu(z)

and returns ``(out, h_L)``. One program owns one batch element and ``BD`` channels, and holds their
(states x channels) state tile in registers: one channel per thread, with all its states. It walks the
sequence one step at a time, sequential in each thread as mamba-ssm's threads are over their own runs of
steps. So the forward has no cross-lane work at all (the sum over states for ``y`` stays in the thread),
where a parallel scan in Triton spreads the time axis over lanes and pays a round of shuffles per level of
``tl.associative_scan`` (the earlier kernel of this file). The batch and channel axes give the parallelism
(64 x 384 threads at MV_Hybrid's 256 px). The per-step loads are single elements of the (b, d, l) rows;
consecutive steps hit the same cache lines.

Forward stores the state entering every chunk of ``K`` steps (B*D*N*L/K floats). Backward walks the
chunks from the end: it recomputes the chunk's states from that start state into a per-program scratch
tile (K x BD x BN floats, small enough to stay in L2), then walks the chunk backwards, running the
adjoint recurrence

    g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}

and forming every gradient from ``h_t`` and ``g_t``; only the sums over channels (dB, dC) cross lanes.
The decay's gradient uses ``exp(delta_t A) h_{t-1} = h_t - delta_t B_t u_t``, so no shifted state is
needed. The gradients of B
and C are sums over the channels of a group: each program writes its partial sum and PyTorch adds them
(deterministic). Those of A, D and delta_bias are sums over the batch, accumulated with fp32 atomics once
per program, so they are not bit-reproducible from run to run.

Needs ``triton``. With ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on
CPU tensors through Triton's interpreter, which is how the CPU test suite checks them.
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .selective_scan import _triton_interpreted

# Launch configuration (channels per program, steps per checkpointed chunk, warps), from the sweep in
# docs/performance.md. The channels per program are a power of two; they shrink to divide a B/C group's
# channels. LAUNCH, when set, replaces the rule (benchmarks/bench_gpu.py sweeps it).
LAUNCH = None


def _config():
    return LAUNCH or (32, 8, 1)


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
def _delta(dt_ptr, bias, ptr, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    # delta at one step, and the pre-activation (for softplus' derivative)
    raw = tl.load(dt_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return dt, raw


@triton.jit
def _step_inputs(u_ptr, dt_ptr, B_ptr, row, bc, t, mask_d, mask_n, bias, HAS_BIAS: tl.constexpr,
                 SOFTPLUS: tl.constexpr):
    # What step t of the recurrence reads: u and delta per channel, B per state; and delta's pre-activation.
    u = tl.load(u_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
    dt, raw = _delta(dt_ptr, bias, row + t, mask_d, HAS_BIAS, SOFTPLUS)
    Bt = tl.load(B_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)
    return u, dt, raw, Bt


LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr, ckpt_ptr,
    L, D, N, chans_per_group, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    K: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
):
    # Layouts: u, delta, z, out (b, d, l); A (n, d); B, C (b, g, n, l); the state tile (n, d). Triton lays the
    # tile out as the (n, d) loads of A and the checkpoints: one channel per thread with all its states, so the
    # sums over states stay inside the thread (A read as (d, n) would spread the states over lanes).
    pid_b = tl.program_id(0).to(tl.int64)  # batch offsets can pass 2**31 elements
    pid_d = tl.program_id(1)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    mask_d = offs_d < D
    mask_n = offs_n < N
    mask_nd = mask_n[:, None] & mask_d[None, :]
    row = pid_b * D * L + offs_d * L
    bc = (pid_b * (D // chans_per_group) + (pid_d * BD) // chans_per_group) * N * L + offs_n * L
    state = offs_n[:, None] * D + offs_d[None, :]  # (n, d), in A and in the checkpoints (b, chunk, n, d)
    Dv = _per_channel(D_ptr, offs_d, mask_d, HAS_D, BD)
    bias = _per_channel(bias_ptr, offs_d, mask_d, HAS_BIAS, BD)
    A2 = tl.load(A_ptr + state, mask=mask_nd, other=0.0).to(tl.float32) * LOG2E  # exp(x A) = exp2(x A log2 e)

    h = tl.zeros([BN, BD], dtype=tl.float32)  # masked lanes stay 0: their A, u and B load as 0
    for c in range(0, n_chunks):
        tl.store(ckpt_ptr + (pid_b * n_chunks + c) * N * D + state, h, mask=mask_nd)  # the backward restarts here
        for t in range(c * K, tl.minimum(c * K + K, L)):
            u, dt, _, Bt = _step_inputs(u_ptr, dt_ptr, B_ptr, row, bc, t, mask_d, mask_n, bias, HAS_BIAS, SOFTPLUS)
            Ct = tl.load(C_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)
            h = tl.exp2(dt[None, :] * A2) * h + Bt[:, None] * (dt * u)[None, :]
            y = tl.sum(h * Ct[:, None], axis=0) + Dv * u
            if HAS_Z:
                z = tl.load(z_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
                y = y * z * tl.sigmoid(z)
            tl.store(out_ptr + row + t, y.to(out_ptr.dtype.element_ty), mask=mask_d)
    tl.store(last_ptr + pid_b * D * N + offs_d[None, :] * N + offs_n[:, None], h, mask=mask_nd)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, dlast_ptr, ckpt_ptr, scratch_ptr,
    du_ptr, ddt_ptr, sums_ptr, parts_ptr, dz_ptr,
    L, D, N, chans_per_group, n_chunks, n_dblocks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    K: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, HAS_DLAST: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    mask_d = offs_d < D
    mask_n = offs_n < N
    mask_nd = mask_n[:, None] & mask_d[None, :]
    row = pid_b * D * L + offs_d * L
    bc = (pid_b * (D // chans_per_group) + (pid_d * BD) // chans_per_group) * N * L + offs_n * L
    # This program's partial dB and dC; parts is (2, b, d-blocks, n, l), and dC is its second half.
    part = (pid_b * n_dblocks + pid_d) * N * L + offs_n * L
    dC_ptr = parts_ptr + tl.num_programs(0).to(tl.int64) * n_dblocks * N * L
    state = offs_n[:, None] * D + offs_d[None, :]
    # this program's scratch: the chunk's states, (K, BN, BD) fp32, laid out as the tile so each thread rereads its own
    tile = (pid_b * n_dblocks + pid_d) * K * BN * BD + offs_n[:, None] * BD + tl.arange(0, BD)[None, :]
    Dv = _per_channel(D_ptr, offs_d, mask_d, HAS_D, BD)
    bias = _per_channel(bias_ptr, offs_d, mask_d, HAS_BIAS, BD)
    A = tl.load(A_ptr + state, mask=mask_nd, other=0.0).to(tl.float32)
    A2 = A * LOG2E

    g = tl.zeros([BN, BD], dtype=tl.float32)  # dL/dh after step t
    if HAS_DLAST:  # (b, n, d), as the tile (a (d, n) load would pull the loop's tiles into its layout)
        g = tl.load(dlast_ptr + pid_b * N * D + state, mask=mask_nd, other=0.0)
    decay_next = tl.full([BN, BD], 1.0, dtype=tl.float32)  # exp(delta_{t+1} A); past the end, dlast enters as is
    dA = tl.zeros([BN, BD], dtype=tl.float32)
    dD = tl.zeros([BD], dtype=tl.float32)
    dbias = tl.zeros([BD], dtype=tl.float32)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        t0 = c * K
        t1 = tl.minimum(t0 + K, L)
        h = tl.load(ckpt_ptr + (pid_b * n_chunks + c) * N * D + state, mask=mask_nd, other=0.0)
        for t in range(t0, t1):  # recompute the chunk's states
            u, dt, _, Bt = _step_inputs(u_ptr, dt_ptr, B_ptr, row, bc, t, mask_d, mask_n, bias, HAS_BIAS, SOFTPLUS)
            h = tl.exp2(dt[None, :] * A2) * h + Bt[:, None] * (dt * u)[None, :]
            tl.store(scratch_ptr + tile + (t - t0) * BN * BD, h)
        for s in range(0, t1 - t0):  # then walk it backwards
            t = t1 - 1 - s
            h = tl.load(scratch_ptr + tile + (t - t0) * BN * BD)
            u, dt, raw, Bt = _step_inputs(u_ptr, dt_ptr, B_ptr, row, bc, t, mask_d, mask_n, bias, HAS_BIAS, SOFTPLUS)
            Ct = tl.load(C_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)
            dout = tl.load(dout_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            dy = dout
            if HAS_Z:
                z = tl.load(z_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
                sz = tl.sigmoid(z)
                dy = dout * z * sz
            g = decay_next * g + Ct[:, None] * dy[None, :]
            w = dt * u
            inp = Bt[:, None] * w[None, :]
            tl.store(dC_ptr + part + t, tl.sum(h * dy[None, :], axis=1), mask=mask_n)
            tl.store(parts_ptr + part + t, tl.sum(g * w[None, :], axis=1), mask=mask_n)
            dw = tl.sum(g * Bt[:, None], axis=0)
            dlog = g * (h - inp)  # g_t * exp(delta_t A) h_{t-1}
            ddt = tl.sum(dlog * A, axis=0) + dw * u
            dA += dlog * dt[None, :]
            du = dw * dt + Dv * dy
            if HAS_D:
                dD += dy * u
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(raw)
            ddt = tl.where(mask_d, ddt, 0.0)
            if HAS_BIAS:
                dbias += ddt
            tl.store(du_ptr + row + t, du.to(du_ptr.dtype.element_ty), mask=mask_d)
            tl.store(ddt_ptr + row + t, ddt.to(ddt_ptr.dtype.element_ty), mask=mask_d)
            if HAS_Z:
                y = tl.sum(h * Ct[:, None], axis=0) + Dv * u
                dz = dout * y * sz * (1.0 + z * (1.0 - sz))
                tl.store(dz_ptr + row + t, dz.to(dz_ptr.dtype.element_ty), mask=mask_d)
            decay_next = tl.exp2(dt[None, :] * A2)
    # sums holds dA (n, d), then dD, then dbias (see _split_sums)
    tl.atomic_add(sums_ptr + state, dA, mask=mask_nd)
    if HAS_D:
        tl.atomic_add(sums_ptr + N * D + offs_d, dD, mask=mask_d)
    if HAS_BIAS:
        tl.atomic_add(sums_ptr + N * D + D + offs_d, dbias, mask=mask_d)


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
    meta = dict(K=chunk, BD=bd, BN=max(triton.next_power_of_2(n), 2), num_warps=warps,
                HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus)
    return (b, triton.cdiv(d, bd)), triton.cdiv(l, chunk), cpg, meta


def _contiguous(*tensors):
    return [t.contiguous() if t is not None else None for t in tensors]


def _fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, launch):
    """Launch the forward kernel; ``launch(kernel, grid)`` is how (directly, or through wrap_triton when traced).
    Returns out, the last state, the chunk checkpoints and A as (n, d), which the backward reuses."""
    u, delta, B, C, z = _contiguous(u, delta, B, C, z)
    out, last, ckpt = _fwd_outputs(u, A)
    grid, n_chunks, cpg, meta = _launch(u, A, B, D, z, delta_bias, delta_softplus)
    A_nd = A.t().contiguous()  # (n, d), the kernels' layout of the state tile
    # An absent optional input is passed as u: its flag is off, so the kernel never reads it.
    launch(_scan_fwd_kernel, grid)(
        u, delta, A_nd, B, C, _or(D, u), _or(z, u), _or(delta_bias, u), out, last, ckpt,
        u.shape[2], u.shape[1], A.shape[1], cpg, n_chunks, **meta,
    )
    return out, last, ckpt, A_nd


def _or(t, fallback):
    return fallback if t is None else t


def _fwd_outputs(u, A):
    b, d, l = u.shape
    n = A.shape[1]
    f32 = dict(dtype=torch.float32)
    n_chunks = triton.cdiv(l, _config()[1])
    # out, the last state, and the state entering every chunk (what the backward restarts from)
    return (u.new_empty((b, d, l)), u.new_empty((b, d, n), **f32), u.new_empty((b, n_chunks, n, d), **f32))


def _bwd(u, delta, A, A_nd, B, C, D, z, delta_bias, ckpt, dout, dlast, delta_softplus, launch):
    """Launch the backward kernel. Returns du, ddelta, dz (empty when z is absent), the fp32 sums of dA, dD and
    dbias in one buffer, and dB, dC stacked: a custom op's outputs may not alias each other, so ``_grads`` splits
    them. dlast may be None (the last state unused)."""
    u, delta, B, C, z, dout = _contiguous(u, delta, B, C, z, dout)
    b, d, l = u.shape
    n, groups = A.shape[1], B.shape[1]
    grid, n_chunks, cpg, meta = _launch(u, A, B, D, z, delta_bias, delta_softplus)
    if dlast is not None:
        dlast = dlast.to(torch.float32).transpose(1, 2).contiguous()  # (b, n, d), as the tile
    f32 = dict(dtype=torch.float32)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else None
    # dA (n, d), dD and dbias, summed over the batch by atomics: one zeroed buffer (each op costs host time)
    sums = u.new_zeros((n * d + 2 * d,), **f32)
    # Per-program partial sums of dB and dC over its channels (no atomics: deterministic), reduced below.
    parts = u.new_empty((2, b, grid[1], n, l), **f32)
    # Both go to the kernel whole, never as views: inductor clones a view that a user kernel writes, and in
    # torch 2.11 it built those clones of slices of one new_zeros buffer by reading past the slice's own
    # allocation (wrong dD and dbias, and an illegal memory access in the compiled mv_hybrid step; H200, 60fb7e9).
    scratch = u.new_empty((b * grid[1] * meta["K"] * meta["BD"] * meta["BN"],), **f32)  # each program's chunk states
    launch(_scan_bwd_kernel, grid)(
        u, delta, A_nd, B, C, _or(D, u), _or(z, u), _or(delta_bias, u), dout, _or(dlast, u), ckpt, scratch,
        du, ddelta, sums, parts, _or(dz, u),
        l, d, n, cpg, n_chunks, grid[1], HAS_DLAST=dlast is not None, **meta,
    )
    dBC = parts.view(2, b, groups, grid[1] // groups, n, l).sum(3).to(B.dtype)
    return [du, ddelta, dz if z is not None else u.new_empty(0), sums, dBC]


def _split_sums(sums, n, d):
    """dA (n, d), dD and dbias: views of the one fp32 buffer the backward's atomics add into."""
    return sums[:n * d].view(n, d), sums[n * d:n * d + d], sums[n * d + d:]


def _grads(raw, A, C, D, z, delta_bias):
    """The eight inputs' gradients from ``_bwd``'s outputs, None for an absent input."""
    du, ddelta, dz, sums, dBC = raw
    dA, dD, dbias = _split_sums(sums, *A.t().shape)
    cast = lambda g, like: g.to(like.dtype) if like is not None else None  # noqa: E731
    return (du, ddelta, dA.t().to(A.dtype), dBC[0], dBC[1].to(C.dtype), cast(dD, D),
            dz if z is not None else None, cast(dbias, delta_bias))


def _direct(kernel, grid):
    return kernel[grid]


def _traceable(kernel, grid):
    return torch.library.wrap_triton(kernel)[grid]


class _SelectiveScan(torch.autograd.Function):
    """The eager path: the kernels launched straight from autograd. A custom operator's dispatch, argument
    checks and autograd wrapper cost more host time than the kernels' GPU time at MV_Hybrid's shapes, and an
    eager step waits on the host."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        out, last, ckpt, A_nd = _fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, _direct)
        ctx.save_for_backward(u, delta, A, A_nd, B, C, D, z, delta_bias, ckpt)
        ctx.delta_softplus = delta_softplus
        ctx.set_materialize_grads(False)  # an unused last state comes as None: the kernel skips it
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, A_nd, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        dout = torch.zeros_like(u) if dout is None else dout
        raw = _bwd(u, delta, A, A_nd, B, C, D, z, delta_bias, ckpt, dout, dlast, ctx.delta_softplus, _direct)
        return (*_grads(raw, A, C, D, z, delta_bias), None)


# Triton's CPU interpreter (the CPU tests) turns @triton.jit kernels into plain functions that wrap_triton cannot
# trace; there the two operators are opaque custom ops with explicit fake implementations instead.
_INTERPRETED = _triton_interpreted()


def _operator(name):
    return (torch.library.custom_op if _INTERPRETED else torch.library.triton_op)(name, mutates_args=())


# Under torch.compile the kernels are PyTorch operators (forward, backward, and the autograd rule joining them),
# registered with torch.library.triton_op, so dynamo traces a model through the scan instead of breaking its graph
# there. Unlike an opaque custom_op, inductor also sees inside: its generated code allocates the buffers and
# launches the two kernels itself, without the Python operator call per use (about 0.3 ms of host time per forward
# and 0.6 ms per backward in the compiled DINOv2 step, H200 trace at 26a83a3, where the step waits on the host).
@_operator("mambavision::selective_scan_triton_fwd")
def _fwd_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
            D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
            delta_softplus: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, _traceable)[:3]


@_operator("mambavision::selective_scan_triton_bwd")
def _bwd_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
            D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
            ckpt: torch.Tensor, dout: torch.Tensor, dlast: torch.Tensor, delta_softplus: bool) -> List[torch.Tensor]:
    return _bwd(u, delta, A, A.t().contiguous(), B, C, D, z, delta_bias, ckpt, dout, dlast, delta_softplus, _traceable)


if _INTERPRETED:
    _fwd_op.register_fake(lambda u, delta, A, B, C, D, z, delta_bias, delta_softplus: _fwd_outputs(u, A))

    @_bwd_op.register_fake
    def _bwd_fake(u, delta, A, B, C, D, z, delta_bias, ckpt, dout, dlast, delta_softplus):
        d, n = A.shape
        return [torch.empty_like(u), torch.empty_like(delta), torch.empty_like(z) if z is not None else u.new_empty(0),
                u.new_empty((n * d + 2 * d,), dtype=torch.float32), B.new_empty((2,) + tuple(B.shape))]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.delta_softplus = delta_softplus
    ctx.mark_non_differentiable(output[2])


def _backward(ctx, dout, dlast, _dckpt):
    u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
    # autograd materialises an unused output's gradient as zeros, so neither is None here
    raw = _bwd_op(u, delta, A, B, C, D, z, delta_bias, ckpt, dout, dlast, ctx.delta_softplus)
    return (*_grads(raw, A, C, D, z, delta_bias), None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def triton_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """``(out, last_state)`` of the fused selective scan on the Triton kernels.

    u, delta, z: (b, d, l), any of fp32/bf16/fp16; A: (d, n); B, C: (b, g, n, l) with g dividing d;
    D, delta_bias: (d,) or None; z may be None. Returns ``out`` in u's dtype and the last state
    (b, d, n) in fp32. Gradients come back in each input's dtype.
    """
    if torch.compiler.is_compiling():
        out, last, _ = _fwd_op(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
        return out, last
    return _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
