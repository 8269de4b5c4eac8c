"""AssignSpecsPass: decide which tensors are quantized, with which spec, and why others are not.

Reads ``ctx.config`` and ``ctx.target``; writes ``ctx.specs`` (tensor -> QuantSpec), ``ctx.shared``
(passthrough output -> the tensor whose scale/zero-point it reuses), ``ctx.float_ops`` (node ->
reason it stays float) and ``ctx.report["plan"]``. The graph itself is not changed.

Placement rules (the defaults are onnxruntime's QDQ conventions, so its optimizer fuses integer
kernels; the target's fields change them for other runtimes, see :mod:`onnxq.targets`):
  * weighted ops (Conv, ConvTranspose, Gemm, MatMul with a constant float weight): the activation
    input is quantized, the weight gets a per-channel (or per-tensor) spec on the op's
    output-channel axis, the bias an INT32 spec with s_b = s_in * s_w (``target.quantize_bias``).
    The output Q goes where ``target.weighted_output`` says (:func:`weighted_output`): after the
    single-consumer chain of fusable activations (Relu, Clip with constant bounds), so
    ``Conv -> Relu -> Q`` fuses into one QLinearConv; on the raw output for signed activations
    under ``ort``; nowhere under ``none`` (TensorRT: the next op's input Q closes it);
  * activation ops (Add, Mul, Concat, pooling, Sigmoid, ...): every non-constant float input and
    (``target.activation_op_outputs``) the output are quantized; with ``add_inputs="residual"``
    the Add input coming straight from a weighted op stays float (:func:`residual_fused_input`);
  * passthrough ops (MaxPool, Reshape, Transpose, Resize, ...): when the input is quantized the
    output reuses the input's parameters (s_out = s_in, z_out = z_in), so the Q/DQ pair is dropped
    and the op runs on integers;
  * graph outputs stay float unless the target says otherwise; every other op stays float and
    ``ctx.float_ops`` says why.
With ``weight_bits < 8`` the first and last weighted ops keep ``first_last_bits``; a layer named in
``config.bit_plan`` (node name -> 8/4/2, e.g. a mixed-precision plan, :mod:`onnxq.mixed_precision`)
gets that width instead, whatever its position.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.context import QuantContext
from onnxq.errors import PassError, UserError
from onnxq.pass_infra import Pass, PassResult
from onnxq.spec import INT32_BIAS, Granularity
from onnxq.targets import WEIGHT_INPUTS, Target

log = logging.getLogger(__name__)

_FLOAT = np.dtype(np.float32)


def node_key(node: gs.Node) -> str:
    """A stable, unique label for reports: the node name, else ``op(first output)``."""
    return node.name or f"{node.op}({node.outputs[0].name if node.outputs else ''})"


def is_float_activation(t: gs.Tensor) -> bool:
    """A non-constant tensor known to be float32."""
    if isinstance(t, gs.Constant) or t.dtype is None:
        return False
    try:
        return np.dtype(t.dtype) == _FLOAT
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


class AssignSpecsPass(Pass):
    """Plan the quantization of every tensor (see module docstring)."""

    def requires(self, graph: gs.Graph, ctx: QuantContext) -> None:
        if not isinstance(ctx.target, Target):
            raise PassError("AssignSpecsPass needs ctx.target")

    def call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        cfg, target = ctx.config, ctx.target
        act_spec = target.activation_spec(cfg)
        excluded = set(cfg.exclude)
        weighted = weighted_layers(graph, cfg)
        first_last = {id(weighted[0]), id(weighted[-1])} if weighted else set()
        plan = dict(cfg.bit_plan)
        if plan:
            check_bit_plan(plan, [n for n in weighted if n.op in target.weight_ops], target)
        output_ids = {id(t) for t in graph.outputs}

        def want(t: gs.Tensor) -> None:
            if target.quantize_graph_outputs or id(t) not in output_ids:
                ctx.specs.setdefault(t.name, act_spec)

        for node in graph.nodes:
            if self._is_excluded(node, excluded):
                ctx.float_ops[node_key(node)] = "excluded by the user"
                continue
            if node.op in target.weight_ops:
                reason = self._weighted_reason(node)
                if reason is not None:
                    ctx.float_ops[node_key(node)] = reason
                    continue
                bits = cfg.weight_bits
                if id(node) in first_last and cfg.first_last_bits is not None:
                    bits = cfg.first_last_bits
                bits = plan.get(node_key(node), bits)  # a per-layer override (QuantConfig.bit_plan) wins
                self._plan_weighted(node, target, ctx, bits, want)
            elif node.op in target.activation_ops:
                acts = [t for t in node.inputs if is_float_activation(t)]
                if not acts or not all(is_float_activation(o) for o in node.outputs[:1]):
                    ctx.float_ops[node_key(node)] = "inputs or output not float tensors"
                    continue
                if len(acts) != sum(1 for t in node.inputs if t.name):
                    ctx.float_ops[node_key(node)] = "has a constant operand (no integer kernel planned for it)"
                    continue
                fused = residual_fused_input(node, target, excluded) if node.op == "Add" else None
                for t in acts:
                    if t is not fused:
                        want(t)
                if target.activation_op_outputs:
                    want(node.outputs[0])
            elif node.op not in target.passthrough_ops and node.op not in target.fusable_activations:
                ctx.float_ops[node_key(node)] = f"{node.op} has no integer kernel on target {target.name}"

        self._propagate_passthrough(graph, ctx, target, output_ids)
        if cfg.activation_bits < 8 and cfg.first_last_bits == 8:
            # The network input and the classifier's input stay at 8 bits (BRECQ's convention);
            # a tensor sharing its parameters takes its source (and every other sharer) along.
            act8 = target.activation_spec(cfg, bits=8)
            keep8 = [t.name for t in graph.inputs] + ([weighted[-1].inputs[0].name] if weighted else [])
            roots = {ctx.shared.get(n, n) for n in keep8 if n in ctx.specs}
            for name in list(ctx.specs):
                if name in roots or ctx.shared.get(name) in roots:
                    ctx.specs[name] = act8
        tensors = graph.tensors()
        ctx.report["plan"] = {
            "activations": len([n for n in ctx.specs if not isinstance(tensors.get(n), gs.Constant)]),
            "shared": len(ctx.shared),
            "float_ops": len(ctx.float_ops),
        }
        return PassResult(graph, False)

    @staticmethod
    def _is_excluded(node: gs.Node, excluded: set[str]) -> bool:
        return node.name in excluded or node.op in excluded

    @staticmethod
    def _weighted_reason(node: gs.Node) -> str | None:
        """None when the node is a quantizable weighted op, else why not."""
        if node.op not in WEIGHT_INPUTS:
            return "not a weighted op"
        w_idx, _ = WEIGHT_INPUTS[node.op]
        if len(node.inputs) <= w_idx:
            return "missing weight input"
        w = node.inputs[w_idx]
        if not isinstance(w, gs.Constant):
            return "weight is not a constant (dynamic weights stay float)"
        if np.asarray(w.values).dtype != _FLOAT:
            return f"weight dtype {np.asarray(w.values).dtype} is not float32"
        if not is_float_activation(node.inputs[0]):
            return "activation input is not a known float32 tensor"
        if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
            return "Gemm with transA=1 has no integer kernel"
        return None

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
            if b.ndim == 1 and b.dtype == _FLOAT and len(node.inputs[b_idx].outputs) == 1:
                ctx.specs[node.inputs[b_idx].name] = INT32_BIAS
        out = weighted_output(node, target, target.activation_spec(ctx.config).signed)
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


def weighted_layers(graph: gs.Graph, config) -> list[gs.Node]:
    """The quantizable weighted ops that the user did not exclude, in graph order.

    The first and last of them are the layers ``first_last_bits`` applies to.
    """
    excluded = set(config.exclude)
    return [n for n in graph.nodes if AssignSpecsPass._weighted_reason(n) is None
            and not AssignSpecsPass._is_excluded(n, excluded)]


def check_bit_plan(plan: dict[str, int], layers: list[gs.Node], target: Target) -> None:
    """A per-layer bit plan must name quantized weighted layers (by :func:`node_key`) and widths the
    target stores (2-bit ternary weights are allowed by every target)."""
    known = {node_key(n) for n in layers}
    unknown = [name for name in plan if name not in known]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:3]) + (" ..." if len(unknown) > 3 else "")
        raise UserError(f"the bit plan names {len(unknown)} node(s) that are not quantized weighted layers of "
                        f"this model ({shown}): use node names from `onnxq inspect` or a plan written for this model")
    bad = sorted({b for b in plan.values() if b != 2 and b not in target.weight_bits})
    if bad:
        raise UserError(f"the bit plan uses {bad}-bit weights, which target {target.name} does not store: use "
                        f"{', '.join(map(str, target.weight_bits))}")


def weighted_output(node: gs.Node, target: Target, signed: bool) -> gs.Tensor | None:
    """The tensor whose Q/DQ closes a weighted op, or None (``target.weighted_output``).

    "after_activation": after the single-consumer chain of fusable activations (the activation
    nodes stay; the runtime fuses them into the op). "ort": that for unsigned activations, where
    onnxruntime drops a Relu/Clip whose lower bound is the zero-point (qmin), and the raw output
    for signed ones (a kept Relu between the op and its Q would block QLinearConv). "none":
    not quantized here; the consumers' inputs decide (TensorRT).
    """
    mode = target.weighted_output
    if mode == "none":
        return None
    if mode == "ort" and signed:
        return node.outputs[0]
    return effective_output(node, target)


def residual_fused_input(node: gs.Node, target: Target, excluded: set[str]) -> gs.Tensor | None:
    """With ``target.add_inputs == "residual"``: the input of Add ``node`` left float for fusion.

    That is the first input produced (through fusable activations) by a quantizable weighted op
    whose only consumer is this Add: TensorRT fuses ``Conv -> Add(residual)`` into the convolution
    epilogue when the *other* (residual) input is quantized, and a Q/DQ on the convolution side
    would split the fusion. None when every input gets Q/DQ.
    """
    if target.add_inputs != "residual":
        return None
    for t in node.inputs:
        if len(t.outputs) != 1 or not t.inputs:
            continue
        producer = t.inputs[0]
        while producer.op in target.fusable_activations and producer.inputs and producer.inputs[0].inputs:
            src = producer.inputs[0]
            if len(src.outputs) != 1:
                break
            producer = src.inputs[0]
        if (producer.op in target.weight_ops and AssignSpecsPass._weighted_reason(producer) is None
                and not AssignSpecsPass._is_excluded(producer, excluded)):
            return t
    return None


def effective_output(node: gs.Node, target: Target) -> gs.Tensor:
    """The output after a single-consumer chain of fusable activations (Relu, constant Clip)."""
    out = node.outputs[0]
    while len(out.outputs) == 1:
        nxt = out.outputs[0]
        if nxt.op not in target.fusable_activations or nxt.inputs[0] is not out:
            break
        if nxt.op == "Clip" and not all(isinstance(t, gs.Constant) for t in nxt.inputs[1:] if t.name):
            break
        out = nxt.outputs[0]
    return out
