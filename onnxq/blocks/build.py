"""Between a QDQ graph block and the torch engine: build the trainable module, write results back.

``build_block`` turns the block's nodes into a :class:`~onnxq.torchify.BlockModule` where each
weight DequantizeLinear becomes an :class:`~onnxq.recon.AdaRoundWeight` initialised from the float
weight and its QParams (or a fixed quantizer holding the codes already in the graph, when the
weights do not learn: the ``rtn`` method, BRECQ's two-pass activation pass), and each activation
Q -> [Clip] -> DQ becomes a :class:`~onnxq.recon.FakeQuant` with the calibrated scale. ``write_back``
replaces the integer constants of the graph by the learned codes (with the pairs onnxruntime's CPU
kernels would saturate repaired, :mod:`onnxq.targets.ort_kernels`), and the activation scales by the
learned step sizes; the INT32 biases that depend on a changed input scale are requantized
(s_b = s_in * s_w).

Ternary weights (2-bit specs): the AdaRound variables start from the codes already in the graph
(the ternary operator's, which for twn and mquant-b are not round(W / s)) on the grid [-1, 1] with
the operator's scale (``init_codes``); so does the fixed quantizer of the ``rtn`` method. With
``ctx.config.rounding.learn_weight_scale`` every AdaRound weight (except power-of-two grids) also learns its
scale; ``write_back`` then writes the new weight scale and requantizes the biases that use it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.blocks.partition import Block
from onnxq.core.context import QuantContext
from onnxq.core.graph import constant
from onnxq.core.qdq import (
    QDQNames,
    activation_qdq,
    base_of,
    bias_codes,
    bias_scale,
    dq_producing,
    quantized_source,
    weight_of,
)
from onnxq.core.spec import QParams, real_codes
from onnxq.recon import AdaRoundWeight, FakeQuant, RoundToNearestWeight
from onnxq.targets.ort_kernels import constrained_layout, repair_weight
from onnxq.torchify import BlockModule

log = logging.getLogger(__name__)


@dataclass
class BuiltBlock:
    module: BlockModule
    weights: dict[str, AdaRoundWeight | RoundToNearestWeight]  # key: weight DQ output name
    acts: dict[str, FakeQuant]                                  # key: quantized activation name
    weight_names: dict[str, str] = field(default_factory=dict)  # DQ output -> float weight name


def build_block(graph: gs.Graph, block: Block, ctx: QuantContext, *, rounding: bool,
                learn_scales: bool) -> BuiltBlock:
    """The block's torch module with its weight and activation quantizers.

    ``rounding``: AdaRound weights (else fixed ones, holding the graph's codes). ``learn_scales``:
    activation step sizes may train.
    """
    by_name = {n.name: n for n in graph.nodes}
    nodes = [by_name[n] for n in block.nodes]
    weights: dict[str, AdaRoundWeight | RoundToNearestWeight] = {}
    names: dict[str, str] = {}
    acts: dict[str, FakeQuant] = {}
    for node in nodes:
        w = weight_of(node)
        if w is not None and w in ctx.float_weights and w in ctx.qparams and ctx.qparams[w].spec.bits <= 8:
            qp = ctx.qparams[w]
            args = (ctx.float_weights[w], qp.scale, qp.zero_point, qp.spec.qmin, qp.spec.qmax,
                    qp.spec.axis if qp.scale.ndim == 1 else None)
            in_graph = qp.spec.ternary or not rounding  # fixed weights: what the graph holds
            codes = np.asarray(node.inputs[0].values).astype(np.int64) if in_graph else None
            if rounding:
                learn = bool(getattr(ctx.config.rounding, "learn_weight_scale", False)) and not qp.spec.pow2
                quantizer = AdaRoundWeight(*args, init_codes=codes, learn_scale=learn)
            else:
                quantizer = RoundToNearestWeight(*args, codes=codes)
            weights[node.outputs[0].name] = quantizer
            names[node.outputs[0].name] = w
        elif node.op == "QuantizeLinear" and node.inputs[0].name in ctx.qparams:
            t = node.inputs[0].name
            qp = ctx.qparams[t]
            fq = FakeQuant(qp.scale, qp.zero_point, qp.spec.qmin, qp.spec.qmax)
            # Learned step sizes only where one scale serves one tensor and the grid is free.
            fq.trainable = learn_scales and not qp.spec.pow2 and not _is_shared(t, ctx)
            acts[t] = fq
    module = BlockModule(nodes, block.inputs, block.outputs, weight_quantizers=weights, act_quantizers=acts)
    return BuiltBlock(module, weights, acts, names)


def _is_shared(t: str, ctx: QuantContext) -> bool:
    return t in ctx.shared or t in ctx.shared.values()


def _replace_input(node: gs.Node, index: int, values: np.ndarray, name: str) -> None:
    node.inputs[index] = constant(name, values)


def write_back(graph: gs.Graph, built: BuiltBlock, ctx: QuantContext) -> dict[str, np.ndarray]:
    """Write codes and learned scales into the graph; returns the new constants (for checkpoints)."""
    changed: dict[str, np.ndarray] = {}
    dq_by_output = {n.outputs[0].name: n for n in graph.nodes if n.op == "DequantizeLinear"}
    for key, quantizer in built.weights.items():
        w = built.weight_names[key]
        qp = ctx.qparams[w]
        codes = quantizer.codes().detach().cpu().numpy().astype(np.int64)
        codes = _kernel_safe(dq_by_output[key], codes, w, quantizer, ctx).astype(qp.spec.numpy_dtype)
        name = QDQNames(w).quantized
        _replace_input(dq_by_output[key], 0, codes, name)
        changed[name] = codes
        if getattr(quantizer, "learned_scale", None) is not None:
            changed.update(set_weight_scale(graph, ctx, dq_by_output[key], w, quantizer.scale_values()))
    for t, fq in built.acts.items():
        if not getattr(fq, "trainable", False):
            continue
        new = fq.current_scale().cpu().numpy().astype(np.float32).reshape(ctx.qparams[t].scale.shape)
        if np.array_equal(new, ctx.qparams[t].scale):
            continue
        changed.update(set_activation_scale(graph, ctx, t, new))
    return changed


def _kernel_safe(dq: gs.Node, codes: np.ndarray, w: str, quantizer, ctx: QuantContext) -> np.ndarray:
    """Learned codes with the pairs the CPU kernels would saturate repaired (:mod:`onnxq.targets.ort_kernels`),
    so the blocks after this one are learned on what onnxruntime will compute."""
    consumers = dq.outputs[0].outputs
    qp = ctx.qparams[w]
    if not consumers or w not in ctx.float_weights:
        return codes
    node = consumers[0]
    layout = constrained_layout(node, codes.shape, qp.spec.store_bits, ctx.config.kernels,
                                dq_producing(node.inputs[0]) is not None)
    if layout is None:
        return codes
    if getattr(quantizer, "learned_scale", None) is not None:
        scale = np.asarray(quantizer.scale_values(), dtype=np.float32).reshape(qp.scale.shape)
        qp = QParams(scale, qp.zero_point, qp.spec)
    return repair_weight(codes, real_codes(ctx.float_weights[w], qp), layout)


def set_weight_scale(graph: gs.Graph, ctx: QuantContext, dq: gs.Node, w: str, scale: np.ndarray
                     ) -> dict[str, np.ndarray]:
    """New scale for weight ``w`` (its DQ ``dq``), and requantized INT32 biases of the ops using it."""
    old = ctx.qparams[w]
    scale = np.asarray(scale, dtype=np.float32).reshape(old.scale.shape)
    if np.array_equal(scale, old.scale):
        return {}
    ctx.qparams[w] = QParams(scale, old.zero_point, old.spec)
    name = QDQNames(w).scale
    dq.inputs[1] = constant(name, scale)
    changed = {name: scale}
    for node in list(dq.outputs[0].outputs):
        x_dq = dq_producing(node.inputs[0])
        t = quantized_source(x_dq) if x_dq is not None else None
        if t is not None and t.name in ctx.qparams:
            changed.update(requantize_biases(graph, ctx, t.name))
    return changed


def set_activation_scale(graph: gs.Graph, ctx: QuantContext, t: str, scale: np.ndarray) -> dict[str, np.ndarray]:
    """New scale for activation ``t`` (Q and DQ), and requantized INT32 biases of its consumers."""
    old = ctx.qparams[t]
    ctx.qparams[t] = QParams(scale, old.zero_point, old.spec)
    name = QDQNames(t).scale
    changed = {name: scale}
    shared = constant(name, scale)  # one tensor for the Q and the DQ (names are unique)
    for node in activation_qdq(graph.tensors()[t]):
        node.inputs[1] = shared
    changed.update(requantize_biases(graph, ctx, t))
    return changed


def requantize_biases(graph: gs.Graph, ctx: QuantContext, t: str) -> dict[str, np.ndarray]:
    """Recompute round(b / (s_in s_w)) for every biased op reading dequantized ``t``."""
    changed: dict[str, np.ndarray] = {}
    s_in = ctx.qparams[t].scale
    for node in graph.nodes:
        if node.op not in ("Conv", "ConvTranspose", "Gemm") or len(node.inputs) < 3:
            continue
        x_dq = dq_producing(node.inputs[0])
        source = quantized_source(x_dq) if x_dq is not None else None
        if source is None or source.name != t:
            continue
        b_dq, w_dq = dq_producing(node.inputs[2]), dq_producing(node.inputs[1])
        if b_dq is None or w_dq is None:
            continue
        b, w = weight_of(b_dq), weight_of(w_dq)
        if b is None or w is None or b not in ctx.float_weights:
            continue
        s_b = bias_scale(s_in, ctx.qparams[w].scale)
        codes = bias_codes(ctx.float_weights[b], s_b).astype(np.int32)
        names = QDQNames(b)
        b_dq.inputs[0] = constant(names.quantized, codes)
        b_dq.inputs[1] = constant(names.scale, s_b)
        ctx.qparams[b] = QParams(s_b, np.zeros(s_b.shape, np.int64), ctx.qparams[b].spec)
        changed[names.quantized], changed[names.scale] = codes, s_b
    return changed


def apply_constants(graph: gs.Graph, ctx: QuantContext, values: dict[str, np.ndarray]) -> None:
    """Replace constants by name and refresh the QParams of changed scales (resuming a run)."""
    values = dict(values)
    for name, value in values.items():
        base = base_of(name, "quantized")
        if base is not None and base in ctx.qparams:  # checkpoints store int4 codes as int8
            values[name] = value.astype(np.int64).astype(ctx.qparams[base].spec.numpy_dtype)
    made: dict[str, gs.Constant] = {}
    for node in graph.nodes:
        for i, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant) and tensor.name in values:
                if tensor.name not in made:
                    made[tensor.name] = constant(tensor.name, values[tensor.name])
                node.inputs[i] = made[tensor.name]
    for name, value in values.items():
        base = base_of(name, "scale")
        if base is not None and base in ctx.qparams:
            old = ctx.qparams[base]
            ctx.qparams[base] = QParams(value, old.zero_point, old.spec)
