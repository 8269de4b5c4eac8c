"""Which 8-bit weights of a QDQ model onnxruntime's saturating CPU kernels would get wrong.

A Conv / Gemm / MatMul whose input comes from a DequantizeLinear and whose weight is an int8
DequantizeLinear constant runs fused in onnxruntime's 8-bit GEMM; on x86 CPUs without VNNI every pair
of codes of one sign along the reduction axis with ``|q_k| + |q_{k+1}| > 128`` can saturate
(:mod:`onnxq.targets.ort_kernels`). This check reads the file alone, so it finds such weights on any
CPU, also on one whose kernels are exact and where both optimisation levels agree.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxq.core import mapped
from onnxq.targets.ort_kernels import layout_of, pair_violations

_WEIGHT_INPUT = {"Conv": 1, "Gemm": 1, "MatMul": 1}


def saturating_pairs(model: onnx.ModelProto) -> dict[str, int]:
    """Node name (or its output name) -> pairs over the limit, for the nodes that have any."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    shapes = {vi.name: vi for vi in [*graph.input, *graph.value_info]}
    out: dict[str, int] = {}
    for node in graph.node:
        if node.op_type not in _WEIGHT_INPUT or len(node.input) < 2:
            continue
        x_dq, w_dq = producer.get(node.input[0]), producer.get(node.input[1])
        if x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        init = inits.get(w_dq.input[0])
        if init is None or init.data_type != onnx.TensorProto.INT8:
            continue
        codes = mapped.values(init)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        layout = layout_of(node.op_type, attrs, codes.shape, _channels(shapes.get(node.input[0])))
        if layout is None:
            continue
        bad = int(pair_violations(layout.to_matrix(codes.astype(np.int64))).sum())
        if bad:
            out[node.name or node.output[0]] = bad
    return out


def _channels(info: onnx.ValueInfoProto | None) -> int | None:
    if info is None or not info.type.tensor_type.HasField("shape"):
        return None
    dims = info.type.tensor_type.shape.dim
    return dims[1].dim_value if len(dims) > 1 and dims[1].HasField("dim_value") else None
