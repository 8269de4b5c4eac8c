"""``onnxq inspect``: what a model holds, what will be quantized, and why the rest will not."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import onnx_graphsurgeon as gs

from onnxq import graph as g
from onnxq.api import prepare_float
from onnxq.calib import model_inputs
from onnxq.config import QuantConfig
from onnxq.passes.assign_specs import AssignSpecsPass


def inspect_model(path: str | Path, config: QuantConfig) -> dict[str, Any]:
    original = g.load_model(path)
    reference, ctx = prepare_float(original, config)
    graph = g.to_graph(reference)
    AssignSpecsPass()(graph, ctx)
    consts = {n for n, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    reasons: dict[str, list[str]] = {}
    for node, why in ctx.float_ops.items():
        reasons.setdefault(why, []).append(node)
    return {
        "model": str(path),
        "opset": g.default_opset(original),
        "inputs": [i.describe() for i in model_inputs(original)],
        "ops": dict(Counter(n.op_type for n in original.graph.node).most_common()),
        "ops_after_float_phase": dict(Counter(n.op for n in graph.nodes).most_common()),
        "float_phase": {k: ctx.report[k] for k in ("canonicalize", "fold_batchnorm") if k in ctx.report},
        "quantized_weights": sorted(n for n in ctx.specs if n in consts and ctx.specs[n].bits != 32),
        "quantized_activations": len([n for n in ctx.specs if n not in consts]),
        "shared_scale_tensors": len(ctx.shared),
        "float_ops": {why: sorted(nodes) for why, nodes in sorted(reasons.items())},
    }


def format_plan(plan: dict[str, Any]) -> str:
    lines = [f"model: {plan['model']} (opset {plan['opset']})", "inputs: " + "; ".join(plan["inputs"])]
    lines.append("ops: " + ", ".join(f"{k} x{v}" for k, v in plan["ops"].items()))
    for name, info in plan["float_phase"].items():
        lines.append(f"{name}: {info}")
    lines.append(f"quantized: {len(plan['quantized_weights'])} weights, {plan['quantized_activations']} activations "
                 f"({plan['shared_scale_tensors']} sharing their input's scale)")
    lines.append("kept in float:")
    for why, nodes in plan["float_ops"].items():
        shown = ", ".join(nodes[:6]) + (f", ... (+{len(nodes) - 6})" if len(nodes) > 6 else "")
        lines.append(f"  {len(nodes):4d}  {why}: {shown}")
    return "\n".join(lines)
