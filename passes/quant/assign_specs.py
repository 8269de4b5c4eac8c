"""AssignSpecsPass: decide which tensors are quantized, with which spec, and why others are not.

Reads ``ctx.config`` and ``ctx.target``; writes ``ctx.specs`` (tensor -> QuantSpec), ``ctx.shared``
(passthrough output -> the tensor whose scale/zero-point it reuses), ``ctx.float_ops`` (node ->
reason it stays float) and ``ctx.report["plan"]``. The graph itself is not changed.

Placement rules (the defaults are onnxruntime's QDQ conventions, so its optimizer fuses integer
kernels; the target's fields change them for other runtimes, see :mod:`onnxq.targets.profiles`):
  * weighted ops (Conv, ConvTranspose, Gemm, MatMul with a constant float weight): the activation
    input is quantized, the weight gets a per-channel (or per-tensor) spec on the op's
    output-channel axis, the bias an INT32 spec with s_b = s_in * s_w (``target.quantize_bias``).
    The output Q goes where ``target.weighted_output`` says (:func:`weighted_output`): after the
    single-consumer chain of fusable activations (Relu, Clip with constant bounds), so
    ``Conv -> Relu -> Q`` fuses into one QLinearConv; on the raw output for signed activations
    under ``ort``; nowhere under ``none`` (TensorRT: the next op's input Q closes it);
  * activation ops (Add, Mul, Concat, pooling, Sigmoid, ...): every non-constant float input and
    (``target.activation_op_outputs``) the output are quantized; with ``activations.add_inputs =
    "residual"`` the Add input coming straight from a weighted op stays float, the op's own output Q
    included (:func:`residual_fused_input`);
  * where ``target.float_isolated_ops`` (onnxruntime CPU), an activation op none of whose inputs comes from
    an integer op stays float (:func:`float_isolated_ops`): Q on its inputs would only round (GELU's inner
    Mul, a transformer's residual Adds);
  * passthrough ops (MaxPool, Reshape, Transpose, Resize, ...): when the input is quantized the
    output reuses the input's parameters (s_out = s_in, z_out = z_in), so the Q/DQ pair is dropped
    and the op runs on integers;
  * graph outputs stay float unless the target says otherwise; every other op stays float and
    ``ctx.float_ops`` says why.
With ``weights.bits < 8`` the first and last weighted ops keep ``weights.first_last_bits``, and with
sub-8-bit activations and 8-bit first/last weights the network input and the last layer's input (back to
the head's output, through pooling and flattening) stay 8-bit; a layer named
in ``weights.bit_plan`` (node name -> 8/4/2, e.g. a mixed-precision plan, :mod:`onnxq.mixed.plan`)
gets that width instead, whatever its position.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.core.context import QuantContext
from onnxq.core.layers import (
    FLOAT32,
    WEIGHT_INPUTS,
    is_excluded,
    is_float_activation,
    node_key,
    weight_axis,
    weighted_layers,
    weighted_reason,
)
from onnxq.core.pass_infra import Pass, PassResult
from onnxq.core.spec import INT32_BIAS, Granularity
from onnxq.errors import PassError, UserError
from onnxq.targets.placement import (
    check_bit_plan,
    float_isolated_ops,
    float_output_matmuls,
    residual_fused_input,
    unplan_unpaired_layers,
    weighted_output,
)
from onnxq.targets.profiles import Target

log = logging.getLogger(__name__)


def _check_exclude(graph: gs.Graph, exclude: tuple[str, ...]) -> None:
    """A one-line UserError for an ``exclude`` entry that is neither a node name nor an op type here."""
    names = {node_key(n) for n in graph.nodes}
    ops = {n.op for n in graph.nodes}
    for entry in exclude:
        if entry in names or entry in ops:
            continue
        close = difflib.get_close_matches(entry, [*names, *ops], n=3)
        hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else "onnxq inspect MODEL lists them"
        raise UserError(f"--exclude {entry!r} matches no node name or op type of the model: {hint}")


#: Ops between a network's head and its classifier that average values (linear, one data input).
_AVERAGING_OPS = frozenset({"GlobalAveragePool", "AveragePool"})


def _last_input_path(last: gs.Node, target: Target) -> list[str]:
    """The last weighted layer's activation input and, back through passthrough and averaging ops, the
    tensors it is computed from (``Conv -> Relu -> [Q] -> GlobalAveragePool -> [Q] -> Flatten -> Gemm``:
    the pooled tensor and the head's output)."""
    names, t = [], last.inputs[0]
    while True:
        names.append(t.name)
        producer = t.inputs[0] if t.inputs else None
        if producer is None or producer.op not in target.passthrough_ops | _AVERAGING_OPS or not producer.inputs:
            return names
        t = producer.inputs[0]


class AssignSpecsPass(Pass):
    """Plan the quantization of every tensor (see module docstring)."""

    def requires(self, graph: gs.Graph, ctx: QuantContext) -> None:
        if not isinstance(ctx.target, Target):
            raise PassError("AssignSpecsPass needs ctx.target")

    def call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        cfg, target = ctx.config, ctx.target
        act_spec = target.activation_spec(cfg)
        excluded = set(cfg.exclude)
        _check_exclude(graph, cfg.exclude)
        weighted = weighted_layers(graph, cfg.exclude)
        first_last = {id(weighted[0]), id(weighted[-1])} if weighted else set()
        plan = dict(cfg.weights.bit_plan)
        if plan:
            check_bit_plan(plan, [n for n in weighted if n.op in target.weight_ops], target)
        output_ids = {id(t) for t in graph.outputs}
        residual_float: list[str] = []  # weighted-op outputs a residual Add reads unrounded

        def want(t: gs.Tensor) -> None:
            if target.quantize_graph_outputs or id(t) not in output_ids:
                ctx.specs.setdefault(t.name, act_spec)

        for node in graph.nodes:
            if is_excluded(node, excluded):
                ctx.float_ops[node_key(node)] = "excluded by the user"
                continue
            if node.op in target.weight_ops:
                reason = weighted_reason(node)
                if reason is not None:
                    ctx.float_ops[node_key(node)] = reason
                    continue
                bits = cfg.weights.bits
                if id(node) in first_last and cfg.weights.first_last_bits is not None:
                    bits = cfg.weights.first_last_bits
                bits = plan.get(node_key(node), bits)  # a per-layer override (weights.bit_plan) wins
                self._plan_weighted(node, target, ctx, bits, want)
            elif node.op in target.activation_ops:
                acts = [t for t in node.inputs if is_float_activation(t)]
                if not acts or not all(is_float_activation(o) for o in node.outputs[:1]):
                    ctx.float_ops[node_key(node)] = "inputs or output not float tensors"
                    continue
                if len(acts) != sum(1 for t in node.inputs if t.name):
                    ctx.float_ops[node_key(node)] = "has a constant operand (no integer kernel planned for it)"
                    continue
                fused = (residual_fused_input(node, target, excluded, cfg.activations.add_inputs)
                         if node.op == "Add" else None)
                for t in acts:
                    if t is not fused:
                        want(t)
                if fused is not None:  # its producer planned an output Q (weighted_output): drop it
                    ctx.specs.pop(fused.name, None)
                    residual_float.append(fused.name)
                if target.activation_op_outputs:
                    want(node.outputs[0])
            elif node.op not in target.passthrough_ops and node.op not in target.fusable_activations:
                ctx.float_ops[node_key(node)] = f"{node.op} has no integer kernel on target {target.name}"

        isolated = float_isolated_ops(graph, target, ctx.specs, ctx.float_ops) if target.float_isolated_ops else []
        float_out = float_output_matmuls(graph, target, ctx.specs, ctx.float_ops) if target.float_matmul_outputs else []
        self._propagate_passthrough(graph, ctx, target, output_ids)
        unplan_unpaired_layers(graph, target, ctx.specs, ctx.float_ops)
        if cfg.activations.bits < 8 and cfg.weights.first_last_bits == 8:
            # The network input and the last layer's input stay at 8 bits (BRECQ's and QDrop's
            # convention), up to the op that computes it: the head's output before pooling and
            # flattening (which average or move the values the classifier reads); a tensor sharing
            # its parameters takes its source (and every other sharer) along.
            act8 = target.activation_spec(cfg, bits=8)
            keep8 = [t.name for t in graph.inputs] + (_last_input_path(weighted[-1], target) if weighted else [])
            roots = {ctx.shared.get(n, n) for n in keep8 if n in ctx.specs}
            for name in list(ctx.specs):
                if name in roots or ctx.shared.get(name) in roots:
                    ctx.specs[name] = act8
        tensors = graph.tensors()
        ctx.report["plan"] = {
            "activations": len([n for n in ctx.specs if not isinstance(tensors.get(n), gs.Constant)]),
            "shared": len(ctx.shared),
            "float_ops": len(ctx.float_ops),
            "float_matmul_outputs": float_out,
            "residual_float_inputs": residual_float,
            "isolated_float": isolated,
        }
        return PassResult(graph, False)

    def _plan_weighted(self, node: gs.Node, target: Target, ctx: QuantContext, bits: int, want) -> None:
        w_idx, b_idx = WEIGHT_INPUTS[node.op]
        w = node.inputs[w_idx]
        values = np.asarray(w.values)
        spec = target.weight_spec(ctx.config, bits)
        axis = weight_axis(node, values) if spec.granularity is Granularity.CHANNEL else None
        per_tensor = replace(spec, granularity=Granularity.TENSOR, axis=None)
        spec = spec.with_axis(axis) if axis is not None else per_tensor
        previous = ctx.specs.get(w.name)
        if previous is not None and previous != spec:
            # A weight shared by ops wanting different axes: one per-tensor scale serves both.
            wide = max(bits, previous.bits)
            spec = per_tensor if wide == bits else replace(previous, granularity=Granularity.TENSOR, axis=None)
        ctx.specs[w.name] = spec
        want(node.inputs[0])
        if (target.quantize_bias and b_idx is not None and len(node.inputs) > b_idx
                and isinstance(node.inputs[b_idx], gs.Constant)):
            b = np.asarray(node.inputs[b_idx].values)
            if b.ndim == 1 and b.dtype == FLOAT32 and len(node.inputs[b_idx].outputs) == 1:
                ctx.specs[node.inputs[b_idx].name] = INT32_BIAS
        out = weighted_output(node, target)
        if out is not None and is_float_activation(out):
            want(out)

    def _propagate_passthrough(self, graph: gs.Graph, ctx: QuantContext, target: Target, output_ids: set) -> None:
        for node in graph.nodes:  # topological order: chains propagate in one sweep
            if node.op not in target.passthrough_ops or not node.inputs or not node.outputs:
                continue
            src = node.inputs[0]
            if src.name not in ctx.specs or ctx.specs[src.name].bits > 8 or isinstance(src, gs.Constant):
                continue
            for out in node.outputs:
                if is_float_activation(out) and (target.quantize_graph_outputs or id(out) not in output_ids):
                    ctx.specs[out.name] = ctx.specs[src.name]
                    ctx.shared[out.name] = ctx.shared.get(src.name, src.name)


