"""The project's Triton kernel for the Mamba-1 selective scan: the middle step of the dispatch
(mamba-ssm's CUDA extension -> this kernel -> the chunked PyTorch scan), for GPUs where mamba-ssm
does not build.

It computes only the core recurrence, as :class:`~mambavision.ops.selective_scan._ChunkedScan` does,

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,      y_t = <C_t, h_t>,

and returns ``(y, h_L)``; the delta bias and softplus, the ``D`` skip and the ``silu(z)`` gate stay in
PyTorch around it (autograd differentiates them). One program owns one batch element and a block of
channels with all their states, and walks the sequence.

Forward stores the state at every chunk start. Backward walks the chunks from the end: it recomputes
one chunk's states into a small per-program scratch buffer, then runs the adjoint recurrence

    g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}

backwards through the chunk, so memory grows with ``B*D*N*(L/chunk + chunk)`` rather than
``B*D*N*L``. The gradients of B and C are sums over the channels of a group and of A over the batch:
they are accumulated with fp32 atomics, so they are not bit-reproducible from run to run.

Needs ``triton``. With ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on
CPU tensors through Triton's interpreter, which is how the CPU test suite checks them.
"""
import torch
import triton
import triton.language as tl

CHUNK = 32  # time steps between stored states (memory vs. recomputation)
BLOCK_D = 32  # channels per program


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, y_ptr, hlast_ptr, ckpt_ptr,
    L, D, N, chans_per_group, n_chunks,
    s_ub, s_ud, s_ul,  # u and delta share strides (both made contiguous)
    s_Ad, s_An,
    s_Bb, s_Bg, s_Bn, s_Bl,
    s_Cb, s_Cg, s_Cn, s_Cl,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)  # batch offsets can pass 2**31 elements
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < D
    mask_dn = mask_d[:, None] & (offs_n < N)[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * s_Ad + offs_n[None, :] * s_An, mask=mask_dn, other=0.0).to(tl.float32)
    grp = offs_d // chans_per_group
    u_row = u_ptr + pid_b * s_ub + offs_d * s_ud
    dt_row = delta_ptr + pid_b * s_ub + offs_d * s_ud
    y_row = y_ptr + pid_b * s_ub + offs_d * s_ud
    B_base = B_ptr + pid_b * s_Bb + grp[:, None] * s_Bg + offs_n[None, :] * s_Bn
    C_base = C_ptr + pid_b * s_Cb + grp[:, None] * s_Cg + offs_n[None, :] * s_Cn
    # state tensors are (b, chunks, d, n) / (b, d, n), contiguous
    dn = offs_d[:, None] * N + offs_n[None, :]
    ckpt_row = ckpt_ptr + pid_b * n_chunks * D * N + dn

    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    for c in range(0, n_chunks):
        tl.store(ckpt_row + c * D * N, h, mask=mask_dn)
        t_end = tl.minimum((c + 1) * CHUNK, L)
        for t in range(c * CHUNK, t_end):
            u_t = tl.load(u_row + t * s_ul, mask=mask_d, other=0.0).to(tl.float32)
            dt_t = tl.load(dt_row + t * s_ul, mask=mask_d, other=0.0).to(tl.float32)
            B_t = tl.load(B_base + t * s_Bl, mask=mask_dn, other=0.0).to(tl.float32)
            C_t = tl.load(C_base + t * s_Cl, mask=mask_dn, other=0.0).to(tl.float32)
            h = tl.exp(dt_t[:, None] * A) * h + (dt_t * u_t)[:, None] * B_t
            tl.store(y_row + t * s_ul, tl.sum(h * C_t, axis=1), mask=mask_d)
    tl.store(hlast_ptr + pid_b * D * N + dn, h, mask=mask_dn)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, dy_ptr, dlast_ptr, ckpt_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr,
    L, D, N, chans_per_group, n_chunks, n_dblocks,
    s_ub, s_ud, s_ul,  # u, delta, dy, du and ddelta share strides (all contiguous)
    s_Ad, s_An,
    s_Bb, s_Bg, s_Bn, s_Bl,  # B and dB (contiguous copies with the same layout)
    s_Cb, s_Cg, s_Cn, s_Cl,  # C and dC
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, ONE_GROUP: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)  # batch offsets can pass 2**31 elements
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < D
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * s_Ad + offs_n[None, :] * s_An, mask=mask_dn, other=0.0).to(tl.float32)
    grp = offs_d // chans_per_group
    row = pid_b * s_ub + offs_d * s_ud
    B_off = pid_b * s_Bb + grp[:, None] * s_Bg + offs_n[None, :] * s_Bn
    C_off = pid_b * s_Cb + grp[:, None] * s_Cg + offs_n[None, :] * s_Cn
    # When all BLOCK_D channels share one group, reduce dB / dC over them before the atomic add.
    grp0 = (pid_d * BLOCK_D) // chans_per_group
    B_off0 = pid_b * s_Bb + grp0 * s_Bg + offs_n * s_Bn
    C_off0 = pid_b * s_Cb + grp0 * s_Cg + offs_n * s_Cn
    dn = offs_d[:, None] * N + offs_n[None, :]
    ckpt_row = ckpt_ptr + pid_b * n_chunks * D * N + dn
    # this program's scratch: (CHUNK + 1, BLOCK_D, BLOCK_N), slot 0 = the chunk's start state
    blk = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]
    scratch = scratch_ptr + (pid_b * n_dblocks + pid_d) * (CHUNK + 1) * BLOCK_D * BLOCK_N + blk

    g = tl.load(dlast_ptr + pid_b * D * N + dn, mask=mask_dn, other=0.0).to(tl.float32)
    dA = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        t0 = c * CHUNK
        t_end = tl.minimum(t0 + CHUNK, L)
        # 1. recompute this chunk's states
        h = tl.load(ckpt_row + c * D * N, mask=mask_dn, other=0.0)
        tl.store(scratch, h)
        for t in range(t0, t_end):
            u_t = tl.load(u_ptr + row + t * s_ul, mask=mask_d, other=0.0).to(tl.float32)
            dt_t = tl.load(delta_ptr + row + t * s_ul, mask=mask_d, other=0.0).to(tl.float32)
            B_t = tl.load(B_ptr + B_off + t * s_Bl, mask=mask_dn, other=0.0).to(tl.float32)
            h = tl.exp(dt_t[:, None] * A) * h + (dt_t * u_t)[:, None] * B_t
            tl.store(scratch + (t - t0 + 1) * BLOCK_D * BLOCK_N, h)
        # 2. adjoint recurrence backwards through the chunk; g is dL/dh_t
        for tt in range(0, t_end - t0):
            t = t_end - 1 - tt
            u_t = tl.load(u_ptr + row + t * s_ul, mask=mask_d, other=0.0).to(tl.float32)
            dt_t = tl.load(delta_ptr + row + t * s_ul, mask=mask_d, other=0.0).to(tl.float32)
            dy_t = tl.load(dy_ptr + row + t * s_ul, mask=mask_d, other=0.0).to(tl.float32)
            B_t = tl.load(B_ptr + B_off + t * s_Bl, mask=mask_dn, other=0.0).to(tl.float32)
            C_t = tl.load(C_ptr + C_off + t * s_Cl, mask=mask_dn, other=0.0).to(tl.float32)
            h_t = tl.load(scratch + (t - t0 + 1) * BLOCK_D * BLOCK_N)
            h_prev = tl.load(scratch + (t - t0) * BLOCK_D * BLOCK_N)
            g += dy_t[:, None] * C_t
            decay = tl.exp(dt_t[:, None] * A)
            dC_t = tl.where(mask_dn, h_t * dy_t[:, None], 0.0)
            dB_t = tl.where(mask_dn, g * (dt_t * u_t)[:, None], 0.0)
            if ONE_GROUP:
                tl.atomic_add(dC_ptr + C_off0 + t * s_Cl, tl.sum(dC_t, axis=0), mask=mask_n)
                tl.atomic_add(dB_ptr + B_off0 + t * s_Bl, tl.sum(dB_t, axis=0), mask=mask_n)
            else:
                tl.atomic_add(dC_ptr + C_off + t * s_Cl, dC_t, mask=mask_dn)
                tl.atomic_add(dB_ptr + B_off + t * s_Bl, dB_t, mask=mask_dn)
            dw = tl.sum(g * B_t, axis=1)  # w = delta * u enters as w * B
            dlog = g * decay * h_prev  # d/d(delta * A) of the decay term
            dA += dlog * dt_t[:, None]
            tl.store(ddelta_ptr + row + t * s_ul, tl.sum(dlog * A, axis=1) + dw * u_t, mask=mask_d)
            tl.store(du_ptr + row + t * s_ul, dw * dt_t, mask=mask_d)
            g = g * decay
    tl.atomic_add(dA_ptr + offs_d[:, None] * s_Ad + offs_n[None, :] * s_An, dA, mask=mask_dn)


def _launch_shape(u, N):
    b, d, l = u.shape
    block_n = max(triton.next_power_of_2(N), 2)
    return (b, triton.cdiv(d, BLOCK_D)), triton.cdiv(l, CHUNK), block_n


class TritonScan(torch.autograd.Function):
    """``(y, last_state) = TritonScan.apply(u, delta, A, B, C)``.

    u, delta: (b, d, l) fp32 (delta already shifted and softplus'ed); A: (d, n) fp32;
    B, C: (b, g, n, l) with g dividing d. Returns y (b, d, l) and the last state (b, d, n), fp32.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        u, delta, B, C = u.contiguous(), delta.contiguous(), B.contiguous(), C.contiguous()
        b, d, l = u.shape
        n, groups = A.shape[1], B.shape[1]
        grid, n_chunks, block_n = _launch_shape(u, n)
        y = torch.empty_like(u, dtype=torch.float32)
        hlast = u.new_empty((b, d, n), dtype=torch.float32)
        ckpt = u.new_empty((b, n_chunks, d, n), dtype=torch.float32)
        _scan_fwd_kernel[grid](
            u, delta, A, B, C, y, hlast, ckpt, l, d, n, d // groups, n_chunks,
            *u.stride(), *A.stride(), *B.stride(), *C.stride(),
            CHUNK=CHUNK, BLOCK_D=BLOCK_D, BLOCK_N=block_n,
        )
        ctx.save_for_backward(u, delta, A, B, C, ckpt)
        return y, hlast

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dlast):
        u, delta, A, B, C, ckpt = ctx.saved_tensors
        b, d, l = u.shape
        n, groups = A.shape[1], B.shape[1]
        grid, n_chunks, block_n = _launch_shape(u, n)
        # autograd materialises an unused output's gradient as zeros, so neither is None here
        dy, dlast = dy.to(torch.float32).contiguous(), dlast.to(torch.float32).contiguous()
        du, ddelta = torch.empty_like(u, dtype=torch.float32), torch.empty_like(u, dtype=torch.float32)
        dA = torch.zeros_like(A, dtype=torch.float32)
        dB, dC = torch.zeros_like(B, dtype=torch.float32), torch.zeros_like(C, dtype=torch.float32)
        scratch = u.new_empty((b * grid[1] * (CHUNK + 1) * BLOCK_D * block_n,), dtype=torch.float32)
        chans = d // groups
        _scan_bwd_kernel[grid](
            u, delta, A, B, C, dy, dlast, ckpt, scratch, du, ddelta, dA, dB, dC,
            l, d, n, chans, n_chunks, grid[1],
            *u.stride(), *A.stride(), *B.stride(), *C.stride(),
            CHUNK=CHUNK, BLOCK_D=BLOCK_D, BLOCK_N=block_n, ONE_GROUP=chans % BLOCK_D == 0,
        )
        return du.to(u.dtype), ddelta.to(delta.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype)


def triton_selective_scan(u, delta, A, B, C):
    """The core scan on the Triton kernels; see :class:`TritonScan` for the shapes."""
    return TritonScan.apply(u, delta, A, B, C)
