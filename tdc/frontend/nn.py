"""Layers: functions that create named params (with seeded initializers) and apply ops.

Params are named "<layer>.weight", "<layer>.bias", ...; a layer without a `name`
is called after its kind and position (conv1, conv2, linear1, ...).
"""
from __future__ import annotations

from ..errors import ShapeError
from ..ops import functional as F
from ..ops.functional import (avgpool2d, flatten, global_avgpool, leaky_relu, log_softmax, lrn,  # noqa: F401
                             maxpool2d, relu, sigmoid, softmax, tanh)
from ..ops.tensor import Builder, Tensor


def _layer(x: Tensor, kind: str, name: str | None) -> tuple[Builder, str]:
    b = x.builder
    return b, (name or b.fresh_name(kind))


def linear(x: Tensor, out_features: int, bias: bool = True, name: str | None = None,
           init: str = "he_normal") -> Tensor:
    b, name = _layer(x, "linear", name)
    if x.ndim < 1:
        raise ShapeError(f"linear {name}: input must have a feature dim, got {x.type}")
    w = b.param(f"{name}.weight", (out_features, x.shape[-1]), init, x.dtype)
    bb = b.param(f"{name}.bias", (out_features,), "zeros", x.dtype) if bias else None
    return F.linear(x, w, bb)


def conv2d(x: Tensor, out_channels: int, kernel, stride=1, pad=0, dilation=1, groups: int = 1,
           bias: bool = True, name: str | None = None, init: str = "he_normal", algo: str = "auto") -> Tensor:
    b, name = _layer(x, "conv", name)
    if x.ndim != 4:
        raise ShapeError(f"conv2d {name}: input must be NCHW, got {x.type}")
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    if groups < 1 or x.shape[1] % groups:
        raise ShapeError(f"conv2d {name}: {x.shape[1]} input channels are not divisible by groups={groups}")
    w = b.param(f"{name}.weight", (out_channels, x.shape[1] // groups, kh, kw), init, x.dtype)
    bb = b.param(f"{name}.bias", (out_channels,), "zeros", x.dtype) if bias else None
    return F.conv2d(x, w, bb, stride=stride, pad=pad, dilation=dilation, groups=groups, algo=algo)


def conv_transpose2d(x: Tensor, out_channels: int, kernel, stride=1, pad=0, output_padding=0, dilation=1,
                     groups: int = 1, bias: bool = True, name: str | None = None, init: str = "he_normal",
                     algo: str = "auto") -> Tensor:
    """A transposed convolution layer (PyTorch's ConvTranspose2d): weight [Cin, out_channels/groups,
    kh, kw], as ONNX ConvTranspose stores it; see F.conv_transpose2d for the geometry."""
    b, name = _layer(x, "convt", name)
    if x.ndim != 4:
        raise ShapeError(f"conv_transpose2d {name}: input must be NCHW, got {x.type}")
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    if groups < 1 or x.shape[1] % groups or out_channels % groups:
        raise ShapeError(f"conv_transpose2d {name}: {x.shape[1]} input and {out_channels} output channels "
                         f"are not both divisible by groups={groups}")
    # the init's fan-in is dim 1's (out_channels/groups * kh * kw), as PyTorch computes it for this layout
    w = b.param(f"{name}.weight", (x.shape[1], out_channels // groups, kh, kw), init, x.dtype)
    bb = b.param(f"{name}.bias", (out_channels,), "zeros", x.dtype) if bias else None
    return F.conv_transpose2d(x, w, bb, stride=stride, pad=pad, output_padding=output_padding, dilation=dilation,
                              groups=groups, algo=algo)


ConvTranspose2d = conv_transpose2d   # the name PyTorch and ONNX users look for


def batchnorm(x: Tensor, eps: float = 1e-5, momentum: float = 0.9, name: str | None = None,
              unbiased_running_var: bool = False) -> Tensor:
    """Per-channel (dim 1) batch normalization with learned scale and bias and running statistics
    (state). In a training trace it normalizes with batch statistics and updates the running ones:
    running = momentum * running + (1 - momentum) * batch (ONNX's convention; PyTorch's momentum
    is 1 - this one). The running variance takes the biased batch variance, unless
    `unbiased_running_var` (PyTorch's way: n / (n - 1) times it, n the values per channel)."""
    b, name = _layer(x, "bn", name)
    if x.ndim < 2:
        raise ShapeError(f"batchnorm {name}: input must be [N, C, ...], got {x.type}")
    c = x.shape[1]
    gamma = b.param(f"{name}.weight", (c,), "ones", x.dtype)
    beta = b.param(f"{name}.bias", (c,), "zeros", x.dtype)
    mean = b.param(f"{name}.running_mean", (c,), "zeros", x.dtype, kind="state")
    var = b.param(f"{name}.running_var", (c,), "ones", x.dtype, kind="state")
    if not b.training:
        return F.batchnorm(x, gamma, beta, mean, var, eps=eps, momentum=momentum)
    y, new_mean, new_var = F.batchnorm(x, gamma, beta, mean, var, eps=eps, momentum=momentum, training=True)
    n = x.type.size // c
    if unbiased_running_var and n > 1 and momentum < 1:
        # new_var - momentum * var is (1 - momentum) * (batch variance): scale that part by n / (n - 1)
        new_var = new_var + (new_var - var * momentum) * (1.0 / (n - 1))
    b.graph.add_update(mean.value, new_mean.value)
    b.graph.add_update(var.value, new_var.value)
    return y


def dropout(x: Tensor, rate: float = 0.5, name: str | None = None) -> Tensor:
    """Identity in inference traces; in training traces, a new mask every step."""
    b, name = _layer(x, "dropout", name)
    if not b.training or rate == 0.0:
        return x
    return F.dropout(x, b.step(), rate=rate, seed=b.seed_for(name))
