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
The readers of QDQ constants (:class:`onnxq.targets.rules.QDQGraph`,
:func:`onnxq.report.metrics.check_qdq_constants`, :mod:`onnxq.ternary.check`) see through such a Cast with
:func:`folded_casts`.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

__all__ = ["CAST_SUFFIX", "WIDER", "cast_source", "constant_types", "folded_casts", "widen_weights"]

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


def widen_weights(model: onnx.ModelProto, narrow: frozenset[int] = frozenset({TensorProto.INT2})) -> int:
    """Insert ``Cast`` to the 8-bit type (:data:`WIDER`) between every constant of a type in ``narrow`` and
    the DequantizeLinear nodes reading it (codes and zero-point: both inputs must share a type), in place.
    Returns the number of code constants wrapped; a model without such constants is unchanged."""
    graph = model.graph
    types = constant_types(graph)
    names = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | \
        {i.name for i in graph.input}
    casts: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    wrapped = 0
    for node in graph.node:
        kind = types.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
        if kind in narrow and kind in WIDER:
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
    if casts:
        del graph.node[:]
        graph.node.extend(new_nodes)
    return wrapped
