"""Causal depthwise conv: definition, causality, dtypes, errors and the dispatcher."""
import pytest
import torch
import torch.nn.functional as F

from mambavision.ops import causal_conv1d as cc
from mambavision.ops.causal_conv1d import causal_conv1d_fn


def conv_by_definition(x, weight, bias=None):
    """out[b, d, t] = bias[d] + sum_k weight[d, k] * x[b, d, t - (K - 1) + k], zeros before t = 0."""
    b, d, l = x.shape
    k = weight.shape[1]
    out = torch.zeros(b, d, l, dtype=x.dtype) if bias is None else bias[:, None].expand(b, d, l).clone()
    for t in range(l):
        for j in range(k):
            src = t - (k - 1) + j
            if src >= 0:
                out[:, :, t] = out[:, :, t] + weight[:, j] * x[:, :, src]
    return out


@pytest.mark.parametrize("width", [1, 2, 4, 5])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("activation", [None, "silu", "swish"])
def test_matches_definition_with_grads(width, with_bias, activation):
    x = torch.randn(2, 6, 11, requires_grad=True)
    w = torch.randn(6, width, requires_grad=True)
    bias = torch.randn(6, requires_grad=True) if with_bias else None
    out = causal_conv1d_fn(x, w, bias, activation=activation)
    ref = conv_by_definition(x, w, bias)
    ref = F.silu(ref) if activation else ref
    torch.testing.assert_close(out, ref)
    params = [p for p in (x, w, bias) if p is not None]
    g_out = torch.randn_like(out)
    for g, g_ref in zip(torch.autograd.grad(out, params, g_out), torch.autograd.grad(ref, params, g_out)):
        torch.testing.assert_close(g, g_ref)


def test_is_causal():
    x = torch.randn(1, 3, 20)
    w = torch.randn(3, 4)
    y = causal_conv1d_fn(x, w)
    x2 = x.clone()
    x2[..., 12:] += 5.0  # change the future from t = 12 on
    y2 = causal_conv1d_fn(x2, w)
    torch.testing.assert_close(y2[..., :12], y[..., :12])
    assert not torch.allclose(y2[..., 12:], y[..., 12:])


def test_bf16_input_computes_in_weight_dtype():
    x = torch.randn(2, 4, 9).bfloat16()
    w, bias = torch.randn(4, 3), torch.randn(4)
    out = causal_conv1d_fn(x, w, bias, activation="silu")
    assert out.dtype == torch.bfloat16
    expected = F.silu(conv_by_definition(x.float(), w, bias)).bfloat16()
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(x=torch.randn(4, 9)), "x must be"),
        (dict(weight=torch.randn(5, 3)), "weight must be"),
        (dict(weight=torch.randn(4, 3, 1)), "weight must be"),
        (dict(bias=torch.randn(3)), "bias must be"),
        (dict(activation="relu"), "activation must be"),
    ],
)
def test_bad_inputs_are_named(kwargs, match):
    args = dict(x=torch.randn(2, 4, 9), weight=torch.randn(4, 3), bias=None, activation=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        causal_conv1d_fn(**args)


def test_backend_selection(monkeypatch):
    x, w = torch.randn(2, 4, 9), torch.randn(4, 3)
    with pytest.raises(ValueError, match="unknown causal-conv1d backend"):
        causal_conv1d_fn(x, w, backend="fast")
    monkeypatch.setenv(cc.BACKEND_ENV, "torch")
    torch.testing.assert_close(causal_conv1d_fn(x, w), conv_by_definition(x, w))

    calls = []
    monkeypatch.setattr(cc, "_cuda_conv", lambda: (lambda *a, **k: calls.append(a)))
    monkeypatch.delenv(cc.BACKEND_ENV)
    causal_conv1d_fn(x, w)  # auto on CPU tensors: never the CUDA kernel
    assert not calls
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        causal_conv1d_fn(x, w, backend="cuda")
    monkeypatch.setattr(cc, "_cuda_conv", lambda: None)
    with pytest.raises(RuntimeError, match="importable: False"):
        causal_conv1d_fn(x, w, backend="cuda")


@pytest.mark.skipif(
    not (torch.cuda.is_available() and cc.causal_conv1d_available()), reason="needs CUDA and causal-conv1d"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_torch_path(dtype):
    x = torch.randn(8, 384, 257, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(384, 4, device="cuda", dtype=dtype, requires_grad=True)
    bias = torch.randn(384, device="cuda", dtype=dtype, requires_grad=True)
    out = causal_conv1d_fn(x, w, bias, activation="silu", backend="cuda")
    ref = causal_conv1d_fn(x, w, bias, activation="silu", backend="torch")
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, w, bias), g), torch.autograd.grad(ref, (x, w, bias), g)):
        torch.testing.assert_close(a.float(), b.float(), atol=tol["atol"] * 50, rtol=tol["rtol"])
