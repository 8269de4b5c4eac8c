"""Shape and data-movement ONNX ops in torch: Concat, Reshape, Flatten, Transpose, Squeeze,
Unsqueeze, Slice, Split, Gather, Shape, Cast, Constant, Expand, ConstantOfShape, Range, Resize.

Shape-like inputs (Reshape's shape, Squeeze's axes, Slice's starts, Resize's scales, ...) are
read into Python integers at run time. Resize (nearest / linear, no antialias) is evaluated by
the ONNX coordinate maps, one resized axis at a time (the axes are separable):

    x_orig = half_pixel:          (x + 0.5) / scale - 0.5
             pytorch_half_pixel:  (x + 0.5) / scale - 0.5 if out > 1 else 0
             half_pixel_symmetric: n / 2 (1 - out / (scale n)) + (x + 0.5) / scale - 0.5
             align_corners:       x (n - 1) / (out - 1)   (0 if out == 1)
             asymmetric:          x / scale

computed in float32 like onnxruntime, with scale = out / n when ``sizes`` is given. Nearest
picks round_prefer_floor / round_prefer_ceil / floor / ceil of x_orig clamped to [0, n - 1];
linear blends x0 = floor(x_orig) and x0 + 1 (both clamped to [0, n - 1]) with weight
x_orig - x0, after clamping x_orig to [0, n - 1] (edge replication, as the ONNX reference).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor

from onnxq.torchify.registry import const_or_computed, const_value, input_at, register


def _ints(t: Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


@register("Concat")
def _concat(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    return [torch.cat([t for t in x if t is not None], dim=int(attrs["axis"]))]


@register("Reshape", check=lambda n: const_or_computed(n, 1))
def _reshape(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    data, shape = x[0], _ints(x[1])
    if not attrs.get("allowzero", 0):
        shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [data.reshape(shape)]


@register("Flatten")
def _flatten(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    data = x[0]
    axis = int(attrs.get("axis", 1))
    axis = axis + data.dim() if axis < 0 else axis  # range [-r, r]
    outer = math.prod(data.shape[:axis])
    return [data.reshape(outer, math.prod(data.shape[axis:]))]


@register("Transpose")
def _transpose(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    perm = attrs.get("perm")
    return [x[0].permute(*(perm if perm is not None else reversed(range(x[0].dim()))))]


def _axes(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[int] | None:
    """Axes from input 1 (opset >= 13) or the ``axes`` attribute (older opsets)."""
    if len(x) > 1 and x[1] is not None:
        return _ints(x[1])
    return list(attrs["axes"]) if "axes" in attrs else None


@register("Squeeze", check=lambda n: const_or_computed(n, 1))
def _squeeze(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    data, axes = x[0], _axes(attrs, x)
    if axes is None:
        return [data.squeeze()] if data.dim() else [data]
    keep = [d for i, d in enumerate(data.shape) if i not in {a % data.dim() for a in axes}]
    return [data.reshape(keep)]


@register("Unsqueeze", check=lambda n: const_or_computed(n, 1))
def _unsqueeze(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    data, axes = x[0], _axes(attrs, x)
    rank = data.dim() + len(axes)
    inserted = {a % rank for a in axes}
    dims = iter(data.shape)
    return [data.reshape([1 if i in inserted else next(dims) for i in range(rank)])]


def _slice_params(attrs: Mapping[str, Any], x: list[Tensor | None]) -> tuple[list[int], ...]:
    if len(x) > 1:  # opset >= 10: inputs
        starts, ends = _ints(x[1]), _ints(x[2])
        axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
        steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
        return starts, ends, axes, steps
    starts, ends = list(attrs["starts"]), list(attrs["ends"])
    return starts, ends, list(attrs.get("axes", range(len(starts)))), [1] * len(starts)


@register("Slice", check=lambda n: const_or_computed(n, 1, 2, 3, 4))
def _slice(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    """ONNX clamping: starts/ends to [0, n] for positive steps, [-1, n - 1] for negative steps."""
    data = x[0]
    for start, end, axis, step in zip(*_slice_params(attrs, x)):
        axis %= data.dim()
        n = data.shape[axis]
        start = start + n if start < 0 else start
        end = end + n if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), n), min(max(end, 0), n)
            index = [slice(None)] * axis + [slice(start, end, step)]
            data = data[tuple(index)]
        else:
            start, end = min(max(start, -1), n - 1), min(max(end, -1), n - 1)
            idx = torch.arange(start, end, step, device=data.device)
            data = data.index_select(axis, idx)
    return [data]


@register("Split", check=lambda n: const_or_computed(n, 1))
def _split(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    data = x[0]
    axis = int(attrs.get("axis", 0))
    n = data.shape[axis]
    parts = _ints(x[1]) if len(x) > 1 and x[1] is not None else attrs.get("split")
    if parts is None:
        count = int(attrs.get("num_outputs", attrs["_num_outputs"]))
        chunk = -(-n // count)  # ceil: the last part may be smaller (opset 18 num_outputs)
        parts = [min(chunk, n - i * chunk) for i in range(count)]
    return list(torch.split(data, list(parts), dim=axis))


@register("Gather")
def _gather(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    data, idx = x[0], x[1].to(torch.int64)
    axis = int(attrs.get("axis", 0)) % data.dim()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = data.index_select(axis, idx.reshape(-1))
    return [out.reshape(list(data.shape[:axis]) + list(idx.shape) + list(data.shape[axis + 1:]))]


@register("Shape")
def _shape(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    dims = list(x[0].shape)
    start = attrs.get("start", 0)
    end = attrs.get("end", len(dims))
    return [torch.tensor(dims[start:end], dtype=torch.int64, device=x[0].device)]


_CAST = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
}


@register("Cast", check=lambda n: None if n.attrs.get("to") in _CAST
          else f"Cast to ONNX type {n.attrs.get('to')} is not supported (float types, int32, int64)")
def _cast(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    return [x[0].to(_CAST[int(attrs["to"])])]


@register("Constant", check=lambda n: None if "value" in n.attrs else "Constant without a tensor value")
def _constant(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    value = np.asarray(attrs["value"])
    t = torch.from_numpy(value.astype(np.float32) if value.dtype.kind == "f" else value.astype(np.int64))
    return [t]


@register("Expand", check=lambda n: const_or_computed(n, 1))
def _expand(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    """Bidirectional (numpy) broadcast of the input with the given shape."""
    return [x[0].expand(torch.broadcast_shapes(tuple(x[0].shape), tuple(_ints(x[1]))))]


@register("ConstantOfShape", check=lambda n: const_or_computed(n, 0))
def _constant_of_shape(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    value = np.asarray(attrs.get("value", np.zeros(1, np.float32))).reshape(-1)
    fill = torch.from_numpy(value.astype(np.float32) if value.dtype.kind == "f" else value.astype(np.int64))
    return [fill.to(x[0].device).expand(_ints(x[0])).clone()]


@register("Range", check=lambda n: const_or_computed(n, 0, 1, 2))
def _range(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    """start, start + delta, ... while < limit (> limit for negative delta); dtype of start."""
    start, limit, delta = x[0], x[1], x[2]
    return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)]


# ----------------------------------------------------------------------------- Resize

_COORD_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "half_pixel_symmetric")
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _check_resize(node: Any) -> str | None:
    a = node.attrs
    mode = a.get("mode", "nearest")
    coord = a.get("coordinate_transformation_mode", "half_pixel")
    if mode not in ("nearest", "linear"):
        return f"Resize mode={mode!r} is not supported (nearest, linear)"
    if coord not in _COORD_MODES:
        return f"Resize coordinate_transformation_mode={coord!r} is not supported"
    if mode == "nearest" and a.get("nearest_mode", "round_prefer_floor") not in _NEAREST_MODES:
        return f"Resize nearest_mode={a.get('nearest_mode')!r} is not supported"
    if a.get("antialias", 0):
        return "Resize antialias=1 is not supported"
    if a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        return "Resize keep_aspect_ratio_policy other than 'stretch' is not supported"
    scales = 1 if len(node.inputs) == 2 else 2  # opset 10: (X, scales)
    if input_at(node, scales) is None and input_at(node, 3) is None:
        return "Resize needs scales or sizes"
    reason = const_or_computed(node, scales, 3)
    if reason:
        return reason
    s = const_value(node, scales)
    if s is not None and s.size and np.any(s <= 0):
        return "Resize scales must be positive"
    return None


def _source_coords(coord: str, out: int, n: int, scale: float, device: torch.device) -> Tensor:
    """x_orig for every output index of one axis (float32, like onnxruntime)."""
    x = torch.arange(out, dtype=torch.float32, device=device)
    s = torch.tensor(scale, dtype=torch.float32)
    if coord == "asymmetric":
        return x / s
    if coord == "align_corners":
        return x * ((n - 1) / (out - 1)) if out > 1 else torch.zeros_like(x)
    if coord == "pytorch_half_pixel" and out <= 1:
        return torch.zeros_like(x)
    if coord == "half_pixel_symmetric":
        adjust = out / (s * n)
        return n / 2 * (1 - adjust) + (x + 0.5) / s - 0.5
    return (x + 0.5) / s - 0.5


def _nearest_index(pos: Tensor, mode: str, n: int) -> Tensor:
    if mode == "floor":
        idx = torch.floor(pos)
    elif mode == "ceil":
        idx = torch.ceil(pos)
    else:
        fl = torch.floor(pos)
        tie = pos - fl == 0.5
        idx = torch.where(tie, fl if mode == "round_prefer_floor" else fl + 1, torch.round(pos))
    return idx.clamp(0, n - 1).to(torch.int64)


def _resize_targets(attrs: Mapping[str, Any], x: list[Tensor | None], shape: Sequence[int]
                    ) -> tuple[list[int], list[int], list[float]]:
    """(axes, output sizes, scales) of the resized axes."""
    rank = len(shape)
    axes = [a % rank for a in attrs.get("axes", range(rank))]
    scales_in = x[1] if len(x) == 2 else (x[2] if len(x) > 2 else None)
    sizes_in = x[3] if len(x) > 3 else None
    if sizes_in is not None and sizes_in.numel():
        sizes = _ints(sizes_in)
        scales = [float(np.float32(o) / np.float32(shape[a])) for o, a in zip(sizes, axes)]
    else:
        scales = [float(v) for v in scales_in.to(torch.float32).reshape(-1).tolist()]
        sizes = [int(math.floor(shape[a] * np.float32(s))) for a, s in zip(axes, scales)]
    return axes, sizes, scales


@register("Resize", check=_check_resize)
def _resize(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    data = x[0]
    mode = attrs.get("mode", "nearest")
    coord = attrs.get("coordinate_transformation_mode", "half_pixel")
    nearest = attrs.get("nearest_mode", "round_prefer_floor")
    for axis, out, scale in zip(*_resize_targets(attrs, x, data.shape)):
        n = data.shape[axis]
        if out == n and scale == 1.0:
            continue
        pos = _source_coords(coord, out, n, scale, data.device)
        if mode == "nearest":
            data = data.index_select(axis, _nearest_index(pos, nearest, n))
            continue
        pos = pos.clamp(0, n - 1)
        lo = torch.floor(pos)
        frac = (pos - lo).to(data.dtype).reshape([-1] + [1] * (data.dim() - 1 - axis))
        lo = lo.to(torch.int64)
        hi = (lo + 1).clamp(max=n - 1)
        a, b = data.index_select(axis, lo), data.index_select(axis, hi)
        data = a * (1 - frac) + b * frac
    return [data]
