"""EinFFT channel mixer from SiMBA (Patro & Agneeswaran, 2024), as used by MV_Hybrid.

The input is split into ``num_blocks`` channel blocks and transformed with a 2-D FFT over
(tokens, blocks); two complex block-diagonal linear layers act in the frequency domain, followed
by soft-shrinkage (sparsity) and the inverse FFT. Because the FFT runs along the token axis, it
mixes tokens as well as channels.

Two implementations of the same function:

* ``impl="dft"`` (default): every linear step as a real matrix product (tensor cores, any dtype).
  The token DFT is a product with the (L, L) cosine and sine matrices; the block DFT is folded into
  the first complex linear layer (one dense (C, C) complex matrix built from the weights) and into
  the inverse (a constant (C, C) matrix). Real and imaginary parts stay separate tensors, so no
  complex arithmetic, no layout shuffles inside, and no fp32 round trip under autocast.
* ``impl="fft"``: the release's formulation with ``torch.fft`` in fp32 (half-precision cuFFT only
  takes power-of-two sizes, and 257 / 50 tokens are not; a prime length also forces cuFFT's slow
  Bluestein path). Kept as the reference and for very long sequences, where O(L log L) wins.

Both agree to fp32 round-off (tests/mambavision/test_einfft.py); docs/performance.md has the speed.
"""
import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from ..amp import autocast_off, compute_dtype
from .align import padded_length

IMPLS = ("dft", "fft")
_DFT_CACHE: Dict[Tuple, Tuple[torch.Tensor, ...]] = {}


def _complex_linear(xr, xi, w, b):
    # (a + ib)(c + id): the block-diagonal weight is stored as [real, imag] on dim 0.
    real = torch.einsum("...bd,bdk->...bk", xr, w[0]) - torch.einsum("...bd,bdk->...bk", xi, w[1]) + b[0]
    imag = torch.einsum("...bd,bdk->...bk", xr, w[1]) + torch.einsum("...bd,bdk->...bk", xi, w[0]) + b[1]
    return real, imag


def _dft_constants(L: int, rows: int, num_blocks: int, block_size: int, device, dtype):
    """Cosine/sine matrices of the orthonormal token DFT, (rows, rows) with the (L, L) DFT in the top-left
    corner and zeros elsewhere, and the block DFT's phases (num_blocks, num_blocks); built in float64,
    cached per (L, rows, blocks, device, dtype)."""
    key = (L, rows, num_blocks, block_size, str(device), dtype)
    hit = _DFT_CACHE.get(key)
    if hit is None:
        hit = _DFT_CACHE[key] = _build_dft_constants(L, rows, num_blocks, block_size, device, dtype)
    return hit


# Cached across calls, so never inference tensors: a model evaluated under torch.inference_mode() and then
# trained in the same process would otherwise fail to save them for backward.
@torch.inference_mode(False)
@torch.no_grad()
def _build_dft_constants(L, rows, num_blocks, block_size, device, dtype):
    k = torch.arange(L, dtype=torch.float64)
    ang = 2 * math.pi * torch.remainder(torch.outer(k, k), L) / L  # remainder keeps kl*2pi/L accurate
    fc = torch.zeros(rows, rows, dtype=torch.float64)
    fs = torch.zeros(rows, rows, dtype=torch.float64)
    fc[:L, :L], fs[:L, :L] = torch.cos(ang) / math.sqrt(L), torch.sin(ang) / math.sqrt(L)
    j = torch.arange(num_blocks, dtype=torch.float64)
    th = 2 * math.pi * torch.outer(j, j) / num_blocks  # theta[j, b]
    bc, bs = torch.cos(th) / math.sqrt(num_blocks), torch.sin(th) / math.sqrt(num_blocks)
    # Inverse block DFT, real part of the output: out[(b,d)] = sum_j bc[j,b] Vr[(j,d)] - bs[j,b] Vi[(j,d)].
    eye = torch.eye(block_size, dtype=torch.float64)
    g_r, g_i = torch.kron(bc, eye), -torch.kron(bs, eye)
    hit = tuple(t.to(device=device, dtype=dtype) for t in (fc, fs, g_r, g_i))
    hit += (bc.to(device=device), bs.to(device=device))  # float64: cast to the weights' dtype at use
    return hit


class EinFFT(nn.Module):
    def __init__(self, dim: int, num_blocks: int = 4, sparsity_threshold: float = 0.01, scale: float = 0.02,
                 impl: str = "dft"):
        super().__init__()
        if dim % num_blocks != 0:
            raise ValueError(f"EinFFT: dim={dim} must be divisible by num_blocks={num_blocks}")
        self.dim = dim
        self.num_blocks = num_blocks
        self.block_size = dim // num_blocks
        self.sparsity_threshold = sparsity_threshold
        self.impl = impl
        shape_w = (2, num_blocks, self.block_size, self.block_size)
        shape_b = (2, num_blocks, self.block_size)
        self.complex_weight_1 = nn.Parameter(torch.randn(shape_w) * scale)
        self.complex_weight_2 = nn.Parameter(torch.randn(shape_w) * scale)
        self.complex_bias_1 = nn.Parameter(torch.randn(shape_b) * scale)
        self.complex_bias_2 = nn.Parameter(torch.randn(shape_b) * scale)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_blocks={self.num_blocks}, impl={self.impl!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "dft":
            return self._forward_dft(x)
        if self.impl == "fft":
            return self._forward_fft(x)
        raise ValueError(f"EinFFT.impl must be one of {IMPLS}, got {self.impl!r}")

    def _forward_fft(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        in_dtype = x.dtype
        # At least fp32: half-precision cuFFT only supports power-of-two sizes (257 and 50 tokens are not).
        ct = torch.promote_types(x.dtype, torch.float32)
        with autocast_off(x.device.type):
            h = x.to(ct).reshape(B, L, self.num_blocks, self.block_size)
            h = torch.fft.fft2(h, dim=(1, 2), norm="ortho")
            r, i = _complex_linear(h.real, h.imag, self.complex_weight_1.to(ct), self.complex_bias_1.to(ct))
            r, i = F.relu(r), F.relu(i)
            r, i = _complex_linear(r, i, self.complex_weight_2.to(ct), self.complex_bias_2.to(ct))
            h = torch.complex(
                F.softshrink(r, lambd=self.sparsity_threshold), F.softshrink(i, lambd=self.sparsity_threshold)
            )
            h = torch.fft.ifft2(h, dim=(1, 2), norm="ortho").real
        return h.reshape(B, L, C).to(in_dtype)

    def _forward_dft(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        nb, bs = self.num_blocks, self.block_size
        cdt = compute_dtype(x)
        rows = padded_length(L, x.device)  # zero rows past L: aligned GEMMs (layers/align.py)
        fc, fs, g_r, g_i, bc, bsn = _dft_constants(L, rows, nb, bs, x.device, cdt)
        w1, w2, b1, b2 = self.complex_weight_1, self.complex_weight_2, self.complex_bias_1, self.complex_bias_2
        bc, bsn = bc.to(w1.dtype), bsn.to(w1.dtype)

        # Block DFT folded into the first complex weight: M[(b,d),(j,k)] = e^{-i theta_jb}/sqrt(nb) W1[j][d,k].
        m_r = (torch.einsum("jb,jdk->bdjk", bc, w1[0]) + torch.einsum("jb,jdk->bdjk", bsn, w1[1])).reshape(C, C)
        m_i = (torch.einsum("jb,jdk->bdjk", bc, w1[1]) - torch.einsum("jb,jdk->bdjk", bsn, w1[0])).reshape(C, C)
        w2_r, w2_i = torch.block_diag(*w2[0]), torch.block_diag(*w2[1])

        # Token-major (rows, B*C): token products are plain (rows, rows) @ (rows, B*C) GEMMs, channel products
        # (rows*B, C) @ (C, C) GEMMs on the same memory. Rows past L are zeros in, and never reach the output
        # (the DFT matrices' columns past L are zero).
        xt = x.to(cdt).transpose(0, 1)  # cast first: the transpose copy moves half the bytes
        xt = (F.pad(xt, (0, 0, 0, 0, 0, rows - L)) if rows > L else xt.contiguous()).view(rows * B, C)
        u_r, u_i = (xt @ m_r).view(rows, B * C), (xt @ m_i).view(rows, B * C)

        def tile(b):  # a per-channel bias broadcast over the (rows, B*C) layout
            return b.reshape(C).repeat(B)

        # Z = F_L U + b1, F_L = fc - i fs; relu on each part.
        z_r = torch.addmm(torch.addmm(tile(b1[0]), fc, u_r), fs, u_i).relu_()
        z_i = torch.addmm(torch.addmm(tile(b1[1]), fc, u_i), fs, u_r, alpha=-1).relu_()
        z_r, z_i = z_r.view(rows * B, C), z_i.view(rows * B, C)
        # S = softshrink(Z W2 + b2), W2 block-diagonal complex.
        lam = self.sparsity_threshold
        s_r = F.softshrink(torch.addmm(torch.addmm(b2[0].reshape(C), z_r, w2_r), z_i, w2_i, alpha=-1), lam)
        s_i = F.softshrink(torch.addmm(torch.addmm(b2[1].reshape(C), z_r, w2_i), z_i, w2_r), lam)
        s_r, s_i = s_r.view(rows, B * C), s_i.view(rows, B * C)
        # V = F_L^{-1} S, F_L^{-1} = fc + i fs; then the real part of the inverse block DFT.
        v_r = torch.addmm(fc @ s_r, fs, s_i, alpha=-1).view(rows * B, C)
        v_i = torch.addmm(fs @ s_r, fc, s_i).view(rows * B, C)
        out = torch.addmm(v_r @ g_r, v_i, g_i)
        return out.view(rows, B, C)[:L].transpose(0, 1)  # a view; the residual add makes it contiguous
