"""InsertQDQPass: write the plan into the graph as QuantizeLinear / DequantizeLinear nodes.

Reads ``ctx.specs``, ``ctx.qparams`` (activations) and ``ctx.config.weights``; writes the
weight and bias QParams into ``ctx.qparams`` and the float weights into ``ctx.float_weights``.

  * weights: W -> integer constant q = clip(round(W / s_w), qmin, qmax) feeding a DequantizeLinear
    (axis = output channel for per-channel specs); INT4 stored natively (opset 21). Ternary 2-bit
    specs: codes and scale come from ``ctx.config.weights.ternary_method``
    (:func:`onnxq.ternary.export.ternary_weight`), exported as they are (for twn and mquant-b they
    are not round(W / s)), in the spec's container (int2, int4 or int8); their constant names are
    listed in ``ctx.two_bit_codes["ternary"]`` (code constant -> weight) for the validator. The
    4-level INT2 grid [-2, 1] rounds to nearest like any grid; its constants are listed in
    ``ctx.two_bit_codes["int2"]`` (the ternary check leaves them alone);
  * biases: b -> INT32 constant on the grid s_b = s_in * s_w (per channel), zero-point 0, as the
    QDQ contract defines it (:mod:`onnxq.core.qdq`); a weight scale under which the bias code would
    overflow INT32 is raised first (:func:`onnxq.core.qdq.fit_weight_scale`), so the bias always fits
    (ternary codes are kept except in such a channel, which rounds to nearest on its new, larger
    scale: its weights are negligible next to its bias); s_w is the final weight scale;
  * activations: t -> Q(t) -> DQ -> every former consumer of t (one pair per tensor).
Tensor and node names follow :class:`onnxq.core.qdq.QDQNames`.
Constant DQs of symmetric signed tensors omit the zero-point input (0 by default), which saves
a byte per weight channel and four per bias channel (Gemm weights keep it: onnxruntime's QGemm
fusion needs it).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.core import mapped
from onnxq.core.context import QuantContext
from onnxq.core.graph import constant
from onnxq.core.layers import WEIGHT_INPUTS, node_key
from onnxq.core.observers import weight_qparams
from onnxq.core.pass_infra import Pass, PassResult
from onnxq.core.qdq import QDQNames, bias_codes, bias_scale, bias_spec, fit_weight_scale
from onnxq.core.spec import INT32_BIAS, QParams, QuantSpec, is_power_of_two, quantize
from onnxq.errors import PassError
from onnxq.targets.ort_kernels import saturates
from onnxq.targets.weight_codes import RoundingStats, rounded_weight
from onnxq.ternary.export import ternary_weight

log = logging.getLogger(__name__)

def _zp_constant(name: str, qp: QParams) -> gs.Constant:
    return constant(name, qp.zero_point.astype(qp.spec.numpy_dtype).reshape(qp.scale.shape))


def make_dq(graph: gs.Graph, codes: np.ndarray, qp: QParams, name: str, *, keep_zero_point: bool = False
            ) -> gs.Variable:
    """A DequantizeLinear of an integer constant; returns its float output tensor.

    A zero zero-point is left out (it is optional and 0 by default) unless ``keep_zero_point``:
    onnxruntime's QGemm fusion wants the weight zero-point present.
    """
    names = QDQNames(name)
    q = constant(names.quantized, codes.astype(qp.spec.numpy_dtype))
    out = gs.Variable(names.dequantized, dtype=np.float32, shape=list(codes.shape))
    attrs = {"axis": qp.spec.axis} if qp.scale.ndim == 1 and qp.spec.axis is not None else {}
    inputs = [q, constant(names.scale, qp.scale)]
    if keep_zero_point or np.any(qp.zero_point != 0):
        inputs.append(_zp_constant(names.zero_point, qp))
    graph.nodes.append(gs.Node("DequantizeLinear", name=names.node("DequantizeLinear"), attrs=attrs,
                               inputs=inputs, outputs=[out]))
    return out


def container_spec(spec: QuantSpec) -> QuantSpec:
    """The 8-bit storage of a sub-8-bit activation grid (QCDQ)."""
    return replace(spec, bits=8, narrow=False) if spec.bits < 8 else spec


def _float_readers(t: gs.Tensor, ctx: QuantContext) -> list[gs.Node]:
    """The readers of ``t`` that stay float, where ``t`` itself comes from a float op or the graph input:
    they read ``t`` unrounded at no cost (a float producer's output is float anyway; an integer producer's
    output must feed its Q alone, or onnxruntime cannot fuse the producer)."""
    src = t.inputs[0] if t.inputs else None
    if src is not None and node_key(src) not in ctx.float_ops:
        return []
    return [r for r in t.outputs if node_key(r) in ctx.float_ops]


def insert_activation_qdq(graph: gs.Graph, tensor: gs.Variable, qp: QParams,
                          float_readers: list[gs.Node] = ()) -> None:
    """t -> QuantizeLinear -> DequantizeLinear -> consumers of t (graph outputs keep their name); the
    ``float_readers`` keep reading ``t`` (a LayerNorm output feeding both MatMuls and a float residual Add).

    Sub-8-bit activations are stored as Q -> Clip(qmin, qmax) -> DQ in an 8-bit container
    ("QCDQ"): onnxruntime's QDQ propagation moves Q/DQ through MaxPool/Reshape/... and cannot run
    those ops on int4 tensors, while 8-bit containers run everywhere and still fuse into integer
    kernels (values restricted to the 4-bit grid).
    """
    consumers = [c for c in tensor.outputs if not any(c is r for r in float_readers)]
    name = tensor.name
    names = QDQNames(name)
    store = container_spec(qp.spec)
    q_out = gs.Variable(names.quantized, dtype=store.numpy_dtype, shape=tensor.shape)
    dq_out = gs.Variable(names.dequantized, dtype=np.float32, shape=tensor.shape)
    scale = constant(names.scale, qp.scale)
    zp = constant(names.zero_point, qp.zero_point.astype(store.numpy_dtype).reshape(qp.scale.shape))
    q_node = gs.Node("QuantizeLinear", name=names.node("QuantizeLinear"), inputs=[tensor, scale, zp],
                     outputs=[q_out])
    graph.nodes.append(q_node)
    if store is not qp.spec:
        clipped = gs.Variable(names.clipped, dtype=store.numpy_dtype, shape=tensor.shape)
        lo = constant(names.qmin, np.array(qp.spec.qmin, dtype=store.numpy_dtype))
        hi = constant(names.qmax, np.array(qp.spec.qmax, dtype=store.numpy_dtype))
        graph.nodes.append(gs.Node("Clip", name=names.node("Clip"), inputs=[q_out, lo, hi], outputs=[clipped]))
        q_out = clipped
    dq_node = gs.Node("DequantizeLinear", name=names.node("DequantizeLinear"), inputs=[q_out, scale, zp],
                      outputs=[dq_out])
    graph.nodes.append(dq_node)
    for node in consumers:
        for i, t in enumerate(node.inputs):
            if t is tensor:
                node.inputs[i] = dq_out
    for i, t in enumerate(graph.outputs):
        if t is tensor:  # keep the user-visible name on the final (dequantized) tensor
            tensor.name, dq_out.name = names.float_output, name
            graph.outputs[i] = dq_out


def fit_bias(w_qp: QParams, s_in: np.ndarray, bias: np.ndarray) -> QParams:
    """``w_qp`` with its scale raised where the INT32 bias code would overflow
    (:func:`onnxq.core.qdq.fit_weight_scale`); ``w_qp`` itself when nothing overflows."""
    scale, raised = fit_weight_scale(w_qp.scale, s_in, bias, pow2=w_qp.spec.pow2)
    if not np.any(raised):
        return w_qp
    log.warning("raised %d weight scale(s) so the INT32 bias fits", int(np.sum(raised)))
    return QParams(scale, w_qp.zero_point, w_qp.spec)


def _raised(old: QParams, new: QParams, ndim: int) -> np.ndarray:
    """Mask (broadcastable to the weight) of the channels whose scale ``fit_bias`` raised."""
    changed = np.asarray(new.scale != old.scale)
    if changed.ndim == 0 or new.spec.axis is None:
        return np.asarray(np.any(changed))
    shape = [1] * ndim
    shape[new.spec.axis] = -1
    return changed.reshape(shape)


class InsertQDQPass(Pass):
    def requires(self, graph: gs.Graph, ctx: QuantContext) -> None:
        need = max((s.min_opset for s in ctx.specs.values()), default=13)
        if graph.opset < need:
            raise PassError(f"graph opset {graph.opset} < {need} needed by the planned specs")

    def call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        modified = self._weights(graph, ctx)
        tensors = graph.tensors()
        for name, spec in list(ctx.specs.items()):
            t = tensors.get(name)
            if t is None or isinstance(t, gs.Constant) or spec is INT32_BIAS:
                continue
            if name not in ctx.qparams:
                raise PassError(f"activation {name} is planned but was not calibrated")
            insert_activation_qdq(graph, t, ctx.qparams[name], float_readers=_float_readers(t, ctx))
            modified = True
        return PassResult(graph, modified)

    def ensures(self, graph: gs.Graph, ctx: QuantContext) -> None:
        if ctx.config.scale != "pow2":
            return
        for node in graph.nodes:
            if node.op in ("QuantizeLinear", "DequantizeLinear"):
                s = np.asarray(node.inputs[1].values)
                if not np.all(is_power_of_two(s)):
                    raise PassError(f"{node.name}: scale is not an exact power of two")

    def _weights(self, graph: gs.Graph, ctx: QuantContext) -> bool:
        done: dict[str, gs.Variable] = {}
        modified = False
        stats = RoundingStats()
        for node in list(graph.nodes):
            if node.op not in WEIGHT_INPUTS:
                continue
            w_idx, b_idx = WEIGHT_INPUTS[node.op]
            if len(node.inputs) <= w_idx or node.inputs[w_idx].name not in ctx.specs:
                continue
            w = node.inputs[w_idx]
            if not isinstance(w, gs.Constant):
                continue
            bias = node.inputs[b_idx] if b_idx is not None and len(node.inputs) > b_idx else None
            quant_bias = (bias is not None and ctx.specs.get(bias.name) is INT32_BIAS
                          and node.inputs[0].name in ctx.qparams)
            if w.name in done and not quant_bias:
                node.inputs[w_idx] = done[w.name]
                continue
            values = np.asarray(w.values, dtype=np.float32)
            spec: QuantSpec = ctx.specs[w.name]
            cfg = ctx.config
            codes = None
            if spec.ternary:  # the operator's scale (unless CorrectBiasPass set the same) and codes
                t_qp, codes = ternary_weight(values, spec, cfg.weights.ternary_method)
                w_qp = ctx.qparams.get(w.name) or t_qp
            else:
                w_qp = ctx.qparams.get(w.name) or weight_qparams(values, spec, cfg.weights.range_method)
            if quant_bias:
                s_in = ctx.qparams[node.inputs[0].name].scale
                fitted = fit_bias(w_qp, s_in, np.asarray(bias.values))
                if spec.ternary and fitted is not w_qp:  # raised channels: nearest on the new scale
                    codes = np.where(_raised(w_qp, fitted, values.ndim), quantize(values, fitted), codes)
                w_qp = fitted
            if not spec.ternary:  # with the final (possibly raised) scale
                w_qp, codes = rounded_weight(node, values, w_qp, ctx, stats=stats)
            ctx.qparams[w.name] = w_qp
            ctx.float_weights.setdefault(w.name, values)
            mapped.drop_pages(values)  # a weight read in place: its pages leave memory until read again
            dq_name = w.name if w.name not in done else f"{w.name}_{node.name}"
            done[w.name] = node.inputs[w_idx] = make_dq(graph, codes, w_qp, dq_name,
                                                        keep_zero_point=node.op == "Gemm")
            if spec.bits == 2:  # ternary, or the 4-level INT2 grid
                grid = ctx.two_bit_codes.setdefault("ternary" if spec.ternary else "int2", {})
                grid[QDQNames(dq_name).quantized] = w.name
            if quant_bias:
                self._bias(graph, ctx, node, b_idx, bias, w_qp)
            modified = True
        ctx.report["weight_rounding"] = {"rounding": "gptq" if ctx.config.rounding.method == "gptq" else "nearest",
                                         "kernels": ctx.config.kernels,
                                         "pair_limit": saturates(ctx.config.kernels), **stats.to_dict()}
        return modified

    @staticmethod
    def _bias(graph: gs.Graph, ctx: QuantContext, node: gs.Node, b_idx: int, bias: gs.Constant,
              w_qp: QParams) -> None:
        b = np.asarray(bias.values, dtype=np.float32)
        s_in = ctx.qparams[node.inputs[0].name].scale
        s_b = bias_scale(s_in, w_qp.scale)
        per_channel = s_b.ndim == 1
        spec = bias_spec(per_channel, w_qp.spec.scale_kind)
        qp = QParams(s_b, np.zeros(s_b.shape, dtype=np.int64), spec)
        ctx.qparams[bias.name] = qp
        ctx.float_weights.setdefault(bias.name, b)
        node.inputs[b_idx] = make_dq(graph, bias_codes(b, s_b), qp, bias.name)
