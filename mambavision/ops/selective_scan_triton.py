"""The project's Triton kernel for the Mamba-1 selective scan: the middle step of the dispatch
(mamba-ssm's CUDA extension -> this kernel -> the chunked PyTorch scan), for GPUs where mamba-ssm
does not build.

It computes the whole of mamba-ssm's ``selective_scan_fn`` in one pass, as mamba-ssm's kernel does:

    delta = softplus(delta + delta_bias)
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,      y_t = <C_t, h_t> + D * u_t,
    out = y * silu(z)

and returns ``(out, h_L)``. One program owns one batch element and ``BD`` channels, and walks the
sequence in chunks of ``T`` steps. Within a chunk the recurrence is parallel in time: for each state
index the pairs ``(exp(delta A), delta B u)`` are combined with ``tl.associative_scan`` (the affine
maps compose), and the state entering the chunk is added through the cumulative decay. So the
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
import torch
import triton
import triton.language as tl

# Launch configuration (module globals, read at each launch, so benchmarks/bench_gpu.py can sweep them).
# Defaults from the sweep in docs/performance.md (H200, bf16): 16 x 32 x 4 was fastest fwd+bwd at MV_Hybrid's
# 112-px and Vim's shapes and within 1% of the best at MV_Hybrid's 256-px shape.
CHUNK = 32  # time steps per chunk: a power of two (the scan's width); 257 tokens -> 9 chunks
BLOCK_D = 16  # channels per program (at most; it must divide the channels of one B/C group)
NUM_WARPS = 4


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
def _column(tile, offs, j):
    # tile[:, j] of a register tile, j a runtime index.
    return tl.sum(tl.where(offs[None, :] == j, tile, 0.0), axis=1)


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


@triton.jit
def _scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr, ckpt_ptr,
    L, D, N, chans_per_group, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    T: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)  # batch offsets can pass 2**31 elements
    pid_d = tl.program_id(1)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_t = tl.arange(0, T)
    offs_n = tl.arange(0, BN)
    mask_d = offs_d < D
    mask_dn = mask_d[:, None] & (offs_n < N)[None, :]
    row = pid_b * D * L + offs_d[:, None] * L  # u, delta, z, out: contiguous (b, d, l)
    bc_row = (pid_b * (D // chans_per_group) + (pid_d * BD) // chans_per_group) * N * L  # B, C: (b, g, n, l)
    state = offs_d[:, None] * N + offs_n[None, :]
    Dv = _per_channel(D_ptr, offs_d, mask_d, HAS_D, BD)
    bias = _per_channel(bias_ptr, offs_d, mask_d, HAS_BIAS, BD)

    carry = tl.zeros([BD, BN], dtype=tl.float32)  # the state entering the chunk
    for c in range(0, n_chunks):
        t = c * T + offs_t
        mask_t = t < L
        m2 = mask_d[:, None] & mask_t[None, :]
        ptr = row + t[None, :]
        tl.store(ckpt_ptr + (pid_b * n_chunks + c) * D * N + state, carry, mask=mask_dn)
        u = tl.load(u_ptr + ptr, mask=m2, other=0.0).to(tl.float32)
        dt, _ = _delta(dt_ptr, bias, ptr, m2, HAS_BIAS, SOFTPLUS)  # 0 past L: decay 1, input 0
        w = dt * u
        y = Dv[:, None] * u
        for n in range(0, N):
            A_n = tl.load(A_ptr + offs_d * N + n, mask=mask_d, other=0.0).to(tl.float32)
            B_n = tl.load(B_ptr + bc_row + n * L + t, mask=mask_t, other=0.0).to(tl.float32)
            C_n = tl.load(C_ptr + bc_row + n * L + t, mask=mask_t, other=0.0).to(tl.float32)
            decay, h = tl.associative_scan((tl.exp(dt * A_n[:, None]), w * B_n[None, :]), 1, _affine)
            h += decay * _column(carry, offs_n, n)[:, None]
            y += h * C_n[None, :]
            carry = tl.where(offs_n[None, :] == n, _column(h, offs_t, T - 1)[:, None], carry)
        if HAS_Z:
            z = tl.load(z_ptr + ptr, mask=m2, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + ptr, y.to(out_ptr.dtype.element_ty), mask=m2)
    tl.store(last_ptr + pid_b * D * N + state, carry, mask=mask_dn)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, dlast_ptr, ckpt_ptr,
    du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr,
    L, D, N, chans_per_group, n_chunks, n_dblocks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    T: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_t = tl.arange(0, T)
    offs_n = tl.arange(0, BN)
    mask_d = offs_d < D
    mask_dn = mask_d[:, None] & (offs_n < N)[None, :]
    row = pid_b * D * L + offs_d[:, None] * L
    bc_row = (pid_b * (D // chans_per_group) + (pid_d * BD) // chans_per_group) * N * L
    state = offs_d[:, None] * N + offs_n[None, :]
    part_row = (pid_b * n_dblocks + pid_d) * N * L  # this program's partial sums of dB, dC: (b, d-blocks, n, l)
    Dv = _per_channel(D_ptr, offs_d, mask_d, HAS_D, BD)
    bias = _per_channel(bias_ptr, offs_d, mask_d, HAS_BIAS, BD)

    g_carry = tl.load(dlast_ptr + pid_b * D * N + state, mask=mask_dn, other=0.0).to(tl.float32)  # dL/dh after the chunk
    dA = tl.zeros([BD, BN], dtype=tl.float32)
    dD = tl.zeros([BD], dtype=tl.float32)
    dbias = tl.zeros([BD], dtype=tl.float32)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        t = c * T + offs_t
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
        h_start = tl.load(ckpt_ptr + (pid_b * n_chunks + c) * D * N + state, mask=mask_dn, other=0.0)
        w = dt * u
        dw = tl.zeros([BD, T], dtype=tl.float32)  # dL/d(delta u) summed over the states
        ddt_decay = tl.zeros([BD, T], dtype=tl.float32)  # dL/d(delta) through the decay
        y = Dv[:, None] * u  # the pre-gate output, for dz
        for n in range(0, N):
            A_n = tl.load(A_ptr + offs_d * N + n, mask=mask_d, other=0.0).to(tl.float32)
            B_n = tl.load(B_ptr + bc_row + n * L + t, mask=mask_t, other=0.0).to(tl.float32)
            C_n = tl.load(C_ptr + bc_row + n * L + t, mask=mask_t, other=0.0).to(tl.float32)
            inp = w * B_n[None, :]
            decay, h = tl.associative_scan((tl.exp(dt * A_n[:, None]), inp), 1, _affine)
            h += decay * _column(h_start, offs_n, n)[:, None]
            pdecay, g = tl.associative_scan((tl.exp(dt_next * A_n[:, None]), dy * C_n[None, :]), 1, _affine,
                                            reverse=True)
            g += pdecay * _column(g_carry, offs_n, n)[:, None]
            tl.store(dC_ptr + part_row + n * L + t, tl.sum(h * dy, axis=0), mask=mask_t)
            tl.store(dB_ptr + part_row + n * L + t, tl.sum(g * w, axis=0), mask=mask_t)
            dw += g * B_n[None, :]
            dlog = g * (h - inp)  # g_t * exp(delta_t A) h_{t-1}
            ddt_decay += dlog * A_n[:, None]
            dA = tl.where(offs_n[None, :] == n, dA + tl.sum(dlog * dt, axis=1)[:, None], dA)
            y += h * C_n[None, :]
            g_carry = tl.where(offs_n[None, :] == n, _column(g, offs_t, 0)[:, None], g_carry)
        ddt = ddt_decay + dw * u
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
    tl.atomic_add(dA_ptr + state, dA, mask=mask_dn)
    if HAS_D:
        tl.atomic_add(dD_ptr + offs_d, dD, mask=mask_d)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + offs_d, dbias, mask=mask_d)


def _block_d(chans_per_group: int) -> int:
    """The largest power of two up to BLOCK_D that divides a group's channels (a program stays in one group)."""
    bd = BLOCK_D
    while chans_per_group % bd:
        bd //= 2
    return bd


def _launch(u, A, B):
    b, d, l = u.shape
    n, groups = A.shape[1], B.shape[1]
    cpg = d // groups
    bd = _block_d(cpg)
    meta = dict(T=CHUNK, BD=bd, BN=max(triton.next_power_of_2(n), 2), num_warps=NUM_WARPS)
    return (b, triton.cdiv(d, bd)), triton.cdiv(l, CHUNK), cpg, meta


class TritonScan(torch.autograd.Function):
    """``(out, last_state) = TritonScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)``.

    u, delta, z: (b, d, l), any of fp32/bf16/fp16; A: (d, n); B, C: (b, g, n, l) with g dividing d;
    D, delta_bias: (d,) or None; z may be None. Returns ``out`` in u's dtype and the last state
    (b, d, n) in fp32. Gradients come back in each input's dtype.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        u, delta, B, C = u.contiguous(), delta.contiguous(), B.contiguous(), C.contiguous()
        A = A.contiguous()
        z = z.contiguous() if z is not None else None
        b, d, l = u.shape
        n = A.shape[1]
        grid, n_chunks, cpg, meta = _launch(u, A, B)
        out = torch.empty_like(u)
        last = u.new_empty((b, d, n), dtype=torch.float32)
        ckpt = u.new_empty((b, n_chunks, d, n), dtype=torch.float32)
        dummy = u.new_empty(1, dtype=torch.float32)
        _scan_fwd_kernel[grid](
            u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, out, last, ckpt,
            l, d, n, cpg, n_chunks,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus), **meta,
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
        ctx.delta_softplus = bool(delta_softplus)
        return out, last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        b, d, l = u.shape
        n = A.shape[1]
        grid, n_chunks, cpg, meta = _launch(u, A, B)
        # autograd materialises an unused output's gradient as zeros, so neither is None here
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
        dummy = u.new_empty(1, dtype=torch.float32)
        opt = lambda t: t if t is not None else dummy  # noqa: E731
        _scan_bwd_kernel[grid](
            u, delta, A, B, C, opt(D), opt(z), opt(delta_bias), dout, dlast, ckpt,
            du, ddelta, dA, dB_part, dC_part, opt(dD), opt(dz), opt(dbias),
            l, d, n, cpg, n_chunks, grid[1],
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=ctx.delta_softplus, **meta,
        )
        groups = B.shape[1]
        dB = dB_part.view(b, groups, grid[1] // groups, n, l).sum(2)
        dC = dC_part.view(b, groups, grid[1] // groups, n, l).sum(2)
        cast = lambda g, like: g.to(like.dtype) if g is not None else None  # noqa: E731
        return (du, ddelta, cast(dA, A), cast(dB, B), cast(dC, C), cast(dD, D), dz, cast(dbias, delta_bias), None)


def triton_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The fused selective scan on the Triton kernels; see :class:`TritonScan` for the shapes."""
    return TritonScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
