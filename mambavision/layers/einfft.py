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


def _dft_constants(L: int, rows: int, num_blocks: int, block_size: int, device, dtype, wdtype):
    """The constant matrices of the DFT formulation, cached per (L, rows, blocks, device, dtypes)."""
    args = (L, rows, num_blocks, block_size, device, dtype, wdtype)
    if torch.compiler.is_compiling():
        # Built inside the traced graph, from no input. A lookup in the cache would make dynamo guard on the
        # dict's contents and recompile each time a new length is cached (tests/mambavision/test_einfft.py).
        with torch.no_grad():
            return _build_dft_constants(*args)
    key = (L, rows, num_blocks, block_size, str(device), dtype, wdtype)
    hit = _DFT_CACHE.get(key)
    if hit is None:
        # Cached across calls, so never inference tensors: a model evaluated under torch.inference_mode() and
        # then trained in the same process would otherwise fail to save them for backward.
        with torch.inference_mode(False), torch.no_grad():
            hit = _DFT_CACHE[key] = _build_dft_constants(*args)
    return hit


def _build_dft_constants(L, rows, num_blocks, block_size, device, dtype, wdtype):
    """In the compute dtype: the token DFT and its inverse as real (2 rows, 2 rows) block matrices acting on
    [real; imag] stacked along the rows, with the orthonormal (L, L) DFT in the top-left of each block and
    zeros past L; and the inverse block DFT's real part, (2, C, C). In the weights' dtype: the block DFT's
    phases as a (2, 2, nb, nb) coefficient tensor, and the (nb, nb) identity that makes W2 block-diagonal.
    Built in float64 on ``device`` itself: under compile they are rebuilt at every call, and a tensor made on
    the host would be copied from pageable memory, a sync per layer that leaves the GPU idle."""
    f64 = dict(dtype=torch.float64, device=device)
    k = torch.arange(L, **f64)
    ang = 2 * math.pi * torch.remainder(torch.outer(k, k), L) / L  # remainder keeps kl*2pi/L accurate
    fc, fs = torch.zeros(rows, rows, **f64), torch.zeros(rows, rows, **f64)
    fc[:L, :L], fs[:L, :L] = torch.cos(ang) / math.sqrt(L), torch.sin(ang) / math.sqrt(L)
    # F = fc - i fs on [re; im]: [[fc, fs], [-fs, fc]]; its inverse, fc + i fs: [[fc, -fs], [fs, fc]].
    f_fwd = torch.cat([torch.cat([fc, fs], 1), torch.cat([-fs, fc], 1)], 0)
    f_inv = torch.cat([torch.cat([fc, -fs], 1), torch.cat([fs, fc], 1)], 0)
    j = torch.arange(num_blocks, **f64)
    th = 2 * math.pi * torch.outer(j, j) / num_blocks  # theta[j, b]
    bc, bs = torch.cos(th) / math.sqrt(num_blocks), torch.sin(th) / math.sqrt(num_blocks)
    # Inverse block DFT, real part of the output: out[(b,d)] = sum_j bc[j,b] Vr[(j,d)] - bs[j,b] Vi[(j,d)].
    eye = torch.eye(block_size, **f64)
    g = torch.stack([torch.kron(bc, eye), -torch.kron(bs, eye)])
    # Forward block DFT folded into W1: M_o[(b,d),(j,k)] = sum_i P[o,i,b,j] W1_i[j][d,k], o, i in (re, im).
    phase = torch.stack([torch.stack([bc, bs]), torch.stack([-bs, bc])]).transpose(2, 3)  # P[o, i, b, j]
    hit = tuple(t.to(dtype) for t in (f_fwd, f_inv, g))
    return hit + tuple(t.to(wdtype) for t in (phase, torch.eye(num_blocks, **f64)))


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
        w1, w2, b1, b2 = self.complex_weight_1, self.complex_weight_2, self.complex_bias_1, self.complex_bias_2
        f_fwd, f_inv, g, phase, eye = _dft_constants(L, rows, nb, bs, x.device, cdt, w1.dtype)
        # Few, large ops: real and imaginary parts are stacked on a leading axis of 2, so each step is one
        # product (an eager step is bound by its op count: this layer was 243 ops forward and backward).
        m = (phase[:, :, :, None, :, None] * w1.permute(0, 2, 1, 3)[None, :, None]).sum(1)  # (o, b, d, j, k)
        m = m.reshape(2, C, C).to(cdt)
        w2d = (w2[:, :, :, None, :] * eye[None, :, None, :, None]).reshape(2, C, C).to(cdt)  # block-diagonal
        w2r, w2i = w2d.unbind(0)  # unbind, not indexing: its backward is one stack, not a zero-fill per index
        w2_re, w2_im = w2d, torch.stack([-w2i, w2r])  # what Re z and Im z are multiplied by

        # Token-major: (2, rows, B*C) for the token products, the same memory as (2, rows*B, C) for the channel
        # products. Rows past L are zeros in and never reach the output (the DFT matrices' columns past L are 0).
        xt = x.to(cdt).transpose(0, 1)  # cast first: the transpose copy moves half the bytes
        xt = (F.pad(xt, (0, 0, 0, 0, 0, rows - L)) if rows > L else xt.contiguous()).view(rows * B, C)
        u = torch.bmm(xt.expand(2, -1, -1), m)  # block DFT and W1: (2, rows*B, C)
        # Z = relu(F_L U + b1), both parts in one product.
        z = torch.relu((f_fwd @ u.view(2 * rows, B * C)).view(2, rows, B, C) + b1.reshape(2, 1, 1, C).to(cdt))
        z_re, z_im = z.view(2, rows * B, C).unbind(0)
        # S = softshrink(Z W2 + b2), W2 block-diagonal complex.
        s = torch.baddbmm(b2.reshape(2, 1, C).to(cdt), z_re.expand(2, -1, -1), w2_re)
        s = F.softshrink(torch.baddbmm(s, z_im.expand(2, -1, -1), w2_im), self.sparsity_threshold)
        # V = F_L^{-1} S; then the real part of the inverse block DFT.
        v_re, v_im = (f_inv @ s.view(2 * rows, B * C)).view(2, rows * B, C).unbind(0)
        out = torch.addmm(v_re @ g[0], v_im, g[1])
        return out.view(rows, B, C)[:L].transpose(0, 1)  # a view; the residual add makes it contiguous
