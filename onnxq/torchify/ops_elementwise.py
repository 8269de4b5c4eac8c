"""Elementwise ONNX ops in torch (numpy-style broadcasting, as ONNX).

Formulas follow the ONNX operator definitions:

  * HardSigmoid: max(0, min(1, alpha x + beta))          (alpha = 0.2, beta = 0.5)
  * HardSwish:   x * max(0, min(1, x / 6 + 1/2))
  * LeakyRelu:   x if x >= 0 else alpha x                (alpha = 0.01)
  * PRelu:       x if x >= 0 else slope x, slope broadcast (numpy rules) to the shape of x
  * Gelu:        x/2 (1 + erf(x / sqrt 2)), or with approximate="tanh"
                 x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
  * Clip:        min(max(x, lo), hi), lo/hi optional inputs (opset >= 11) or attributes (older)
  * Div:         true division for floats; truncation toward zero for integers (C semantics)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from onnxq.torchify.registry import register


@register("Add")
def _add(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    return [x[0] + x[1]]


@register("Sub")
def _sub(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    return [x[0] - x[1]]


@register("Mul")
def _mul(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    return [x[0] * x[1]]


@register("Div")
def _div(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    a, b = x[0], x[1]
    if a.is_floating_point():
        return [a / b]
    return [torch.div(a, b, rounding_mode="trunc")]


@register("Pow")
def _pow(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    base, exponent = x[0], x[1]
    if base.is_floating_point() and not exponent.is_floating_point():
        exponent = exponent.to(base.dtype)
    return [torch.pow(base, exponent).to(base.dtype)]


@register("Relu")
def _relu(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    return [torch.relu(x[0])]


@register("Clip")
def _clip(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    y = x[0]
    lo = x[1] if len(x) > 1 else None
    hi = x[2] if len(x) > 2 else None
    if lo is None and "min" in attrs:
        lo = torch.tensor(float(attrs["min"]), dtype=y.dtype, device=y.device)
    if hi is None and "max" in attrs:
        hi = torch.tensor(float(attrs["max"]), dtype=y.dtype, device=y.device)
    if lo is None and hi is None:
        return [y]
    if _constant_scalar(lo) and _constant_scalar(hi):  # one fused kernel (ReLU6): 4x cheaper than max/min
        return [_clamp_scalar(y, None if lo is None else float(lo), None if hi is None else float(hi))]
    if lo is not None:
        y = torch.maximum(y, lo.to(y.dtype))
    if hi is not None:
        y = torch.minimum(y, hi.to(y.dtype))
    return [y]


def _constant_scalar(t: Tensor | None) -> bool:
    """True for an absent bound or a 0-d/1-element bound that needs no gradient."""
    return t is None or (t.numel() == 1 and not t.requires_grad)


def _clamp_scalar(y: Tensor, lo: float | None, hi: float | None) -> Tensor:
    """``min(max(y, lo), hi)`` with float bounds: ``hardtanh`` when both are given (its backward is one
    masked pass), else ``clamp``. Same forward values as ONNX Clip."""
    if lo is not None and hi is not None and y.is_floating_point() and lo <= hi:
        return F.hardtanh(y, lo, hi)
    return torch.clamp(y, lo, hi)


@register("Sigmoid")
def _sigmoid(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    return [torch.sigmoid(x[0])]


def _hard_sigmoid(x: Tensor, alpha: float, beta: float) -> Tensor:
    a = torch.tensor(alpha, dtype=x.dtype, device=x.device)
    b = torch.tensor(beta, dtype=x.dtype, device=x.device)
    return torch.clamp(x * a + b, 0.0, 1.0)


@register("HardSigmoid")
def _hardsigmoid(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    return [_hard_sigmoid(x[0], float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5)))]


@register("HardSwish")
def _hardswish(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    return [x[0] * _hard_sigmoid(x[0], 1.0 / 6.0, 0.5)]


@register("LeakyRelu")
def _leaky_relu(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    return [F.leaky_relu(x[0], float(attrs.get("alpha", 0.01)))]


@register("PRelu")
def _prelu(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    data, slope = x[0], x[1]
    out = torch.where(data >= 0, data, data * slope)
    if out.shape != data.shape:
        raise ValueError(f"PRelu slope of shape {tuple(slope.shape)} does not broadcast to "
                         f"{tuple(data.shape)}")
    return [out]


@register("Erf")
def _erf(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    return [torch.erf(x[0])]


def _check_gelu(node: Any) -> str | None:
    approx = node.attrs.get("approximate", "none")
    return None if approx in ("none", "tanh") else f"Gelu approximate={approx!r} is not supported"


@register("Gelu", check=_check_gelu)
def _gelu(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    return [F.gelu(x[0], approximate=attrs.get("approximate", "none"))]


@register("Tanh")
def _tanh(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    return [torch.tanh(x[0])]


@register("Sqrt")
def _sqrt(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    return [torch.sqrt(x[0])]


@register("Exp")
def _exp(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    return [torch.exp(x[0])]


@register("Neg")
def _neg(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    return [-x[0]]


@register("Identity")
def _identity(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    return [x[0]]


@register("Max")
def _max(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    y = x[0]
    for t in x[1:]:
        y = torch.maximum(y, t)
    return [y]


@register("Min")
def _min(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    y = x[0]
    for t in x[1:]:
        y = torch.minimum(y, t)
    return [y]


@register("Sum")
def _sum(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    y = x[0]
    for t in x[1:]:
        y = y + t
    return [y]
