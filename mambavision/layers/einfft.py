"""EinFFT channel mixer from SiMBA (Patro & Agneeswaran, 2024), as used by MV_Hybrid.

The input is split into ``num_blocks`` channel blocks and transformed with a 2-D FFT over
(tokens, blocks); two complex block-diagonal linear layers act in the frequency domain, followed
by soft-shrinkage (sparsity) and the inverse FFT. Because the FFT runs along the token axis, it
mixes tokens as well as channels.
"""
import torch
import torch.nn.functional as F
from torch import nn


def _complex_linear(xr, xi, w, b):
    # (a + ib)(c + id): the block-diagonal weight is stored as [real, imag] on dim 0.
    real = torch.einsum("...bd,bdk->...bk", xr, w[0]) - torch.einsum("...bd,bdk->...bk", xi, w[1]) + b[0]
    imag = torch.einsum("...bd,bdk->...bk", xr, w[1]) + torch.einsum("...bd,bdk->...bk", xi, w[0]) + b[1]
    return real, imag


class EinFFT(nn.Module):
    def __init__(self, dim: int, num_blocks: int = 4, sparsity_threshold: float = 0.01, scale: float = 0.02):
        super().__init__()
        if dim % num_blocks != 0:
            raise ValueError(f"EinFFT: dim={dim} must be divisible by num_blocks={num_blocks}")
        self.dim = dim
        self.num_blocks = num_blocks
        self.block_size = dim // num_blocks
        self.sparsity_threshold = sparsity_threshold
        shape_w = (2, num_blocks, self.block_size, self.block_size)
        shape_b = (2, num_blocks, self.block_size)
        self.complex_weight_1 = nn.Parameter(torch.randn(shape_w) * scale)
        self.complex_weight_2 = nn.Parameter(torch.randn(shape_w) * scale)
        self.complex_bias_1 = nn.Parameter(torch.randn(shape_b) * scale)
        self.complex_bias_2 = nn.Parameter(torch.randn(shape_b) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        in_dtype = x.dtype
        # Always fp32: half-precision cuFFT only supports power-of-two sizes (257 and 50 tokens are not).
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = x.float().reshape(B, L, self.num_blocks, self.block_size)
            h = torch.fft.fft2(h, dim=(1, 2), norm="ortho")
            r, i = _complex_linear(h.real, h.imag, self.complex_weight_1.float(), self.complex_bias_1.float())
            r, i = F.relu(r), F.relu(i)
            r, i = _complex_linear(r, i, self.complex_weight_2.float(), self.complex_bias_2.float())
            h = torch.complex(
                F.softshrink(r, lambd=self.sparsity_threshold), F.softshrink(i, lambd=self.sparsity_threshold)
            )
            h = torch.fft.ifft2(h, dim=(1, 2), norm="ortho").real
        return h.reshape(B, L, C).to(in_dtype)
