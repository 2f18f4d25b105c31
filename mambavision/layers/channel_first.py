"""Linear projections across the boundary between the token-major residual stream, (b, l, d), and the
channel-first layout of an SSM mixer's convolutions and scan, (b, d, l).

``nn.Linear`` followed by a transpose sends every activation, and in backward every gradient, through a
strided copy or a strided elementwise kernel, which are uncoalesced on a GPU (about a fifth of an eager
mv_hybrid step's kernel time, docs/performance.md). These products read the transposed operand as it is
(cuBLAS takes either layout), and their backward passes do the same, so each side keeps its own layout in
both directions. The weights are ordinary ``nn.Linear`` weights ``(out, in)``: state_dicts do not change.

Under autocast both run in the autocast dtype, as ``nn.Linear`` would.
"""
import torch
from torch import nn

from ..amp import compute_dtype


class _TokensToChannels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):  # x (b, l, i), weight (o, i) -> (b, o, l)
        ctx.save_for_backward(x, weight)
        return torch.bmm(weight.expand(x.shape[0], -1, -1), x.mT)

    @staticmethod
    def backward(ctx, g):  # g (b, o, l)
        x, weight = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch.bmm(g.mT, weight.expand(g.shape[0], -1, -1))  # (b, l, i)
        if ctx.needs_input_grad[1]:
            # One product over all b*l tokens (the batch summed in the fp32 accumulator, as nn.Linear's is);
            # the (o, b, l) copy of g moves whole rows, so it stays coalesced.
            gw = g.transpose(0, 1).reshape(g.shape[1], -1) @ x.reshape(-1, x.shape[-1])
        return gx, gw


class _ChannelsToTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weight):  # y (b, i, l), weight (o, i) -> (b, l, o)
        ctx.save_for_backward(y, weight)
        return torch.bmm(y.mT, weight.t().expand(y.shape[0], -1, -1))

    @staticmethod
    def backward(ctx, g):  # g (b, l, o)
        y, weight = ctx.saved_tensors
        gy = gw = None
        if ctx.needs_input_grad[0]:
            gy = torch.bmm(weight.t().expand(g.shape[0], -1, -1), g.mT)  # (b, i, l)
        if ctx.needs_input_grad[1]:
            gw = g.reshape(-1, g.shape[-1]).t() @ y.transpose(0, 1).reshape(y.shape[1], -1).t()
        return gy, gw


def tokens_to_channels(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight).transpose(1, 2)``, contiguous: (b, l, in) -> (b, out, l)."""
    cdt = compute_dtype(x)
    return _TokensToChannels.apply(x.to(cdt), weight.to(cdt))


def channels_to_tokens(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(y.transpose(1, 2), weight)``, contiguous: (b, in, l) -> (b, l, out)."""
    cdt = compute_dtype(y)
    return _ChannelsToTokens.apply(y.to(cdt), weight.to(cdt))


class ChannelFirstLinear(nn.Linear):
    """``nn.Linear`` (same parameters and keys) applied to channel-first input: (b, in, l) -> (b, out, l).
    A module rather than a function where forward hooks must see the projection (the SSM mixers' x_proj)."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return channel_first_linear(t, self.weight, self.bias)


def channel_first_linear(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor = None) -> torch.Tensor:
    """A projection inside the channel-first layout: (b, in, l) -> (b, out, l). For the mixers' small
    projections (x_proj, dt_proj), where autograd's per-batch weight gradient is cheap."""
    cdt = compute_dtype(t)
    w = weight.to(cdt).expand(t.shape[0], -1, -1)
    if bias is None:
        return torch.bmm(w, t.to(cdt))
    return torch.baddbmm(bias.to(cdt)[:, None], w, t.to(cdt))
