"""A quantized model with one switch per candidate op, to measure what keeping each op float buys.

A candidate is an op of the QDQ model that reads at least one DequantizeLinear output and that the
float model has too (found by name, else by its first output: the node's key, which ``exclude``
accepts). For candidate ``n`` with quantized inputs ``x_j``, the switch model computes::

    n(x'_1, ..., x'_k),   x'_j = Where(keep_n, x_j, DQ(...)_j)

where ``x_j`` is the float tensor behind the DQ: the float weight or bias of a constant DQ (from the float
reference, by the QDQ naming rule of :mod:`onnxq.core.qdq`), or the input of an activation's
``Q -> [Clip] -> DQ`` chain where that input is a graph input or the output of an op running float
(no DequantizeLinear input). ``keep_n`` is a boolean scalar graph input: all False is the quantized
model exactly (``Where`` passes its third input through), and ``keep_n = True`` is what
``exclude = [n]`` does: ``n`` runs float on its float weights, reads a float producer's output
unrounded (InsertQDQPass's float readers), and still reads an integer op's output quantized (the
integer kernel writes only codes), while every other reader is unchanged. Placement rules that then
let neighbours run float too are not modelled: the search re-quantizes with the chosen set and
measures the real model.

One onnxruntime session (ORT_DISABLE_ALL: the QDQ simulation) answers every subset of switches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.core import mapped
from onnxq.core.layers import key_of
from onnxq.core.qdq import base_of

#: Ops that onnxq writes around a quantized tensor: never candidates.
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "Clip"})
FLAG_PREFIX = "onnxq_keep_float_"


@dataclass(frozen=True)
class Candidate:
    """One op that can be kept float: its ``exclude`` key, op type and switch input."""

    key: str
    op: str
    flag: str
    inputs: int  # quantized inputs it reads


@dataclass(frozen=True)
class SwitchModel:
    model: onnx.ModelProto
    candidates: tuple[Candidate, ...]

    def feed(self, keep: set[str] | frozenset[str]) -> dict[str, np.ndarray]:
        """The switch inputs with the candidates whose keys are in ``keep`` set."""
        return {c.flag: np.array(c.key in keep) for c in self.candidates}


def node_keys(reference: onnx.ModelProto) -> tuple[dict[str, str], dict[str, str]]:
    """(node name -> key, first output -> key) of the float model's nodes (:func:`onnxq.core.layers.node_key`)."""
    by_name, by_output = {}, {}
    for n in reference.graph.node:
        key = key_of(n.name, n.op_type, n.output[0] if n.output else "")
        if n.name:
            by_name[n.name] = key
        if n.output:
            by_output[n.output[0]] = key
    return by_name, by_output


def build_switch_model(quantized: onnx.ModelProto, reference: onnx.ModelProto,
                       skip: frozenset[str] = frozenset(), weighted: bool = True) -> SwitchModel:
    """The switch model of ``quantized`` (see the module docstring); ``reference`` is the float model the
    pipeline quantized (after the float phase), which holds the float weights by name. Ops whose keys are in
    ``skip`` (already excluded: an excluded op may still read a tensor an integer op writes) are no candidates,
    nor, unless ``weighted``, ops that read a constant DQ (a quantized weight)."""
    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    constants = {i.name for i in graph.initializer}
    dq_outputs = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    integer = {o for n in graph.node if any(i in dq_outputs for i in n.input) for o in n.output}
    floats = {i.name: i for i in reference.graph.initializer}
    by_name, by_output = node_keys(reference)
    added: dict[str, str] = {}  # float weight name -> its initializer in the switch model
    candidates: list[Candidate] = []
    ordered: list[onnx.NodeProto] = []  # each Where right before its reader: still topological
    for node in list(graph.node):
        ordered.append(node)
        if node.op_type in _QDQ_OPS and node.domain in ("", "ai.onnx"):
            continue
        key = by_name.get(node.name) if node.name else None
        key = key or (by_output.get(node.output[0]) if node.output else None)
        if key is None or key in skip:
            continue
        if not weighted and any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear"
                                and producer[i].input[0] in constants for i in node.input):
            continue
        flag = f"{FLAG_PREFIX}{len(candidates)}"
        switched = 0
        for j, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            src = _float_source(dq, producer, constants, integer, floats, added, graph)
            if src is None:
                continue
            out = f"{name}_{flag}"
            ordered.insert(len(ordered) - 1, helper.make_node("Where", [flag, src, name], [out], name=f"{out}_Where"))
            node.input[j] = out
            switched += 1
        if switched:
            candidates.append(Candidate(key, node.op_type, flag, switched))
            graph.input.append(helper.make_tensor_value_info(flag, onnx.TensorProto.BOOL, []))
    del graph.node[:]
    graph.node.extend(ordered)
    return SwitchModel(model, tuple(candidates))


def _float_source(dq: onnx.NodeProto, producer: dict[str, onnx.NodeProto], constants: set[str], integer: set[str],
                  floats: dict[str, onnx.TensorProto], added: dict[str, str], graph: onnx.GraphProto) -> str | None:
    """The float tensor behind a DequantizeLinear's output, or None when an excluded reader would not read it
    (``integer``: the outputs of ops that read a DequantizeLinear, as the model was before any switch)."""
    codes = dq.input[0]
    if codes in constants:
        weight = base_of(codes, "quantized")
        init = floats.get(weight) if weight else None
        if weight is None or init is None or init.data_type != onnx.TensorProto.FLOAT:
            return None
        if weight not in added:
            added[weight] = f"{weight}_onnxq_float"
            array = mapped.values(init)
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), added[weight]))
        return added[weight]
    t = codes
    while t in producer and producer[t].op_type == "Clip":
        t = producer[t].input[0]
    q = producer.get(t)
    if q is None or q.op_type != "QuantizeLinear":
        return None
    return None if q.input[0] in integer else q.input[0]
