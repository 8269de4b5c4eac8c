"""Between a layer unit of a QDQ graph and AdaQuant: build the trainable module, write the result back.

A unit (:func:`onnxq.blocks.layer_units.layer_blocks`) is one weighted op with its input quantizer, weight and
bias DequantizeLinear nodes and fused activation. ``build_layer`` makes a
:class:`~onnxq.torchify.BlockModule` where

* the weight DQ is an :class:`~onnxq.recon.adaquant.AdaQuantWeight` (continuous weight + step size),
  started from the float weight (or from the graph's codes when they are not its round-to-nearest
  codes, e.g. ternary operators);
* the INT32 bias DQ is an :class:`~onnxq.recon.adaquant.AdaQuantBias` on the float bias;
* the input Q -> [Clip] -> DQ is an :class:`~onnxq.recon.adaquant.AdaQuantAct`. Its step (and, on
  asymmetric grids, its zero-point) trains only when the unit is the only reader of the quantized
  tensor, the tensor shares no parameters with another and its scale may be any float: in a QDQ
  graph one Q/DQ pair serves every consumer, which a per-layer loss does not see.

``write_layer`` stores integer codes ``clamp(round(W'/s_w) + z)`` and the learned steps in the graph,
the trained float weight and bias in ``ctx.float_weights`` (so round-to-nearest of the stored float
weight reproduces the codes), and requantizes the INT32 biases of every op reading the input tensor
with the final scales, ``round(b / (s_in s_w))`` (:func:`onnxq.blocks.build.requantize_biases`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.blocks.build import requantize_biases, set_activation_scale
from onnxq.blocks.partition import Block
from onnxq.core.context import QuantContext
from onnxq.core.graph import constant
from onnxq.core.layers import WEIGHT_INPUTS
from onnxq.core.qdq import base_of, weight_of
from onnxq.core.spec import QParams
from onnxq.recon.adaquant import AdaQuantAct, AdaQuantBias, AdaQuantConfig, AdaQuantWeight
from onnxq.torchify import BlockModule

log = logging.getLogger(__name__)

#: Checkpoint keys of trained float tensors (they are not graph constants).
FLOAT_PREFIX = "float::"


@dataclass
class BuiltLayer:
    module: BlockModule
    weights: dict[str, AdaQuantWeight]           # key: weight DQ output
    biases: dict[str, AdaQuantBias]              # key: bias DQ output
    acts: dict[str, AdaQuantAct]                 # key: quantized input tensor
    names: dict[str, str] = field(default_factory=dict)  # DQ output -> float tensor name
    trained: dict[str, bool] = field(default_factory=dict)  # quantizer key -> it has trainable parameters


def _nodes_by_name(graph: gs.Graph) -> dict[str, gs.Node]:
    return {n.name: n for n in graph.nodes}


def _readers_inside(tensor: gs.Tensor, inside: set[str]) -> bool:
    return all(n.name in inside for n in tensor.outputs)


def _input_quantizer(nodes: list[gs.Node], t: str) -> tuple[gs.Node | None, list[gs.Node]]:
    """The unit's Q node reading ``t`` and the DQ nodes after it (through an optional Clip)."""
    q = next((n for n in nodes if n.op == "QuantizeLinear" and n.inputs[0].name == t), None)
    if q is None:
        return None, []
    out = q.outputs[0]
    if len(out.outputs) == 1 and out.outputs[0].op == "Clip":
        out = out.outputs[0].outputs[0]
    return q, [n for n in out.outputs if n.op == "DequantizeLinear"]


def _start_weight(graph_codes: np.ndarray, w: np.ndarray, qp: QParams) -> np.ndarray:
    """The float weight if the graph holds its round-to-nearest codes, else the dequantized codes."""
    s = qp.scale.astype(np.float32)
    z = qp.zero_point.astype(np.float32)
    if s.ndim == 1 and qp.spec.axis is not None:
        shape = [1] * w.ndim
        shape[qp.spec.axis % w.ndim] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    codes = graph_codes.astype(np.float32)
    rtn = np.clip(np.round(w / s) + z, qp.spec.qmin, qp.spec.qmax)
    if np.array_equal(rtn, codes):
        return w.astype(np.float32)
    return ((codes - z) * s).astype(np.float32)


def build_layer(graph: gs.Graph, unit: Block, ctx: QuantContext, config: AdaQuantConfig, *,
                out_rms: np.ndarray | None = None) -> BuiltLayer:
    """The trainable module of one layer unit (see the module docstring).

    Args:
        out_rms: per-channel RMS of the layer's float output (axis 1), the bias unit of relative rates.
    """
    by_name = _nodes_by_name(graph)
    nodes = [by_name[n] for n in unit.nodes]
    inside = set(unit.nodes)
    op = by_name[unit.weighted_ops[0]]
    w_idx, b_idx = WEIGHT_INPUTS[op.op]
    weights: dict[str, AdaQuantWeight] = {}
    biases: dict[str, AdaQuantBias] = {}
    acts: dict[str, AdaQuantAct] = {}
    names: dict[str, str] = {}
    trained: dict[str, bool] = {}

    t = unit.inputs[0]
    q, dqs = _input_quantizer(nodes, t)
    act: AdaQuantAct | None = None
    if q is not None and t in ctx.qparams and dqs:
        qp = ctx.qparams[t]
        owned = all(_readers_inside(dq.outputs[0], inside) for dq in dqs) and not (
            t in ctx.shared or t in ctx.shared.values())
        learn_s = owned and not qp.spec.pow2
        learn_z = owned and config.learn_zero_point and not qp.spec.symmetric
        act = AdaQuantAct(qp.scale, qp.zero_point, qp.spec.qmin, qp.spec.qmax, relative=config.relative,
                          learn_scale=learn_s, learn_zero_point=learn_z)
        acts[t] = act
        trained[t] = learn_s or learn_z

    w_dq = op.inputs[w_idx].inputs[0]
    w = weight_of(w_dq)
    wq: AdaQuantWeight | None = None
    if w is not None and w in ctx.float_weights and w in ctx.qparams and ctx.qparams[w].spec.bits <= 8:
        qp = ctx.qparams[w]
        own = len(w_dq.outputs[0].outputs) == 1
        start = _start_weight(np.asarray(w_dq.inputs[0].values).astype(np.int64), ctx.float_weights[w], qp)
        wq = AdaQuantWeight(start, qp.scale, qp.zero_point, qp.spec.qmin, qp.spec.qmax,
                            qp.spec.axis if qp.scale.ndim == 1 else None, relative=config.relative,
                            learn_scale=own and not qp.spec.pow2)
        if not own:  # a weight shared with another op keeps its codes
            wq.u.requires_grad_(False)
        key = w_dq.outputs[0].name
        weights[key], names[key], trained[key] = wq, w, own

    if b_idx is not None and len(op.inputs) > b_idx and op.inputs[b_idx].inputs and wq is not None \
            and act is not None:
        b_dq = op.inputs[b_idx].inputs[0]
        b = weight_of(b_dq)
        if b is not None and b in ctx.float_weights and len(b_dq.outputs[0].outputs) == 1:
            unit_b = 1.0 if not config.relative or out_rms is None else out_rms
            bq = AdaQuantBias(ctx.float_weights[b], wq, act, unit_b)
            key = b_dq.outputs[0].name
            biases[key], names[key], trained[key] = bq, b, True
    module = BlockModule(nodes, unit.inputs, unit.outputs, weight_quantizers={**weights, **biases},
                         act_quantizers=acts)
    return BuiltLayer(module, weights, biases, acts, names, trained)


def _replace_const(graph: gs.Graph, old_name: str, values: np.ndarray) -> None:
    """Replace every use of the constant ``old_name`` by one new constant of the same name."""
    new = constant(old_name, values)
    for node in graph.nodes:
        for i, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant) and tensor.name == old_name:
                node.inputs[i] = new


def write_layer(graph: gs.Graph, built: BuiltLayer, ctx: QuantContext) -> dict[str, np.ndarray]:
    """Write the trained layer into the graph and ``ctx``; returns the changed constants (checkpoints),
    trained float tensors under ``FLOAT_PREFIX + name``."""
    changed: dict[str, np.ndarray] = {}
    dq_by_output = {n.outputs[0].name: n for n in graph.nodes if n.op == "DequantizeLinear"}
    for key, wq in built.weights.items():
        if not built.trained.get(key):
            continue
        w = built.names[key]
        old = ctx.qparams[w]
        dq = dq_by_output[key]
        codes = wq.codes().cpu().numpy().astype(np.int64).astype(old.spec.numpy_dtype)
        scale = wq.export_scale().reshape(old.scale.shape)
        _replace_const(graph, dq.inputs[0].name, codes)
        _replace_const(graph, dq.inputs[1].name, scale)
        ctx.qparams[w] = QParams(scale, old.zero_point, old.spec)
        ctx.float_weights[w] = wq.weight().detach().cpu().numpy().astype(np.float32)
        changed[dq.inputs[0].name], changed[dq.inputs[1].name] = codes, scale
        changed[FLOAT_PREFIX + w] = ctx.float_weights[w]
    for key, bq in built.biases.items():
        b = built.names[key]
        ctx.float_weights[b] = bq.bias().detach().cpu().numpy().astype(np.float32)
        changed[FLOAT_PREFIX + b] = ctx.float_weights[b]
    for t, aq in built.acts.items():
        if built.trained.get(t):
            scale, zp = aq.export()
            changed.update(set_activation_qparams(graph, ctx, t, scale, zp))
        changed.update(requantize_biases(graph, ctx, t))
    return changed


def set_activation_qparams(graph: gs.Graph, ctx: QuantContext, t: str, scale: np.ndarray, zero_point: int
                           ) -> dict[str, np.ndarray]:
    """New step and zero-point of activation ``t`` (its Q and DQ), INT32 biases of its readers requantized."""
    old = ctx.qparams[t]
    changed: dict[str, np.ndarray] = {}
    zp = np.asarray(zero_point, dtype=np.int64).reshape(old.zero_point.shape)
    if not np.array_equal(zp, old.zero_point):
        q = next(n for n in graph.nodes if n.op == "QuantizeLinear" and n.inputs[0].name == t)
        zname = q.inputs[2].name
        values = zp.astype(np.asarray(q.inputs[2].values).dtype)
        _replace_const(graph, zname, values)
        changed[zname] = values
        ctx.qparams[t] = QParams(old.scale, zp, old.spec)
    scale = np.asarray(scale, dtype=np.float32).reshape(old.scale.shape)
    if not np.array_equal(scale, ctx.qparams[t].scale):
        changed.update(set_activation_scale(graph, ctx, t, scale))
    return changed


def apply_layer_constants(graph: gs.Graph, ctx: QuantContext, values: dict[str, np.ndarray]) -> None:
    """Resume: put saved constants back (graph and ``ctx.qparams``) and the trained float tensors."""
    from onnxq.blocks.build import apply_constants

    plain = {k: v for k, v in values.items() if not k.startswith(FLOAT_PREFIX)}
    for k, v in values.items():
        if k.startswith(FLOAT_PREFIX):
            ctx.float_weights[k[len(FLOAT_PREFIX):]] = np.asarray(v, dtype=np.float32)
    apply_constants(graph, ctx, plain)
    for name, value in plain.items():
        base = base_of(name, "zero_point")
        if base is not None and base in ctx.qparams:
            old = ctx.qparams[base]
            ctx.qparams[base] = QParams(old.scale, np.asarray(value).astype(np.int64), old.spec)
