"""INT2 weights onnxruntime's integer kernels can run: ``int2 constant -> Cast(int8) -> DequantizeLinear``.

onnxruntime 1.31 implements DequantizeLinear of an int2 constant, but at ORT_ENABLE_EXTENDED/ALL its
QDQ fusion turns ``DQ(x) -> Conv/MatMul <- DQ(int2 W) -> Q`` into QLinearConv / QLinearMatMul with
the int2 tensor as the weight, which those kernels reject, so the session cannot be built (see
:func:`onnxq.ternary.export.int2_support`). Putting a Cast to int8 between the int2 constant and its
DequantizeLinear keeps the file at 2 bits a weight; constant folding (ORT_ENABLE_BASIC, before the
fusion) replaces ``Cast(constant)`` by an int8 constant, and the fusion then builds int8 kernels:

    file:     W_int2 --Cast(to=INT8)--> W_int8 --DequantizeLinear(s)--> W_hat
    loaded:   W_int8 (folded)          --DequantizeLinear(s)--> W_hat     -> QLinearConv / QLinearMatMul

The values are unchanged (int2 [-2, 1] is a subset of int8), so ``W_hat`` is bit-identical to the
plain int2 graph at every optimization level. The readers of QDQ constants (:class:`onnxq.targets.rules.QDQGraph`,
:func:`onnxq.report.metrics.check_qdq_constants`, :mod:`onnxq.ternary.check`) see through such a Cast with
:func:`folded_casts`.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

__all__ = ["CAST_SUFFIX", "cast_source", "constant_types", "folded_casts", "widen_int2_weights"]

#: Suffix of the int8 tensor a Cast makes from an int2 constant.
CAST_SUFFIX = "_int8"
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


def widen_int2_weights(model: onnx.ModelProto) -> int:
    """Insert ``Cast(to=INT8)`` between every int2 constant and the DequantizeLinear nodes reading it
    (codes and zero-point: both inputs must share a type), in place. Returns the number of code
    constants wrapped; a model without int2 constants is unchanged."""
    graph = model.graph
    types = constant_types(graph)
    names = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | \
        {i.name for i in graph.input}
    casts: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    wrapped = 0
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input and types.get(node.input[0]) == TensorProto.INT2:
            wrapped += node.input[0] not in casts
            for idx in (0, 2):  # the codes and (if given) the zero-point, which must have their type
                src = node.input[idx] if len(node.input) > idx else ""
                if not src or types.get(src) != TensorProto.INT2:
                    continue
                if src not in casts:
                    out = src + CAST_SUFFIX
                    while out in names:
                        out += "_"
                    names.add(out)
                    casts[src] = out
                    cast = helper.make_node("Cast", [src], [out], name=out + "_Cast", to=TensorProto.INT8)
                    new_nodes.append(cast)
                node.input[idx] = casts[src]
        new_nodes.append(node)
    if casts:
        del graph.node[:]
        graph.node.extend(new_nodes)
    return wrapped
