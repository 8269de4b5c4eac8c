"""Run a graph forward in pieces, layer after layer, while the graph's constants change in between.

Sequential tuning (:mod:`onnxq.passes.tune.tune_stats`) needs, for each quantized layer ``l`` in
topological order, the layer's output on the calibration data *after every earlier layer was
tuned*. Re-running the graph from its inputs for every layer costs ``sum_l |prefix(l)|`` node
evaluations, quadratic in depth. :class:`ForwardCache` keeps instead the *cut* before the current
layer: every non-constant tensor computed so far that a node not yet run still reads. Moving to
layer ``l`` runs only the nodes between the previous cut and ``l`` (one onnxruntime session over
that segment, fed from the cut), so the whole sweep evaluates each node about twice.

Constant-only nodes (DequantizeLinear of constant weights and biases, Constant) are never cached:
they belong to every segment that reads them, so a weight scale or bias a tuning step rewrites is
read afresh. The layer node itself stays outside the cut until the next step, so its tuned
constants take effect there. Every segment runs at ORT_ENABLE_BASIC, as
:func:`onnxq.data.capture.capture` runs whole prefixes, so the values are the same node by node.
Graphs with subgraph attributes (If/Loop/Scan may read outer tensors) are not supported
(:func:`supported`): callers fall back to whole-prefix runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx
from onnx import helper

from onnxq.data.capture import session


def supported(model: onnx.ModelProto) -> bool:
    """True when no node carries a subgraph (segments can then be cut anywhere)."""
    return not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                   for n in model.graph.node for a in n.attribute)


def _key(node: onnx.NodeProto) -> str:
    """A node's identity across exports: its first output (tensor names are unique)."""
    return node.output[0]


def _constant_tensors(model: onnx.ModelProto) -> set[str]:
    """Initializers and every output of a node that reads only constants (in topological order)."""
    const = {t.name for t in model.graph.initializer} | {""}
    for node in model.graph.node:
        if all(i in const for i in node.input):  # also Constant (no inputs)
            const.update(node.output)
    return const


class ForwardCache:
    """The cut before the current layer, per calibration batch (see the module docstring).

    Args:
        feeds: calibration batches (graph input name -> array); the cut starts at the graph inputs.
    """

    def __init__(self, feeds: Iterable[Mapping[str, np.ndarray]]) -> None:
        self.cut: list[dict[str, np.ndarray]] = [dict(f) for f in feeds]
        self.done: set[str] = set()

    def layer_output(self, model: onnx.ModelProto, layer: str, tensor: str,
                     callback: Callable[[np.ndarray], None]) -> None:
        """Advance the cut to just before node ``layer`` (its first output) of ``model`` and call
        ``callback`` with ``tensor`` (an output of that node) for every batch.

        ``model`` is the current graph, topologically sorted; nodes run in earlier calls must keep
        their output names.
        """
        nodes = list(model.graph.node)
        const = _constant_tensors(model)
        pos = next(i for i, n in enumerate(nodes) if _key(n) == layer)
        todo = [n for n in nodes[:pos] if _key(n) not in self.done and not set(n.output) <= const]
        later = [n for n in nodes[pos:] if _key(n) not in self.done and not set(n.output) <= const]
        needed = {i for n in later for i in n.input} | {o.name for o in model.graph.output}
        produced = {o for n in todo for o in n.output}
        if todo:
            outputs = sorted(produced & needed)
            seg = _segment(model, todo, const, self.cut[0], outputs)
            sess = session(seg)
            for b, values in enumerate(self.cut):
                feed = {i.name: values[i.name] for i in seg.graph.input}
                fresh = dict(zip(outputs, sess.run(outputs, feed), strict=True))
                self.cut[b] = {k: v for k, v in values.items() if k in needed} | fresh
            self.done.update(_key(n) for n in todo)
        else:
            self.cut = [{k: v for k, v in values.items() if k in needed} for values in self.cut]
        seg = _segment(model, [nodes[pos]], const, self.cut[0], [tensor])
        sess = session(seg)
        for values in self.cut:
            callback(sess.run([tensor], {i.name: values[i.name] for i in seg.graph.input})[0])


def _segment(model: onnx.ModelProto, run: list[onnx.NodeProto], const: set[str],
             sample: Mapping[str, np.ndarray], outputs: list[str]) -> onnx.ModelProto:
    """A model of the nodes ``run`` plus the constant-only nodes they read, fed from the cut."""
    producer = {o: n for n in model.graph.node for o in n.output}
    keep: dict[str, onnx.NodeProto] = {_key(n): n for n in run}
    stack = [i for n in run for i in n.input]
    while stack:  # the constant-only nodes the segment reads, transitively
        name = stack.pop()
        node = producer.get(name)
        if name in const and node is not None and _key(node) not in keep:
            keep[_key(node)] = node
            stack.extend(node.input)
    order = {_key(n): i for i, n in enumerate(model.graph.node)}
    nodes = sorted(keep.values(), key=lambda n: order[_key(n)])
    made = {o for n in nodes for o in n.output}
    reads = {i for n in nodes for i in n.input if i}
    inits = [t for t in model.graph.initializer if t.name in reads]
    feeds = sorted(i for i in reads - made if i not in const)
    inputs = []
    for name in feeds:
        value = np.asarray(sample[name])
        shape = ["N", *value.shape[1:]] if value.ndim else []
        inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), shape))
    graph = helper.make_graph(nodes, "segment", inputs, [helper.make_empty_tensor_value_info(o) for o in outputs],
                              inits)
    seg = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    seg.functions.extend(model.functions)
    return seg
