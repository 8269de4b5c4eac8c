"""Weighted layers of a graph: which input is the weight and which the bias, the weight's output-channel
axis, and whether a node is a quantizable weighted op.

A weighted op reads a constant float weight at ``WEIGHT_INPUTS[op][0]`` (and an optional bias at
``WEIGHT_INPUTS[op][1]``); its output channels run along :func:`weight_axis` of the weight.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

#: Ops with a constant weight input that gets a weight DQ: op -> (weight input index, bias index or None).
WEIGHT_INPUTS: dict[str, tuple[int, int | None]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (1, 2),
    "MatMul": (1, None),
}

FLOAT32 = np.dtype(np.float32)


def node_key(node: gs.Node) -> str:
    """A stable, unique label for reports: the node name, else ``op(first output)``."""
    return key_of(node.name, node.op, node.outputs[0].name if node.outputs else "")


def key_of(name: str, op: str, first_output: str) -> str:
    """:func:`node_key` from a node's parts (for an ``onnx.NodeProto`` as well)."""
    return name or f"{op}({first_output})"


def is_float_activation(t: gs.Tensor) -> bool:
    """A non-constant tensor known to be float32."""
    if isinstance(t, gs.Constant) or t.dtype is None:
        return False
    try:
        return np.dtype(t.dtype) == FLOAT32
    except TypeError:
        return False


def weight_axis(node: gs.Node, weight: np.ndarray) -> int | None:
    """Output-channel axis of a weight: Conv 0, ConvTranspose 1 (group 1), Gemm by transB, MatMul last."""
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1 if int(node.attrs.get("group", 1)) == 1 else None
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    if node.op == "MatMul":
        return weight.ndim - 1 if weight.ndim >= 2 else None
    return None


def is_excluded(node: gs.Node, excluded: set[str] | frozenset[str]) -> bool:
    """The user asked to keep ``node`` float, by its name, its :func:`node_key` (an unnamed node) or its op type."""
    return node.name in excluded or node.op in excluded or (not node.name and node_key(node) in excluded)


def weighted_reason(node: gs.Node) -> str | None:
    """None when the node is a quantizable weighted op, else why not."""
    if node.op not in WEIGHT_INPUTS:
        return "not a weighted op"
    w_idx, _ = WEIGHT_INPUTS[node.op]
    if len(node.inputs) <= w_idx:
        return "missing weight input"
    w = node.inputs[w_idx]
    if not isinstance(w, gs.Constant):
        return "weight is not a constant (dynamic weights stay float)"
    if np.asarray(w.values).dtype != FLOAT32:
        return f"weight dtype {np.asarray(w.values).dtype} is not float32"
    if not is_float_activation(node.inputs[0]):
        return "activation input is not a known float32 tensor"
    if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
        return "Gemm with transA=1 has no integer kernel"
    return None


def weighted_layers(graph: gs.Graph, exclude: tuple[str, ...] | frozenset[str]) -> list[gs.Node]:
    """The quantizable weighted ops that the user did not exclude, in graph order.

    The first and last of them are the layers the first/last bit width applies to.
    """
    excluded = set(exclude)
    return [n for n in graph.nodes if weighted_reason(n) is None and not is_excluded(n, excluded)]
