"""Neural-network ONNX ops in torch: convolutions, Gemm/MatMul, pooling, reductions,
normalisation, Softmax.

Padding (Conv, ConvTranspose, pools), per spatial axis with input size n, kernel k, stride s,
dilation d and effective kernel dk = (k - 1) d + 1:

  * NOTSET: explicit ``pads = [b_1, ..., b_m, e_1, ..., e_m]`` (begin values, then end values);
  * VALID: no padding;
  * SAME_UPPER / SAME_LOWER: out = ceil(n / s), total = max(0, (out - 1) s + dk - n), split as
    (total // 2, total - total // 2) for SAME_UPPER, the other way round for SAME_LOWER.

Asymmetric pads are applied with ``F.pad`` before the torch op (zeros for Conv/AveragePool, -inf
for MaxPool). Pool output sizes: out = floor((n + b + e - dk) / s) + 1 (``ceil`` with
``ceil_mode``, dropping a last window that would start in the end padding); the end is padded
further when a ceil-mode window runs past it. AveragePool divides each window sum by the number
of input elements in it, or with ``count_include_pad`` by the elements inside the explicit pads
(window taps summed in raster order; onnxruntime's MLAS kernels sum in their own order, so
AveragePool agrees to ~2 ulp, not bit for bit; MaxPool is exact).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from onnxq.torchify.registry import input_at, register

_AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


def _pads(attrs: Mapping[str, Any], sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
          dilations: Sequence[int]) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial axis from ``auto_pad`` / ``pads``."""
    nd = len(sizes)
    auto = attrs.get("auto_pad", "NOTSET")
    if auto == "VALID":
        return [(0, 0)] * nd
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for n, k, s, d in zip(sizes, kernel, strides, dilations):
            total = max(0, (math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n)
            small, big = total // 2, total - total // 2
            out.append((small, big) if auto == "SAME_UPPER" else (big, small))
        return out
    pads = list(attrs.get("pads", [0] * (2 * nd)))
    return list(zip(pads[:nd], pads[nd:]))


def _torch_pad(pads: Sequence[tuple[int, int]]) -> list[int]:
    """ONNX per-axis (begin, end) pads -> the F.pad list (last axis first)."""
    flat: list[int] = []
    for b, e in reversed(pads):
        flat += [b, e]
    return flat


def _check_auto_pad(node: Any) -> str | None:
    auto = node.attrs.get("auto_pad", "NOTSET")
    return None if auto in _AUTO_PADS else f"{node.op} auto_pad={auto!r} is not supported"


def _geometry(attrs: Mapping[str, Any], nd: int) -> tuple[list[int], list[int]]:
    return list(attrs.get("strides", [1] * nd)), list(attrs.get("dilations", [1] * nd))


@register("Conv", check=_check_auto_pad)
def _conv(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    data, weight = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    nd = data.dim() - 2
    strides, dilations = _geometry(attrs, nd)
    pads = _pads(attrs, data.shape[2:], weight.shape[2:], strides, dilations)
    padding: list[int] | int = [b for b, _ in pads]
    if any(b != e for b, e in pads):
        data, padding = F.pad(data, _torch_pad(pads)), 0
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return [conv(data, weight, bias, strides, padding, dilations, int(attrs.get("group", 1)))]


@register("ConvTranspose", check=_check_auto_pad)
def _conv_transpose(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    """ONNX ConvTranspose: full transposed conv, then output_padding zeros at the end, then crop pads.

    out_i = s (n - 1) + output_padding + dk - b - e; with ``output_shape`` the total padding is
    derived from it (split head/tail as ``auto_pad`` says, SAME_UPPER putting the odd one last).
    """
    data, weight = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    nd = data.dim() - 2
    strides, dilations = _geometry(attrs, nd)
    kernel = weight.shape[2:]
    out_pad = list(attrs.get("output_padding", [0] * nd))
    auto = attrs.get("auto_pad", "NOTSET")
    sizes = data.shape[2:]
    full = [s * (n - 1) + (k - 1) * d + 1 + op
            for n, k, s, d, op in zip(sizes, kernel, strides, dilations, out_pad)]
    if "output_shape" in attrs or auto in ("SAME_UPPER", "SAME_LOWER"):
        if "output_shape" in attrs:
            target = list(attrs["output_shape"])[-nd:]
        else:
            target = [n * s for n, s in zip(sizes, strides)]
        pads = []
        for f, t in zip(full, target):
            total = f - t
            small, big = total // 2, total - total // 2
            pads.append((small, big) if auto == "SAME_UPPER" else (big, small))
    elif auto == "VALID":
        pads = [(0, 0)] * nd
    else:
        p = list(attrs.get("pads", [0] * (2 * nd)))
        pads = list(zip(p[:nd], p[nd:]))
    conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    y = conv_t(data, weight, None, strides, 0, 0, int(attrs.get("group", 1)), dilations)
    y = F.pad(y, _torch_pad([(-b, op - e) for (b, e), op in zip(pads, out_pad)]))
    if bias is not None:
        y = y + bias.reshape([1, -1] + [1] * nd)
    return [y]


@register("Gemm")
def _gemm(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    a, b = x[0], x[1]
    c = x[2] if len(x) > 2 else None
    if attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if attrs.get("transB", 0):
        b = b.transpose(0, 1)
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    y = a @ b
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return [y]


@register("MatMul")
def _matmul(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    return [torch.matmul(x[0], x[1])]


@register("GlobalAveragePool")
def _global_avg_pool(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    return [x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True)]


@register("GlobalMaxPool")
def _global_max_pool(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    return [x[0].amax(dim=tuple(range(2, x[0].dim())), keepdim=True)]


def _pool_layout(attrs: Mapping[str, Any], sizes: Sequence[int]
                 ) -> tuple[list[int], list[int], list[int], list[tuple[int, int]], list[int], list[int]]:
    """kernel, strides, dilations, explicit (begin, end) pads, extra end padding, output sizes."""
    kernel = list(attrs["kernel_shape"])
    nd = len(kernel)
    strides, dilations = _geometry(attrs, nd)
    pads = _pads(attrs, sizes, kernel, strides, dilations)
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    extra, outs = [], []
    for n, k, s, d, (b, e) in zip(sizes, kernel, strides, dilations, pads):
        span, dk = n + b + e, (k - 1) * d + 1
        out = ((span - dk + s - 1) // s if ceil_mode else (span - dk) // s) + 1
        if ceil_mode and (out - 1) * s >= n + b:  # the last window would start in the end padding
            out -= 1
        outs.append(out)
        extra.append(max(0, (out - 1) * s + dk - span))
    return kernel, strides, dilations, pads, extra, outs


def _check_pool(node: Any) -> str | None:
    reason = _check_auto_pad(node)
    if reason:
        return reason
    if "kernel_shape" not in node.attrs:
        return f"{node.op} without kernel_shape"
    if node.op == "MaxPool" and len(node.outputs) > 1 and node.outputs[1].name:
        return "MaxPool Indices output is not supported"
    if node.op == "MaxPool" and node.attrs.get("storage_order", 0):
        return "MaxPool storage_order=1 is not supported"
    return None


@register("MaxPool", check=_check_pool)
def _max_pool(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    data = x[0]
    kernel, strides, dilations, pads, extra, _ = _pool_layout(attrs, data.shape[2:])
    full = [(b, e + ex) for (b, e), ex in zip(pads, extra)]
    fill = float("-inf") if data.is_floating_point() else int(torch.iinfo(data.dtype).min)
    data = F.pad(data, _torch_pad(full), value=fill)
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(kernel) - 1]
    return [pool(data, kernel, strides, 0, dilations)]


def _window_counts(n: int, k: int, s: int, d: int, out: int, lo: int, hi: int) -> list[int]:
    """Per output index: how many window taps (padded coordinates) fall in [lo, hi)."""
    return [sum(1 for j in range(k) if lo <= o * s + j * d < hi) for o in range(out)]


@register("AveragePool", check=_check_pool)
def _avg_pool(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    data = x[0]
    sizes = list(data.shape[2:])
    kernel, strides, dilations, pads, extra, outs = _pool_layout(attrs, sizes)
    include_pad = bool(attrs.get("count_include_pad", 0))
    padded = F.pad(data, _torch_pad([(b, e + ex) for (b, e), ex in zip(pads, extra)]))
    total: Tensor | None = None
    for taps in itertools.product(*(range(k) for k in kernel)):  # works for any dilation
        index = [slice(None), slice(None)]
        index += [slice(j * d, j * d + (o - 1) * s + 1, s)
                  for j, d, o, s in zip(taps, dilations, outs, strides)]
        part = padded[tuple(index)]
        total = part if total is None else total + part
    count = torch.ones((), dtype=data.dtype, device=data.device)
    for axis, (n, k, s, d, o, (b, e)) in enumerate(zip(sizes, kernel, strides, dilations, outs, pads)):
        lo, hi = (0, n + b + e) if include_pad else (b, b + n)
        c = torch.tensor(_window_counts(n, k, s, d, o, lo, hi), dtype=data.dtype, device=data.device)
        count = count * c.reshape([-1] + [1] * (len(sizes) - 1 - axis))
    return [total / count]


@register("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2")
def _reduce(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    """Axes from input 1 (ReduceSum opset >= 13, the others >= 18) or the ``axes`` attribute;
    no axes reduces everything unless ``noop_with_empty_axes``. ReduceL2 = sqrt(sum(x^2)) (the
    L2 normalisation of sentence-embedding heads)."""
    data = x[0]
    axes = x[1].reshape(-1).tolist() if len(x) > 1 and x[1] is not None else attrs.get("axes")
    keep = bool(attrs.get("keepdims", 1))
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return [data]
        axes = list(range(data.dim()))
    dims = tuple(int(a) % data.dim() for a in axes)
    fn = {"ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceMax": torch.amax, "ReduceMin": torch.amin,
          "ReduceL2": torch.linalg.vector_norm}  # vector_norm's default ord is 2
    return [fn[attrs["_op"]](data, dim=dims, keepdim=keep)]


@register("LayerNormalization")
def _layer_norm(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    """y = (x - mean) / sqrt(var + eps) * scale + bias over axes [axis, rank); also Mean, InvStdDev."""
    data, scale = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    axis = int(attrs.get("axis", -1)) % data.dim()
    dims = tuple(range(axis, data.dim()))
    mean = data.mean(dim=dims, keepdim=True)
    centred = data - mean
    var = (centred * centred).mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(var + float(attrs.get("epsilon", 1e-5)))
    y = centred * inv_std * scale
    if bias is not None:
        y = y + bias
    return [y, mean, inv_std][: attrs.get("_num_outputs", 1)]


@register("Softmax")
def _softmax(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    return [torch.softmax(x[0], dim=int(attrs.get("axis", -1)))]


def _check_batchnorm(node: Any) -> str | None:
    if node.attrs.get("training_mode", 0):
        return "BatchNormalization training_mode=1 is not supported (inference only)"
    if len([t for t in node.outputs if t.name]) > 1:
        return "BatchNormalization running-statistics outputs are not supported"
    if input_at(node, 3) is None or input_at(node, 4) is None:
        return "BatchNormalization needs mean and variance inputs"
    return None


@register("BatchNormalization", check=_check_batchnorm)
def _batch_norm(attrs: Mapping[str, Any], x: list[Tensor | None]) -> list[Tensor]:
    data, scale, bias, mean, var = x[:5]
    return [F.batch_norm(data, mean, var, scale, bias, False, 0.0, float(attrs.get("epsilon", 1e-5)))]
