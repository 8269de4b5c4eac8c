"""Capture intermediate tensors of a float model in onnxruntime, one calibration batch at a time.

The requested tensors are added as graph outputs of a copy of the model; onnxruntime runs each
batch and the values are handed to a callback, so memory holds one batch of activations at most.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from tqdm.auto import tqdm

from onnxq.core.graph import serialize_for_ort

log = logging.getLogger(__name__)


def session(model: onnx.ModelProto, level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            ) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.log_severity_level = 3
    data, config = serialize_for_ort(model)
    for key, value in config.items():
        opts.add_session_config_entry(key, value)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs also include ``names`` (types left to onnxruntime)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    inputs = {i.name for i in m.graph.input}
    for name in names:
        if name not in existing and name not in inputs:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return m


def prefix_model(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that computes only ``names`` (their ancestors; they become the graph outputs), so
    capturing an early layer does not run the rest of the network. Graphs with subgraphs are returned
    whole."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node
           for a in n.attribute):
        return model
    producer = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    keep: set[int] = set()
    stack = [t for t in names if t in producer]
    while stack:
        i = producer.get(stack.pop())
        if i is None or i in keep:
            continue
        keep.add(i)
        stack.extend(model.graph.node[i].input)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = [n for i, n in enumerate(model.graph.node) if i in keep]
    used = {t for n in nodes for t in n.input}
    inputs = {i.name for i in m.graph.input}
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    kept_init = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept_init)
    del m.graph.output[:]
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in dict.fromkeys(names)
                          if t not in inputs)
    return m


def capture(model: onnx.ModelProto, names: Sequence[str], feeds: Iterable[Mapping[str, np.ndarray]],
            callback: Callable[[str, np.ndarray], None], *, total: int | None = None, desc: str = "calibrate") -> int:
    """Run every feed through ``model`` and call ``callback(name, value)`` for each requested tensor.

    Graph inputs among ``names`` are taken from the feeds directly. Returns the number of batches.
    """
    input_names = {i.name for i in model.graph.input}
    node_names = [n for n in names if n not in input_names]
    sess = session(with_outputs(model, node_names))
    out_names = [o.name for o in sess.get_outputs()]
    wanted = set(node_names)
    count = 0
    for feed in tqdm(feeds, total=total, desc=desc, unit="batch", leave=False, disable=None):
        values = sess.run(None, dict(feed))
        for name, value in zip(out_names, values):
            if name in wanted:
                callback(name, value)
        for name in names:
            if name in input_names:
                callback(name, np.asarray(feed[name]))
        count += 1
    return count
