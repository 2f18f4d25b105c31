"""The channel-first projections are nn.Linear plus a transpose, forward and backward, in any dtype."""
import torch
import torch.nn.functional as F

from mambavision.layers import channel_first_linear, channels_to_tokens, tokens_to_channels


def test_match_linear_and_pass_gradcheck_in_float64():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)  # (b, l, in)
    y = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)  # (b, in, l)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(tokens_to_channels(x, w), F.linear(x, w).transpose(1, 2))
    torch.testing.assert_close(channels_to_tokens(y, w), F.linear(y.transpose(1, 2), w))
    torch.testing.assert_close(channel_first_linear(y, w, bias), F.linear(y.transpose(1, 2), w, bias).transpose(1, 2))
    assert torch.autograd.gradcheck(tokens_to_channels, (x, w))
    assert torch.autograd.gradcheck(channels_to_tokens, (y, w))
    assert torch.autograd.gradcheck(channel_first_linear, (y, w, bias))


def test_outputs_and_input_gradients_keep_their_side_layout():
    x = torch.randn(2, 6, 4, requires_grad=True)
    w = torch.randn(8, 4, requires_grad=True)
    out = tokens_to_channels(x, w)
    assert out.shape == (2, 8, 6) and out.is_contiguous()
    out.sum().backward()
    assert x.grad.is_contiguous()
    y = torch.randn(2, 8, 6, requires_grad=True)
    out = channels_to_tokens(y, w.t().contiguous())
    assert out.shape == (2, 6, 4) and out.is_contiguous()
    out.sum().backward()
    assert y.grad.is_contiguous()


def test_run_in_the_autocast_dtype_with_fp32_weight_gradients():
    x = torch.randn(2, 6, 4)
    w = torch.randn(8, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tokens_to_channels(x, w)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad, torch.ones(2, 8, 6).transpose(1, 2).reshape(-1, 8).t() @ x.reshape(-1, 4),
                               rtol=2e-2, atol=2e-2)


def test_trace_in_one_graph_forward_and_backward():
    """torch.compile (the trainer's ``compute_precision.compile``) traces the autograd functions whole."""
    def f(x, w_in, w_mid, b_mid, w_out):
        return channels_to_tokens(channel_first_linear(tokens_to_channels(x, w_in), w_mid, b_mid), w_out)

    torch.manual_seed(0)
    args = [torch.randn(*s, requires_grad=True) for s in [(2, 7, 8), (16, 8), (16, 16), (16,), (8, 16)]]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, ref = compiled(*args), f(*args)
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out.sum(), args), torch.autograd.grad(ref.sum(), args)):
        torch.testing.assert_close(a, b)
