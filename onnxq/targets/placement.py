"""Where a target places Q/DQ around weighted ops and residual Adds, and which bit plans it can store.

Read by AssignSpecsPass (the plan) and by the rule checker's tests; the placement modes are
fields of :class:`onnxq.targets.profiles.Target`.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxq.core.layers import WEIGHT_INPUTS, is_excluded, node_key, weighted_reason
from onnxq.errors import UserError
from onnxq.targets.profiles import Target


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


def weighted_output(node: gs.Node, target: Target) -> gs.Tensor | None:
    """The tensor whose Q/DQ closes a weighted op, or None (``target.weighted_output``).

    "after_activation": after the single-consumer chain of fusable activations (the activation
    nodes stay; the runtime fuses them into the op; where onnxruntime cannot drop one into the Q, a
    signed grid reaching below a Relu's 0 or a power-of-two range overshooting ReLU6's 6, the export
    moves it onto the codes, :mod:`onnxq.passes.export.clip_on_codes`). "none": not quantized here;
    the consumers' inputs decide (TensorRT).
    """
    if target.weighted_output == "none":
        return None
    return effective_output(node, target)


def residual_fused_input(node: gs.Node, target: Target, excluded: set[str], add_inputs: str) -> gs.Tensor | None:
    """With ``add_inputs == "residual"`` (``Config.activations.add_inputs``, resolved): the input of Add
    ``node`` left float for fusion.

    That is the first input produced (through fusable activations) by a quantizable weighted op
    whose only consumer is this Add: TensorRT fuses ``Conv -> Add(residual)`` into the convolution
    epilogue when the *other* (residual) input is quantized, and a Q/DQ on the convolution side
    would split the fusion. None when every input gets Q/DQ.
    """
    if add_inputs != "residual":
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
        if (producer.op in target.weight_ops and weighted_reason(producer) is None
                and not is_excluded(producer, excluded)):
            return t
    return None


def float_output_matmuls(graph: gs.Graph, target: Target, specs: dict, float_ops: dict[str, str]) -> list[str]:
    """With ``target.float_matmul_outputs``: drop the output spec of every planned weight MatMul whose
    output only float ops read (each in ``float_ops``; a graph output counts as float); returns their
    names.

    onnxruntime fuses ``DQ(x), DQ(W) -> MatMul`` with a float consumer into MatMulIntegerToFloat
    (u8 x s8 products summed in int32, scaled to float): the integer kernel stays and the output is
    not rounded to a per-tensor grid, which transformers' outlier channels make coarse. Only where
    onnxruntime keeps the MatMul: a 2-D MatMul followed by an Add of a constant is first fused into a
    float Gemm, so such MatMuls keep their output Q (and QLinearMatMul).
    """
    dropped = []
    for node in graph.nodes:
        if node.op != "MatMul" or len(node.inputs) < 2 or node.inputs[1].name not in specs:
            continue
        out = node.outputs[0]
        if out.name not in specs or weighted_output(node, target) is not out:
            continue
        readers = list(out.outputs)
        if any(node_key(r) not in float_ops for r in readers):
            continue
        shape = node.inputs[0].shape
        bias_add = any(r.op == "Add" and any(isinstance(t, gs.Constant) for t in r.inputs) for r in readers)
        if bias_add and (shape is None or len(shape) < 3):
            continue
        del specs[out.name]
        dropped.append(node_key(node))
    return dropped


ISOLATED = "no input comes from an integer op (quantizing its inputs would only add rounding)"


def float_isolated_ops(graph: gs.Graph, target: Target, specs: dict, float_ops: dict[str, str]) -> list[str]:
    """Keep float every planned activation op (Add, Mul, Softmax, ...) none of whose quantized inputs
    is produced by an op that runs on integers; returns their names.

    Its inputs arrive in float, so an integer kernel would need a Q on each of them: rounding to
    per-tensor grids (which transformers' outlier channels make coarse: residual Adds, GELU's inner
    Mul, Softmax between float attention MatMuls) for no saving, since the float op plus the Q of
    its output, where an integer reader wants one, costs no more. Its output keeps its spec where an
    integer op reads it; an input keeps its spec where another integer op reads it. Repeated until
    nothing changes (keeping one op float can leave its reader without integer inputs).
    """
    integer_ops = target.weight_ops | target.activation_ops | target.passthrough_ops | target.fusable_activations

    def integer(n: gs.Node) -> bool:
        if n.op not in integer_ops or node_key(n) in float_ops:
            return False
        if n.op in target.passthrough_ops:  # moves integers only where its data input is quantized
            return bool(n.inputs) and n.inputs[0].name in specs
        if n.op in target.fusable_activations:  # fused into the weighted op it follows
            src = n.inputs[0].inputs[0] if n.inputs and n.inputs[0].inputs else None
            return src is not None and (src.op in target.weight_ops or src.op in target.fusable_activations) \
                and integer(src)
        return True

    kept: list[str] = []
    changed = True
    while changed:
        changed = False
        for node in graph.nodes:
            if node.op not in target.activation_ops or node.op in target.weight_ops or not integer(node):
                continue
            acts = [t for t in node.inputs if t.name in specs and not isinstance(t, gs.Constant)]
            if not acts or any(t.inputs and integer(t.inputs[0]) for t in acts):
                continue
            float_ops[node_key(node)] = ISOLATED
            for t in acts:
                if not any(integer(r) for r in t.outputs if r is not node):
                    specs.pop(t.name, None)
            for o in node.outputs:
                if not any(integer(r) for r in o.outputs):
                    specs.pop(o.name, None)
            kept.append(node_key(node))
            changed = True
    return kept


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


def unplan_unpaired_layers(graph: gs.Graph, target: Target, specs: dict, float_ops: dict[str, str],
                           kept_float: set[str] = frozenset()) -> None:
    """Keep float (remove from ``specs``, give a reason in ``float_ops``) every weighted layer whose
    weight is planned but whose activation input is not (a graph input that is also a graph output),
    or whose input or output is in ``kept_float``: an integer kernel needs both sides quantized, and
    a dequantized weight beside a float activation is what the target rules refuse."""
    for node in graph.nodes:
        if node.op not in WEIGHT_INPUTS or len(node.inputs) < 2 or node.inputs[1].name not in specs:
            continue
        act = node.inputs[0]
        out = weighted_output(node, target)
        if act.name in specs and act.name not in kept_float and (out is None or out.name not in kept_float):
            continue
        for t in node.inputs[1:]:
            specs.pop(t.name, None)
        float_ops[node_key(node)] = (f"its input {act.name!r} stays float" if act.name not in specs or
                                     act.name in kept_float else f"its output {out.name!r} stays float")
