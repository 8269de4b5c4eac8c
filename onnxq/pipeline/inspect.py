"""``onnxq inspect``: what a model holds, what will be quantized, and why the rest will not, and the
blocks that reconstruction (``--method brecq|qdrop|mrecg``) would learn one at a time.

The blocks come from :func:`onnxq.blocks.partition.partition` on the float-phase graph (BatchNorm folded,
node names made unique as in the quantizer's own graph); activation Q/DQ pairs, which the quantized
graph adds, are transparent to the partition, so the blocks are the ones a run reconstructs. Nodes
without a torch implementation are listed: their regions stay at round to nearest.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import onnx_graphsurgeon as gs

from onnxq.config import Config, QuantConfig, as_config
from onnxq.core import graph as g
from onnxq.data.loaders import model_inputs
from onnxq.passes.export.cleanup import CleanupPass
from onnxq.pipeline.build import build_pipeline, prepare_float
from onnxq.targets.profiles import resolve_config


def reconstruction_blocks(graph: gs.Graph, max_chain: int) -> dict[str, Any]:
    """The reconstruction blocks of ``graph`` (unique node names) and the nodes torch cannot run."""
    from onnxq.blocks.partition import describe_blocks, partition
    from onnxq.torchify import supported

    refused = {n.name: why for n in graph.nodes if (why := supported(n)) is not None}
    blocks = partition(graph, max_chain=max_chain, is_supported=lambda n: n.name not in refused)
    return {"max_chain": max_chain, "blocks": describe_blocks(blocks), "not_in_torch": refused}


def inspect_model(path: str | Path, config: Config | QuantConfig, *, max_chain: int = 3) -> dict[str, Any]:
    """What ``config`` would do to the model at ``path``: the float and plan stages of its pipeline.
    ``max_chain``: the block granularity shown when the rounding method has none of its own."""
    config = resolve_config(as_config(config))
    original = g.load_model(path)
    reference, ctx = prepare_float(original, config)
    graph = g.to_graph(reference)
    build_pipeline(config, first="plan", last="plan").run(graph, ctx)
    CleanupPass()(graph, ctx)
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
        "reconstruction": reconstruction_blocks(graph, getattr(config.rounding, "max_chain", max_chain)),
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
    rec = plan["reconstruction"]
    lines.append(f"reconstruction blocks of --method brecq/qdrop/mrecg (--max-chain {rec['max_chain']}; "
                 "adaround and adaquant take one weighted op at a time):")
    lines += [f"  {line}" for line in rec["blocks"]] or ["  none: no weighted op reads a graph input"]
    if rec["not_in_torch"]:
        lines.append("not runnable in torch (their regions stay at round to nearest):")
        for node, why in rec["not_in_torch"].items():
            lines.append(f"  {node}: {why}")
    return "\n".join(lines)
