"""Channel layout of Conv and Gemm weights: output and input channels, their ranges and rescaling, and
reading and writing a layer's weight and bias.

Shared by the float-phase passes that rescale channels (cross-layer equalization, bias absorption)
and by bias correction. A Conv weight is ``(C_out, C_in/g, k...)``; a Gemm weight is ``B`` with
output channels on its rows when ``transB = 1``, on its columns otherwise. :func:`_grouped` views
any of them as ``(g, C_out/g, C_in/g, taps)`` so one formula serves grouped and depthwise convs.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.core.graph import FreshNames, constant, is_default_domain

LAYER_OPS = ("Conv", "Gemm")


class Refused(Exception):
    """A layer or pair cannot be rewritten (message = reason)."""


def out_axis(node: gs.Node) -> int:
    """Axis of the weight that indexes output channels."""
    return 0 if node.op == "Conv" or int(node.attrs.get("transB", 0)) else 1


def _grouped(node: gs.Node, w: np.ndarray) -> np.ndarray:
    """``w`` as ``(g, C_out/g, C_in/g, taps)``: entry ``[k, o, j]`` reads input channel ``k C_in/g + j``."""
    if node.op == "Gemm":
        m = w if int(node.attrs.get("transB", 0)) else w.T
        return m.reshape(1, m.shape[0], m.shape[1], 1)
    g = int(node.attrs.get("group", 1))
    return w.reshape(g, w.shape[0] // g, w.shape[1], -1)


def out_channels(node: gs.Node, w: np.ndarray) -> int:
    return int(w.shape[out_axis(node)])


def in_channels(node: gs.Node, w: np.ndarray) -> int:
    g4 = _grouped(node, w)
    return int(g4.shape[0] * g4.shape[2])


def out_ranges(node: gs.Node, w: np.ndarray) -> np.ndarray:
    """``r_i = max |W|`` over the weights producing output channel ``i``."""
    a = np.moveaxis(np.abs(w), out_axis(node), 0)
    return a.reshape(a.shape[0], -1).max(axis=1)


def in_ranges(node: gs.Node, w: np.ndarray) -> np.ndarray:
    """``r_i = max |W|`` over the weights reading input channel ``i``."""
    return np.abs(_grouped(node, w)).max(axis=(1, 3)).reshape(-1)


def scale_out(node: gs.Node, w: np.ndarray, f: np.ndarray) -> np.ndarray:
    shape = [1] * w.ndim
    shape[out_axis(node)] = -1
    return w * f.reshape(shape)


def scale_in(node: gs.Node, w: np.ndarray, f: np.ndarray) -> np.ndarray:
    g4 = _grouped(node, w)
    scaled = g4 * f.reshape(g4.shape[0], 1, g4.shape[2], 1)
    if node.op == "Gemm" and not int(node.attrs.get("transB", 0)):
        return scaled.reshape(scaled.shape[1:3]).T
    return scaled.reshape(w.shape)


def response(node: gs.Node, w: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Change of each output channel when input channel ``i`` is shifted by ``v_i`` everywhere.

    ``sum_{j,k} W[o, j, k] v[in(o, j)]`` (all spatial taps; exact away from zero-padded borders),
    times ``alpha`` for Gemm.
    """
    g4 = _grouped(node, w)
    out = np.einsum("gojk,gj->go", g4, np.asarray(v, dtype=np.float64).reshape(g4.shape[0], g4.shape[2]))
    alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
    return alpha * out.reshape(-1)


def bias_tensor(node: gs.Node) -> gs.Tensor | None:
    return node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None


def effective_bias(node: gs.Node, c_out: int) -> np.ndarray:
    """The per-channel bias as float64 ``(c_out,)`` (Gemm: ``beta * C``); zeros when absent."""
    t = bias_tensor(node)
    if t is None:
        return np.zeros(c_out)
    if not isinstance(t, gs.Constant):
        raise Refused(f"{node.op} bias is not constant")
    b = np.asarray(t.values, dtype=np.float64)
    if node.op == "Gemm":
        b = float(node.attrs.get("beta", 1.0)) * b
        if b.size == 1:
            return np.full(c_out, float(b.reshape(-1)[0]))
        if b.shape not in ((c_out,), (1, c_out)):
            raise Refused(f"Gemm C of shape {b.shape} is not one value per output channel")
    elif b.shape != (c_out,):
        raise Refused(f"Conv bias of shape {b.shape} for {c_out} output channels")
    return b.reshape(-1)


def write_bias(node: gs.Node, values: np.ndarray, names: FreshNames, suffix: str) -> gs.Constant:
    """Give ``node`` a new ``(C_out,)`` bias initializer (Gemm: ``beta`` becomes 1)."""
    old = bias_tensor(node)
    base = old.name if old is not None else f"{node.name or node.op}_bias"
    dtype = np.asarray(node.inputs[1].values).dtype
    t = constant(names.fresh(f"{base}_{suffix}"), np.asarray(values).astype(dtype))
    if len(node.inputs) > 2:
        node.inputs[2] = t
    else:
        node.inputs.append(t)
    if node.op == "Gemm":
        node.attrs["beta"] = 1.0
    return t


def write_weight(node: gs.Node, values: np.ndarray, names: FreshNames, suffix: str) -> None:
    w = node.inputs[1]
    node.inputs[1] = constant(names.fresh(f"{w.name}_{suffix}"), values.astype(np.asarray(w.values).dtype))


def layer_problem(node: gs.Node, *, allow_shared_weight: bool = False) -> str | None:
    """None when ``node`` is a Conv/Gemm whose weight and bias can be rewritten, else the reason."""
    if node.op not in LAYER_OPS or not is_default_domain(node):
        return f"{node.op} is not Conv or Gemm"
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(w, gs.Constant):
        return "weight is not a constant initializer"
    values = np.asarray(w.values)
    if not np.issubdtype(values.dtype, np.floating):
        return f"weight dtype {values.dtype} is not float"
    if not allow_shared_weight and len(w.outputs) != 1:
        return f"weight {w.name} is shared with another node"
    b = bias_tensor(node)
    if b is not None and len(b.outputs) != 1:
        return f"bias {b.name} is shared with another node"
    if node.op == "Gemm" and (int(node.attrs.get("transA", 0)) or values.ndim != 2):
        return "Gemm with transA=1 or a weight that is not 2-D"
    if node.op == "Conv" and (values.ndim < 3 or values.shape[0] % int(node.attrs.get("group", 1))):
        return f"Conv weight of shape {values.shape} does not match group={node.attrs.get('group', 1)}"
    try:
        effective_bias(node, out_channels(node, values))
    except Refused as exc:
        return str(exc)
    return None


def clip_bounds(node: gs.Node) -> tuple[float, float] | None:
    """(min, max) of a Clip (attributes before opset 11, inputs after); None when not constant."""
    lo, hi = float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    bounds = [lo, hi]
    for i, t in enumerate(node.inputs[1:3]):
        if t.is_empty():
            continue
        if not isinstance(t, gs.Constant) or np.asarray(t.values).size != 1:
            return None
        bounds[i] = float(np.asarray(t.values).reshape(-1)[0])
    return bounds[0], bounds[1]
