"""CanonicalizePass: function-preserving clean-up before any quantization decision.

Three rewrites, in this order, each of which leaves every graph output bit-for-bit (constants and
identities) or numerically (folding, evaluated by the same runtime) unchanged:

1. **Constant nodes -> initializers.** A ``Constant`` node ``y = Constant<value=T>()`` is replaced by
   an initializer named ``y`` holding ``T``. Supported attributes: ``value`` (any tensor),
   ``value_float`` / ``value_floats`` (float32 scalar / 1-D), ``value_int`` / ``value_ints`` (int64
   scalar / 1-D). ``sparse_value`` and string attributes stay as nodes, as does a Constant whose output
   is itself a graph output (graph output names and kinds never change).
2. **Identity removal.** ``y = Identity(x)`` and inference-mode ``y = Dropout(x)`` (no mask used,
   ``training_mode`` absent or a constant false) compute ``y = x``. Consumers of ``y`` read ``x``. When
   ``y`` is a graph output, the producer of ``x`` writes ``y`` directly instead (so the output name
   stays), which is impossible, and then skipped, when ``x`` is a graph input, a graph output, or a
   constant.
3. **Safe constant folding.** A node ``y = f(c_1, ..., c_n)`` whose inputs are all constants is
   evaluated once (onnxruntime on a one-node model, the ONNX reference evaluator as fallback) and ``y``
   becomes an initializer. "Safe" means a node is never folded when it is QuantizeLinear /
   DequantizeLinear (or any other quantization op), random, outside the default domain, holds a
   subgraph, reads a graph input, writes a graph output, or would produce a tensor over
   ``size_threshold`` bytes. ``z = Shape(x)`` of a non-constant ``x`` folds to ``shape(x)[start:end]``
   only when every dimension of ``x`` is a known integer; a symbolic dimension (``N``) is never
   replaced by a number, so dynamic batch sizes stay dynamic. Static shapes are trusted as the model
   declares them (graph inputs, value_info).

Only the top-level graph is rewritten (subgraphs of If/Loop/Scan are left as they are). Counts are
added to ``ctx.report["canonicalize"] = {"constants_to_initializers", "identities_removed", "folded"}``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxq.core.context import QuantContext
from onnxq.core.graph import is_default_domain, is_graph_output
from onnxq.core.pass_infra import Pass, PassResult

log = logging.getLogger(__name__)

DEFAULT_SIZE_THRESHOLD = 16 * 2**20  # bytes per folded output

# Ops that are never folded: quantization ops must stay visible to the quantizer, random ops are not
# functions of their inputs, and control flow / sequence ops are not worth the risk.
NEVER_FOLD = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "If", "Loop", "Scan", "SequenceConstruct", "SequenceEmpty", "Optional", "Constant",
})

_SCALAR_ATTRS = {
    "value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64,
}


class CanonicalizePass(Pass):
    """Constant nodes to initializers, Identity/Dropout removal and safe constant folding.

    Args:
        fold: run constant folding (step 3).
        fold_shapes: allow ``Shape`` of fully static tensors to fold.
        size_threshold: largest folded output in bytes; bigger results are not materialized.
    """

    def __init__(self, *, fold: bool = True, fold_shapes: bool = True,
                 size_threshold: int = DEFAULT_SIZE_THRESHOLD):
        self.fold = fold
        self.fold_shapes = fold_shapes
        self.size_threshold = size_threshold

    def call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        n_const = _constants_to_initializers(graph)
        n_ident = _remove_identities(graph)
        n_fold = self._fold(graph) if self.fold else 0
        report = ctx.report.setdefault(
            "canonicalize", {"constants_to_initializers": 0, "identities_removed": 0, "folded": 0})
        report["constants_to_initializers"] += n_const
        report["identities_removed"] += n_ident
        report["folded"] += n_fold
        log.debug("canonicalize: %d constants, %d identities, %d folded", n_const, n_ident, n_fold)
        return PassResult(graph, modified=(n_const + n_ident + n_fold) > 0)

    # ------------------------------------------------------------------ folding
    def _fold(self, graph: gs.Graph) -> int:
        graph.cleanup().toposort()
        graph_inputs = {t.name for t in graph.inputs}
        folded = 0
        for node in list(graph.nodes):
            if not node.outputs or any(is_graph_output(graph, t) for t in node.outputs):
                continue
            if self.fold_shapes and node.op == "Shape" and is_default_domain(node):
                values = None if node.inputs[0].name in graph_inputs else _static_shape(node)
                if values is not None:
                    _replace_outputs(node, [values])
                    folded += 1
                continue
            if not self._foldable(node, graph_inputs):
                continue
            values = _evaluate(node, graph, self.size_threshold)
            if values is None:
                continue
            if any(v.nbytes > self.size_threshold for v in values):
                log.debug("not folding %s: output over %d bytes", node.name, self.size_threshold)
                continue
            _replace_outputs(node, values)
            folded += 1
        return folded

    @staticmethod
    def _foldable(node: gs.Node, graph_inputs: set[str]) -> bool:
        if node.op in NEVER_FOLD or not is_default_domain(node):
            return False
        if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            return False
        inputs = [t for t in node.inputs if not t.is_empty()]
        if not inputs:
            return False
        return all(isinstance(t, gs.Constant) and t.name not in graph_inputs for t in inputs)


# ---------------------------------------------------------------------- step 1
def _constants_to_initializers(graph: gs.Graph) -> int:
    count = 0
    for node in list(graph.nodes):
        if node.op != "Constant" or not is_default_domain(node) or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        if is_graph_output(graph, out):
            continue
        const = _constant_of(node, out.name)
        if const is None:
            log.debug("Constant %s keeps its node (attributes %s unsupported)", node.name, list(node.attrs))
            continue
        _replace_uses(out, const)
        node.outputs.clear()
        count += 1
    return count


def _constant_of(node: gs.Node, name: str) -> gs.Constant | None:
    attrs = node.attrs
    if "value" in attrs and isinstance(attrs["value"], gs.Constant):
        tensor = attrs["value"]  # ("sparse_value" is a different attribute: it keeps its node)
        tensor.name = name  # the attribute's own Constant (lazy values, exact dtype) becomes the initializer
        return tensor
    for key, dtype in _SCALAR_ATTRS.items():
        if key in attrs:
            return gs.Constant(name, values=np.asarray(attrs[key], dtype=dtype))
    return None


# ---------------------------------------------------------------------- step 2
def _remove_identities(graph: gs.Graph) -> int:
    count = 0
    for node in list(graph.nodes):
        if not node.inputs or not node.outputs or not _is_passthrough(graph, node):
            continue
        src, dst = node.inputs[0], node.outputs[0]
        if not is_graph_output(graph, dst):
            node.outputs.clear()
            node.inputs.clear()
            _replace_uses(dst, src)
            count += 1
            continue
        # dst is a graph output: its name must stay, so the producer of src writes dst instead.
        producer = src.inputs[0] if src.inputs else None
        if producer is None or isinstance(src, gs.Constant) or is_graph_output(graph, src):
            continue
        node.outputs.clear()
        node.inputs.clear()
        idx = next(i for i, t in enumerate(producer.outputs) if t is src)
        producer.outputs[idx] = dst
        _replace_uses(src, dst)
        count += 1
    return count


def _is_passthrough(graph: gs.Graph, node: gs.Node) -> bool:
    if not is_default_domain(node):
        return False
    if node.op == "Identity":
        return True
    if node.op != "Dropout" or node.attrs.get("is_test", 1) == 0:
        return False
    if len(node.outputs) > 1:
        mask = node.outputs[1]
        if not mask.is_empty() and (mask.outputs or is_graph_output(graph, mask)):
            return False
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():
        mode = node.inputs[2]
        return isinstance(mode, gs.Constant) and not bool(np.asarray(mode.values).any())
    return True


def _replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Every node reading ``old`` reads ``new`` instead."""
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new


def _replace_outputs(node: gs.Node, values: Sequence[np.ndarray]) -> None:
    """Turn the node's outputs into constants (same names) and detach the node."""
    outs = list(node.outputs)
    node.outputs.clear()
    node.inputs.clear()
    for out, val in zip(outs, values):
        if not out.is_empty():
            out.to_constant(np.asarray(val))


def _static_shape(node: gs.Node) -> np.ndarray | None:
    """``Shape(x)[start:end]`` as int64 when every dim of x is a known int, else None."""
    x = node.inputs[0]
    if isinstance(x, gs.Constant):
        shape = list(x.shape)
    else:
        shape = x.shape
        if shape is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
            return None
    rank = len(shape)
    start = int(node.attrs.get("start", 0))
    end = node.attrs.get("end")
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = rank if end is None else min(max(int(end) + rank if int(end) < 0 else int(end), 0), rank)
    return np.asarray([int(d) for d in shape[start:end]], dtype=np.int64)


def _evaluate(node: gs.Node, graph: gs.Graph, size_threshold: int) -> list[np.ndarray] | None:
    """Run one node on its constant inputs; None when it cannot (or should not) be evaluated."""
    model = _single_node_model(node, graph)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        for vi in inferred.graph.output:
            dims = vi.type.tensor_type.shape.dim
            if dims and all(d.HasField("dim_value") for d in dims):
                itemsize = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).itemsize
                if int(np.prod([d.dim_value for d in dims])) * itemsize > size_threshold:
                    log.debug("not folding %s: output over %d bytes", node.name, size_threshold)
                    return None
    except Exception:  # inference is only a pre-check
        pass
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return [np.asarray(v) for v in sess.run(None, {})]
    except Exception as exc:
        log.debug("onnxruntime cannot evaluate %s (%s); trying the reference evaluator",
                  node.name, _first_line(exc))
    try:
        from onnx.reference import ReferenceEvaluator

        return [np.asarray(v) for v in ReferenceEvaluator(model).run(None, {})]
    except Exception as exc:
        log.debug("not folding %s: %s", node.name, _first_line(exc))
        return None


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _single_node_model(node: gs.Node, graph: gs.Graph) -> onnx.ModelProto:
    inits, seen = [], set()
    for t in node.inputs:
        if not t.is_empty() and t.name not in seen:
            seen.add(t.name)
            inits.append(OnnxExporter.export_tensor_proto(t))
    outputs = [onnx.ValueInfoProto(name=t.name) for t in node.outputs if not t.is_empty()]
    proto = OnnxExporter.export_node(node)
    g = onnx.helper.make_graph([proto], "fold", [], outputs, initializer=inits)
    opsets = [onnx.helper.make_opsetid("", graph.opset)]
    model = onnx.helper.make_model(g, opset_imports=opsets)
    model.ir_version = max(7, onnx.helper.find_min_ir_version_for(opsets))
    return model
