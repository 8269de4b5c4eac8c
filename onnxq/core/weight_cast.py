"""Narrow weights onnxruntime's 8-bit kernels can run: ``int2/int4 constant -> Cast(int8) -> DequantizeLinear``.

onnxruntime has no CPU kernel for int2 or int4 weights in its QDQ fusion: at ORT_ENABLE_EXTENDED/ALL
``DQ(x) -> Conv/MatMul <- DQ(int2 W) -> Q`` becomes a QLinearConv / QLinearMatMul that rejects the int2
tensor, so the session cannot be built (:func:`onnxq.ternary.export.int2_support`), and an int4 weight
is not fused at all: the layer runs as DequantizeLinear + float Conv, slower than the float model.
Putting a Cast to int8 between the constant and its DequantizeLinear keeps the file at 2 or 4 bits a
weight; constant folding (ORT_ENABLE_BASIC, before the fusion) replaces ``Cast(constant)`` by an int8
constant, and the fusion then builds int8 kernels:

    file:     W_int4 --Cast(to=INT8)--> W_int8 --DequantizeLinear(s)--> W_hat
    loaded:   W_int8 (folded)          --DequantizeLinear(s)--> W_hat     -> QLinearConv / QLinearMatMul

The values are unchanged (int2 [-2, 1] and int4 [-8, 7] are subsets of int8, uint4 of uint8), so
``W_hat`` is bit-identical to the plain graph at every optimization level, and codes this narrow never
saturate the 8-bit kernels (:mod:`onnxq.targets.ort_kernels`: ``|q_k| + |q_k+1| <= 16``).

A 4-bit weight with zero-points (asymmetric grids) is read as ``q - z`` instead, with zero-point 0:
onnxruntime's QLinearConv runs per-channel weight zero-points on a slow path (30 to 40 times its speed
without them on EfficientNet-Lite0), and ``q - z`` lies in [-15, 15], so it is exact in int8:

    file:     W_int4 --Cast(INT8)--> - Reshape(Cast(z_int4, INT8)) --> DequantizeLinear(s, 0)
The readers of QDQ constants (:class:`onnxq.targets.rules.QDQGraph`,
:func:`onnxq.report.metrics.check_qdq_constants`, :mod:`onnxq.ternary.check`) see through such a Cast with
:func:`folded_casts`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxq.core import mapped

__all__ = ["CAST_SUFFIX", "WIDER", "cast_source", "constant_types", "folded_casts", "folded_constants",
           "widen_weights"]

#: Suffix of the 8-bit tensor a Cast makes from a narrow constant.
CAST_SUFFIX = "_int8"
#: narrow type -> the 8-bit type it is cast to.
WIDER: dict[int, int] = {TensorProto.INT2: TensorProto.INT8, TensorProto.INT4: TensorProto.INT8,
                         TensorProto.UINT4: TensorProto.UINT8}
_INTEGER_TYPES = frozenset({TensorProto.INT2, TensorProto.UINT2, TensorProto.INT4, TensorProto.UINT4,
                            TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16,
                            TensorProto.INT32})


def constant_types(graph: onnx.GraphProto) -> dict[str, int]:
    """Element type of every constant: initializers and Constant nodes' values."""
    types = {t.name: t.data_type for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    types[node.output[0]] = attr.t.data_type
    return types


def folded_casts(graph: onnx.GraphProto) -> dict[str, tuple[str, int]]:
    """``{cast output: (constant it reads, target type)}`` for every integer-to-integer Cast of a
    constant in ``graph``: tensors a runtime's constant folding turns into constants."""
    types = constant_types(graph)
    out: dict[str, tuple[str, int]] = {}
    for node in graph.node:
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx") or not node.input:
            continue
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if types.get(node.input[0]) in _INTEGER_TYPES and to in _INTEGER_TYPES:
            out[node.output[0]] = (node.input[0], int(to))
    return out


def cast_source(casts: dict[str, tuple[str, int]], name: str) -> str:
    """The constant behind ``name``: what the folded Cast making it reads (``casts`` = :func:`folded_casts`),
    else ``name`` itself."""
    return casts[name][0] if name in casts else name


def folded_constants(graph: onnx.GraphProto) -> dict[str, tuple[np.ndarray, int]]:
    """``{tensor: (values, element type)}`` for every tensor constant folding computes from constants in
    ``graph``: integer Casts of constants and ``Sub`` / ``Reshape`` of such values (the forms
    :func:`widen_weights` writes), in graph order."""
    values: dict[str, tuple[np.ndarray, int]] = {}
    for t in graph.initializer:
        try:
            values[t.name] = (mapped.values(t), t.data_type)
        except Exception:  # external data not loaded, unknown type
            continue
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    values[node.output[0]] = (mapped.values(attr.t), attr.t.data_type)
    out: dict[str, tuple[np.ndarray, int]] = {}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or not node.input or any(i not in values for i in node.input if i):
            continue
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if values[node.input[0]][1] in _INTEGER_TYPES and to in _INTEGER_TYPES:
                result = (values[node.input[0]][0].astype(helper.tensor_dtype_to_np_dtype(to)), int(to))
            else:
                continue
        elif node.op_type == "Sub" and values[node.input[0]][1] in _INTEGER_TYPES:
            a, kind = values[node.input[0]]
            result = ((a - values[node.input[1]][0]).astype(a.dtype), kind)
        elif node.op_type == "Reshape" and values[node.input[0]][1] in _INTEGER_TYPES:
            a, kind = values[node.input[0]]
            result = (a.reshape(values[node.input[1]][0]), kind)
        else:
            continue
        values[node.output[0]] = out[node.output[0]] = result
    return out


def widen_weights(model: onnx.ModelProto, narrow: frozenset[int] = frozenset({TensorProto.INT2}),
                  skip: frozenset[str] = frozenset()) -> int:
    """Insert ``Cast`` to the 8-bit type (:data:`WIDER`) between every constant of a type in ``narrow`` and
    the DequantizeLinear nodes reading it (codes and zero-point: both inputs must share a type), in place;
    a 4-bit weight with nonzero zero-points is read as ``q - z`` with zero-point 0 (module docstring).
    Constants named in ``skip`` are left alone. Returns the number of code constants wrapped; a model
    without such constants is unchanged."""
    graph = model.graph
    types = constant_types(graph)
    names = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | \
        {i.name for i in graph.input}
    casts: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    wrapped = 0
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        kind = types.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
        kind = None if node.input and node.input[0] in skip else kind
        if kind in narrow and kind in (TensorProto.INT4, TensorProto.UINT4) and _has_zero_point(node, inits):
            wrapped += 1
            new_nodes.extend(_centred(graph, node, inits[node.input[0]], names))
        elif kind in narrow and kind in WIDER:
            wrapped += node.input[0] not in casts
            for idx in (0, 2):  # the codes and (if given) the zero-point, which must have their type
                src = node.input[idx] if len(node.input) > idx else ""
                if not src or types.get(src) != kind:
                    continue
                if src not in casts:
                    out = src + CAST_SUFFIX
                    while out in names:
                        out += "_"
                    names.add(out)
                    casts[src] = out
                    cast = helper.make_node("Cast", [src], [out], name=out + "_Cast", to=WIDER[kind])
                    new_nodes.append(cast)
                node.input[idx] = casts[src]
        new_nodes.append(node)
    if len(new_nodes) != len(graph.node):
        del graph.node[:]
        graph.node.extend(new_nodes)
    return wrapped


def _has_zero_point(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """A constant, nonzero zero-point (both inputs initializers)."""
    if len(node.input) < 3 or not node.input[2] or node.input[0] not in inits or node.input[2] not in inits:
        return False
    return bool(np.any(mapped.values(inits[node.input[2]])))


def _centred(graph: onnx.GraphProto, dq: onnx.NodeProto, codes: onnx.TensorProto, names: set[str]
             ) -> list[onnx.NodeProto]:
    """The nodes computing ``int8(q) - reshape(int8(z))`` for ``dq``, which then reads them with a zero
    zero-point; rewires ``dq`` in place."""
    def fresh(name: str) -> str:
        while name in names:
            name += "_"
        names.add(name)
        return name

    q, z = dq.input[0], dq.input[2]
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    shape = [1] * len(codes.dims)
    shape[axis % max(1, len(codes.dims))] = -1
    q8, z8, zb, centred = (fresh(q + CAST_SUFFIX), fresh(z + CAST_SUFFIX), fresh(z + "_per_row"),
                           fresh(q + "_centred"))
    shape_name, zero_name = fresh(z + "_per_row_shape"), fresh(z + "_zero")
    z_values = mapped.values(next(t for t in graph.initializer if t.name == z))
    graph.initializer.extend([numpy_helper.from_array(np.asarray(shape, dtype=np.int64), shape_name),
                              numpy_helper.from_array(np.zeros(z_values.shape, np.int8), zero_name)])
    dq.input[0], dq.input[2] = centred, zero_name
    return [helper.make_node("Cast", [q], [q8], name=q8 + "_Cast", to=TensorProto.INT8),
            helper.make_node("Cast", [z], [z8], name=z8 + "_Cast", to=TensorProto.INT8),
            helper.make_node("Reshape", [z8, shape_name], [zb], name=zb + "_Reshape"),
            helper.make_node("Sub", [q8, zb], [centred], name=centred + "_Sub")]
