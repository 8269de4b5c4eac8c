"""QuantizeLinear / DequantizeLinear in torch, with the exact ONNX numerics.

    QuantizeLinear:   q = saturate(round_half_even(x / s) + z, qmin, qmax)
    DequantizeLinear: y = (q - z) * s

``s`` and ``z`` are scalars (per tensor) or 1-D along ``axis`` (per axis, default 1); ``z`` is
optional (0). The integer range [qmin, qmax] is the range of the zero-point's ONNX type (or of
``output_dtype``, opset 21, or uint8 by default): int8/uint8/int16/uint16/int32 and the
low-bit int4/uint4/int2/uint2. Division and rounding are float32 like onnxruntime
(``torch.round`` rounds half to even, as ONNX requires).

**Codes are float tensors.** torch has no int4 and integer tensors carry no gradient, so
QuantizeLinear returns a float32 tensor holding the integer codes; DequantizeLinear accepts
such float codes as well as integer tensors (constants, e.g. INT32 bias codes, for which
q - z is formed in int64 before the float conversion, as onnxruntime does in int32).
For differentiable blocks the rounding uses a straight-through estimator: forward round(v),
backward identity (the clamp still stops gradients of saturated elements).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from torch import Tensor

from onnxq.torchify.registry import input_at, register

# Integer range of every storage type QuantizeLinear can produce (numpy / ml_dtypes names).
_RANGES: dict[str, tuple[int, int]] = {
    "int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767), "uint16": (0, 65535),
    "int32": (-(2**31), 2**31 - 1), "int4": (-8, 7), "uint4": (0, 15), "int2": (-2, 1), "uint2": (0, 3),
}
_ONNX_NAMES = {
    onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT16: "int16",
    onnx.TensorProto.UINT16: "uint16", onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT4: "int4",
    onnx.TensorProto.UINT4: "uint4",
}
for _name in ("INT2", "UINT2"):  # onnx >= 1.19
    if hasattr(onnx.TensorProto, _name):
        _ONNX_NAMES[getattr(onnx.TensorProto, _name)] = _name.lower()


def _dtype_name(t: gs.Tensor | None) -> str | None:
    if t is None:
        return None
    if isinstance(t, gs.Constant):
        return np.asarray(t.values).dtype.name
    dtype = t.dtype
    if dtype is None:
        return None
    if isinstance(dtype, int):
        return _ONNX_NAMES.get(dtype, f"onnx type {dtype}")
    return np.dtype(dtype).name


def quant_storage(node: gs.Node) -> str:
    """The integer storage type a QuantizeLinear produces: zero-point type > output_dtype > output > uint8."""
    name = _dtype_name(input_at(node, 2))
    if name is None and node.attrs.get("output_dtype"):
        name = _ONNX_NAMES.get(int(node.attrs["output_dtype"]), f"onnx type {node.attrs['output_dtype']}")
    if name is None and node.outputs:
        name = _dtype_name(node.outputs[0])
    return name or "uint8"


def _check_q(node: Any) -> str | None:
    if node.attrs.get("block_size", 0):
        return f"{node.op} blocked quantization (block_size) is not supported"
    storage = quant_storage(node) if node.op == "QuantizeLinear" else _dtype_name(input_at(node, 0))
    if storage is not None and storage not in _RANGES:
        return f"{node.op} storage type {storage} is not supported (integer types only)"
    return None


def _prepare_q(node: gs.Node) -> dict[str, Any]:
    qmin, qmax = _RANGES.get(quant_storage(node), _RANGES["uint8"])
    return {"_qmin": qmin, "_qmax": qmax}


def _per_axis(p: Tensor, like: Tensor, axis: int) -> Tensor:
    """Reshape a 1-D scale / zero-point to broadcast along ``axis`` of ``like``."""
    if p.dim() == 0 or like.dim() == 0:
        return p
    shape = [1] * like.dim()
    shape[axis % like.dim()] = -1
    return p.reshape(shape)


def round_half_even_ste(v: Tensor) -> Tensor:
    """round(v) (half to even) forward, identity backward; bit-exact in the forward pass."""
    return v + (torch.round(v) - v).detach()


def quantize_linear(x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int,
                    axis: int = 1) -> Tensor:
    """ONNX QuantizeLinear, codes returned as float32 integers (see module docstring)."""
    q = round_half_even_ste(x / _per_axis(scale, x, axis))
    if zero_point is not None:
        q = q + _per_axis(zero_point, x, axis).to(q.dtype)
    return torch.clamp(q, qmin, qmax)


def dequantize_linear(q: Tensor, scale: Tensor, zero_point: Tensor | None, axis: int = 1) -> Tensor:
    """ONNX DequantizeLinear: (q - z) * s, q float codes or an integer tensor."""
    s = _per_axis(scale, q, axis)
    if q.is_floating_point():
        diff = q.to(s.dtype)
        if zero_point is not None:
            diff = diff - _per_axis(zero_point, q, axis).to(s.dtype)
    else:
        diff = q.to(torch.int64)
        if zero_point is not None:
            diff = diff - _per_axis(zero_point, q, axis).to(torch.int64)
        diff = diff.to(s.dtype)
    return diff * s


@register("QuantizeLinear", check=_check_q, prepare=_prepare_q)
def _quantize(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    zp = x[2] if len(x) > 2 else None
    return [quantize_linear(x[0], x[1], zp, attrs["_qmin"], attrs["_qmax"], int(attrs.get("axis", 1)))]


@register("DequantizeLinear", check=_check_q)
def _dequantize(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    zp = x[2] if len(x) > 2 else None
    return [dequantize_linear(x[0], x[1], zp, int(attrs.get("axis", 1)))]
