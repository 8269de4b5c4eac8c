"""The op table: ONNX op type -> torch function, plus per-op support checks.

An op function takes the node's attributes and its input tensors and returns its outputs::

    OpFn = Callable[[Mapping[str, Any], list[Tensor | None]], list[Tensor]]

``attrs`` holds the ONNX attributes of the node (strings decoded, tensors as numpy arrays) plus
a few derived private keys that start with ``_`` (see :func:`node_attrs`): ``_op`` (the op
type, for functions shared by several ops), ``_num_outputs`` (how many outputs the node has)
and whatever the op's ``prepare`` hook adds (e.g. the integer range of a QuantizeLinear, known
only from the zero-point's ONNX type). Omitted optional inputs are ``None``.

Every op assumes the opset >= 13 semantics (onnxq upgrades models to opset >= 13 before it
quantizes); where an older opset moved an input into an attribute (Squeeze axes, Split split,
Clip min/max, Slice starts/ends) both forms are accepted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from torch import Tensor

OpFn = Callable[[Mapping[str, Any], list["Tensor | None"]], list[Tensor]]
CheckFn = Callable[[gs.Node], "str | None"]
PrepareFn = Callable[[gs.Node], dict[str, Any]]

OPS: dict[str, OpFn] = {}
CHECKS: dict[str, CheckFn] = {}
PREPARES: dict[str, PrepareFn] = {}


def register(*ops: str, check: CheckFn | None = None, prepare: PrepareFn | None = None
             ) -> Callable[[OpFn], OpFn]:
    """Decorator registering ``fn`` for each op type in ``ops``.

    Args:
        ops: ONNX op types (default domain).
        check: ``check(node) -> reason | None``; a reason says why this node cannot be converted.
        prepare: ``prepare(node) -> dict`` of derived private attributes (keys start with ``_``).
    """

    def deco(fn: OpFn) -> OpFn:
        for op in ops:
            if op in OPS:
                raise ValueError(f"op {op} registered twice")
            OPS[op] = fn
            if check is not None:
                CHECKS[op] = check
            if prepare is not None:
                PREPARES[op] = prepare
        return fn

    return deco


def _load_ops() -> None:
    # The op families register themselves on import.
    from onnxq.torchify import ops_elementwise, ops_nn, ops_quant, ops_shape  # noqa: F401


def _attr_value(v: Any) -> Any:
    if isinstance(v, gs.Constant):
        return np.asarray(v.values)
    if isinstance(v, bytes):
        return v.decode()
    return v


def node_attrs(node: gs.Node) -> dict[str, Any]:
    """The attribute mapping handed to the node's op function (ONNX attributes + derived keys)."""
    _load_ops()
    attrs = {k: _attr_value(v) for k, v in node.attrs.items()}
    attrs["_num_outputs"] = len(node.outputs)
    attrs["_op"] = node.op
    prepare = PREPARES.get(node.op)
    if prepare is not None:
        attrs.update(prepare(node))
    return attrs


def supported(node: gs.Node) -> str | None:
    """None when ``node`` can run in torch, else the reason it cannot (one line)."""
    _load_ops()
    if node.domain not in (None, "", "ai.onnx"):
        return f"op domain {node.domain!r} is not supported (default ONNX domain only)"
    if node.op not in OPS:
        return f"op {node.op} has no torch implementation"
    check = CHECKS.get(node.op)
    return check(node) if check is not None else None


# ----------------------------------------------------------------- helpers for checks


def is_omitted(t: gs.Tensor | None) -> bool:
    """True for an omitted optional input (graphsurgeon gives it an empty name)."""
    return t is None or (isinstance(t, gs.Variable) and not t.name)


def input_at(node: gs.Node, i: int) -> gs.Tensor | None:
    """Input ``i`` of ``node``, None when absent or omitted."""
    if i >= len(node.inputs) or is_omitted(node.inputs[i]):
        return None
    return node.inputs[i]


def const_or_computed(node: gs.Node, *indices: int) -> str | None:
    """Reason when one of the given (shape-like) inputs is a graph input rather than a constant.

    Shape-like inputs (Reshape's shape, Resize's scales/sizes, Slice's starts/ends, ...) are read
    into Python values at run time. They may be constants or values computed by other nodes of
    the block (``Shape -> Gather -> Concat`` chains); a graph input would make the block's
    structure depend on data fed from outside, which we refuse.
    """
    for i in indices:
        t = input_at(node, i)
        if t is None or isinstance(t, gs.Constant):
            continue
        if not t.inputs:
            return f"{node.op} input {i} ({t.name}) must be a constant (it is a graph input)"
    return None


def const_value(node: gs.Node, i: int) -> np.ndarray | None:
    """Numpy value of constant input ``i``, None if omitted or not constant."""
    t = input_at(node, i)
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None
