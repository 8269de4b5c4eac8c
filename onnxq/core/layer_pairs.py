"""Pairs of consecutive weighted layers ``L2(f(L1(x)))`` joined by one single-consumer edge, the unit
that cross-layer equalization and bias absorption rewrite.

``f`` is nothing, Relu, LeakyRelu or a constant Clip; its :attr:`Pair.kind` says how it commutes
with a per-channel positive scale: "identity", "relu", "leaky" commute exactly, "bounded"
(``Clip(0, m)``, ReLU6) does not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.core.channels import (
    LAYER_OPS,
    clip_bounds,
    in_channels,
    layer_problem,
    out_channels,
)
from onnxq.core.graph import is_default_domain, is_graph_output
from onnxq.core.layers import node_key

log = logging.getLogger(__name__)

@dataclass(frozen=True, eq=False)
class Pair:
    """``second(act(first(x)))``; kind: "identity", "relu", "leaky" or "bounded" (Clip(0, m), m finite)."""

    first: gs.Node
    second: gs.Node
    act: gs.Node | None
    kind: str

    @property
    def label(self) -> str:
        return f"{node_key(self.first)} -> {node_key(self.second)}"


def _act_kind(node: gs.Node) -> str | None:
    if not is_default_domain(node):
        return None
    if node.op == "Relu":
        return "relu"
    if node.op == "LeakyRelu":
        return "leaky"
    if node.op != "Clip":
        return None
    bounds = clip_bounds(node)
    if bounds is None:
        return None
    lo, hi = bounds
    if lo == 0.0:
        return "relu" if hi == np.inf else ("bounded" if hi > 0 else None)
    return "identity" if lo == -np.inf and hi == np.inf else None


def _sole_consumer(graph: gs.Graph, t: gs.Tensor) -> tuple[gs.Node | None, str]:
    if is_graph_output(graph, t):
        return None, f"{t.name} is a graph output"
    if len(t.outputs) != 1:
        return None, f"{t.name} has {len(t.outputs)} consumers"
    return t.outputs[0], ""


def find_pairs(graph: gs.Graph) -> tuple[list[Pair], list[dict[str, str]]]:
    """Candidate pairs in topological order, and the refused ones as ``{"pair", "reason"}``."""
    pairs: list[Pair] = []
    refused: list[dict[str, str]] = []
    for node in graph.nodes:
        if node.op not in LAYER_OPS or not is_default_domain(node) or not node.outputs:
            continue
        t = node.outputs[0]
        nxt, why = _sole_consumer(graph, t)
        act = None
        if nxt is not None and nxt.op in ("Relu", "LeakyRelu", "Clip"):
            act = nxt
            if _act_kind(act) is None:
                reason = f"{act.op} {node_key(act)} does not commute with per-channel scaling"
                refused.append({"pair": f"{node_key(node)} -> ?", "reason": reason})
                continue
            t = act.outputs[0]
            nxt, why = _sole_consumer(graph, t)
        if nxt is None:
            if why and t.outputs:
                refused.append({"pair": f"{node_key(node)} -> ?", "reason": f"branching edge: {why}"})
            continue
        if nxt.op not in LAYER_OPS or not is_default_domain(nxt):
            continue
        pair = Pair(node, nxt, act, (_act_kind(act) if act is not None else None) or "identity")
        problem = _pair_problem(pair, t)
        if problem:
            log.debug("pair %s refused: %s", pair.label, problem)
            refused.append({"pair": pair.label, "reason": problem})
        else:
            pairs.append(pair)
    return pairs, refused


def _pair_problem(pair: Pair, t: gs.Tensor) -> str | None:
    if pair.second.inputs[0] is not t or any(x is t for x in pair.second.inputs[1:]):
        return f"{node_key(pair.second)} does not read {t.name} as its data input only"
    for layer in (pair.first, pair.second):
        problem = layer_problem(layer)
        if problem:
            return f"{node_key(layer)}: {problem}"
    w1, w2 = (np.asarray(n.inputs[1].values) for n in (pair.first, pair.second))
    if out_channels(pair.first, w1) != in_channels(pair.second, w2):
        return f"{out_channels(pair.first, w1)} output channels feed {in_channels(pair.second, w2)} inputs"
    return None
