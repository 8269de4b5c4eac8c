"""MRECG (Ma et al., CVPR 2023): mixed reconstruction granularity, the merge plan.

Block-wise reconstruction losses ``L_1, L_2, ...`` along depth oscillate; the paper ties the jumps to
capacity gaps between adjacent modules and reconstructs adjacent modules with a large gap jointly.
Here (the authors' released practice, algorithms.md section 4):

1. capacity of block ``i``: ``c_i = L_i``, its loss after a first, ordinary reconstruction pass
   (*data-dependent*), or a *data-free proxy* of ours (below);
2. differentials between adjacent blocks ``D_i = |c_{i+1} - c_i|``;
3. the boundaries ``(i, i+1)`` with the ``k`` largest ``D_i`` are merged, greedily in decreasing order,
   skipping a boundary that would make a chain longer than ``max_merge`` (3) blocks, so merged units are
   runs of 2-3 adjacent blocks and no block is in two of them;
4. each merged unit is one reconstruction block (:func:`merge_blocks`) with one loss at its output,
   optimised by the unchanged base method (BRECQ or QDrop).

Only boundaries between two blocks that are both reconstructed (not the 8-bit first layer, not an
unsupported region) and where the second block reads the first one's output can merge.

**Data-free proxy (ours; the paper's ModCap formula could not be recovered).** The block's relative
weight quantization noise ``c_i = sum_{l in block i} ||W_hat_l - W_l||^2 / ||W_l||^2`` (``W_hat`` = the
graph's dequantized codes), a stand-in for the loss level the first pass would measure: it grows
with fewer bits and with weight outliers and needs no data. It ranks block losses well but not the
differentials that choose the merges, so "data" stays the default (docs/defaults.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.blocks.partition import Block, partition
from onnxq.core.context import QuantContext
from onnxq.core.qdq import weight_of
from onnxq.errors import UserError

__all__ = ["CAPACITIES", "MergePlan", "differentials", "eligible_boundaries", "merge_blocks",
           "merged_partition",
           "merged_partitioner", "plan_merges", "proxy_capacity", "select_boundaries"]

log = logging.getLogger(__name__)

CAPACITIES = ("data", "proxy")


@dataclass(frozen=True)
class MergePlan:
    """Which adjacent blocks of a partition are reconstructed together.

    Attributes:
        groups: runs of consecutive block indices of the base partition, covering it in order.
        boundaries: the merged boundaries ``i`` (block ``i`` with block ``i + 1``), by decreasing D.
        capacities: ``c_i`` per block (None where unknown: blocks that are not reconstructed).
        differentials: ``D_i`` per boundary (None where not eligible).
    """

    groups: tuple[tuple[int, ...], ...]
    boundaries: tuple[int, ...]
    capacities: tuple[float | None, ...]
    differentials: tuple[float | None, ...]

    @property
    def merges(self) -> list[tuple[int, ...]]:
        """The groups of two or more blocks."""
        return [g for g in self.groups if len(g) > 1]


def differentials(capacities: Sequence[float | None], eligible: Sequence[bool], *, log_scale: bool = False
                  ) -> list[float | None]:
    """``D_i = |c_{i+1} - c_i|`` (or of the logs) for each eligible boundary ``i``, else None."""
    out: list[float | None] = []
    for i, ok in enumerate(eligible):
        a, b = capacities[i], capacities[i + 1]
        if not ok or a is None or b is None:
            out.append(None)
        elif log_scale:
            out.append(abs(math.log(max(b, 1e-30)) - math.log(max(a, 1e-30))))
        else:
            out.append(abs(float(b) - float(a)))
    return out


def select_boundaries(diffs: Sequence[float | None], k: int, max_merge: int = 3) -> list[int]:
    """The ``k`` boundaries with the largest differentials such that no chain exceeds ``max_merge`` blocks.

    Greedy in decreasing ``D`` (ties: the earlier boundary); a boundary whose acceptance would join more
    than ``max_merge`` blocks is skipped and the next one is tried.
    """
    if k < 0 or max_merge < 1:
        raise UserError(f"MRECG needs k >= 0 and chains of >= 1 block, got k={k}, max_merge={max_merge}")
    order = sorted((i for i, d in enumerate(diffs) if d is not None), key=lambda i: (-float(diffs[i]), i))
    chosen: set[int] = set()
    picked: list[int] = []
    for i in order:
        if len(picked) >= k:
            break
        lo = i
        while lo - 1 in chosen:
            lo -= 1
        hi = i
        while hi + 1 in chosen:
            hi += 1
        if hi - lo + 2 > max_merge:  # boundaries lo..hi join blocks lo..hi+1
            continue
        chosen.add(i)
        picked.append(i)
    return picked


def _groups(n: int, boundaries: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    merged = set(boundaries)
    groups: list[list[int]] = [[0]] if n else []
    for i in range(1, n):
        if i - 1 in merged:
            groups[-1].append(i)
        else:
            groups.append([i])
    return tuple(tuple(g) for g in groups)


def eligible_boundaries(blocks: Sequence[Block], reconstructed: Sequence[bool]) -> list[bool]:
    """Boundary ``i`` may merge when blocks ``i``, ``i + 1`` are reconstructed and ``i + 1`` reads ``i``."""
    return [bool(reconstructed[i] and reconstructed[i + 1]
                 and set(blocks[i].outputs) & set(blocks[i + 1].inputs))
            for i in range(len(blocks) - 1)]


def plan_merges(blocks: Sequence[Block], capacities: Sequence[float | None], k: int, *,
                reconstructed: Sequence[bool] | None = None, log_scale: bool = False,
                max_merge: int = 3) -> MergePlan:
    """The merge plan of a partition from per-block capacities (see the module docstring)."""
    if len(capacities) != len(blocks):
        raise ValueError(f"{len(capacities)} capacities for {len(blocks)} blocks")
    recon = list(reconstructed) if reconstructed is not None else [c is not None for c in capacities]
    diffs = differentials(capacities, eligible_boundaries(blocks, recon), log_scale=log_scale)
    chosen = select_boundaries(diffs, k, max_merge)
    return MergePlan(_groups(len(blocks), chosen), tuple(chosen), tuple(capacities), tuple(diffs))


def _dequantized(dq: gs.Node) -> np.ndarray:
    """The float values a constant weight DequantizeLinear produces."""
    q = np.asarray(dq.inputs[0].values).astype(np.float64)
    s = np.asarray(dq.inputs[1].values, dtype=np.float64)
    has_zp = len(dq.inputs) > 2 and dq.inputs[2].name
    z = np.asarray(dq.inputs[2].values).astype(np.float64) if has_zp else 0.0
    if s.ndim == 1 and s.size > 1:
        shape = [1] * q.ndim
        shape[int(dq.attrs.get("axis", 1)) % q.ndim] = -1
        s = s.reshape(shape)
        z = np.reshape(z, shape) if np.ndim(z) else z
    return (q - z) * s


def proxy_capacity(graph: gs.Graph, blocks: Sequence[Block], ctx: QuantContext) -> list[float]:
    """Our data-free capacity: ``sum_l ||W_hat_l - W_l||^2 / ||W_l||^2`` over each block's quantized weights
    (module docstring); weights without a float original in ``ctx.float_weights`` are left out."""
    by_output = {n.outputs[0].name: n for n in graph.nodes if n.op == "DequantizeLinear"}
    out: list[float] = []
    for block in blocks:
        total = 0.0
        for name in block.weights:
            dq = by_output.get(name)
            w = weight_of(dq) if dq is not None else None
            if w is None or w not in ctx.float_weights:
                continue
            ref = np.asarray(ctx.float_weights[w], dtype=np.float64)
            err = _dequantized(dq) - ref
            total += float(np.sum(err * err) / max(float(np.sum(ref * ref)), 1e-30))
        out.append(total)
    return out


def _readers(tensor: gs.Tensor) -> list[gs.Node]:
    """Nodes reading ``tensor``, looking through its activation quantizer (Q -> [Clip] -> DQ)."""
    found: list[gs.Node] = []
    for node in tensor.outputs:
        if node.op in ("QuantizeLinear", "Clip", "DequantizeLinear") and node.inputs[0] is tensor:
            found.append(node)
            for out in node.outputs:
                found.extend(_readers(out))
        else:
            found.append(node)
    return found


def merge_blocks(graph: gs.Graph, blocks: Sequence[Block], index: int) -> Block:
    """Blocks ``b_i .. b_j`` (consecutive, in order) as one reconstruction unit.

    Nodes: the union (first appearance order: topological, since each block only reads earlier ones).
    Inputs: the members' inputs not produced inside. Outputs: the last block's outputs, plus any output
    of an earlier member that a node outside the unit (or the graph output) reads, e.g. a U-Net skip.
    Weights and weighted ops: the union. Kind ``"merged"``; ``members`` counts the base blocks.
    """
    if not blocks:
        raise ValueError("merge_blocks needs at least one block")
    if len(blocks) == 1:
        return replace(blocks[0], index=index, name=f"block{index:02d}:{blocks[0].name.split(':', 1)[1]}")
    nodes = tuple(dict.fromkeys(n for b in blocks for n in b.nodes))
    inside = set(nodes)
    produced = {t for b in blocks for t in b.outputs}
    inputs = tuple(dict.fromkeys(t for b in blocks for t in b.inputs if t not in produced))
    tensors = graph.tensors()
    graph_outputs = {t.name for t in graph.outputs}
    extra = []
    for b in blocks[:-1]:
        for t in b.outputs:
            tensor = tensors.get(t)
            leaves = (t in graph_outputs or tensor is None
                      or any(n.name not in inside for n in _readers(tensor)))
            if leaves:
                extra.append(t)
    outputs = tuple(dict.fromkeys([*extra, *blocks[-1].outputs]))
    members = "+".join(b.name.split(":", 1)[0] for b in blocks)
    return Block(index=index, name=f"block{index:02d}:merged({members})", kind="merged", nodes=nodes,
                 inputs=inputs, outputs=outputs,
                 weights=tuple(dict.fromkeys(w for b in blocks for w in b.weights)),
                 weighted_ops=tuple(dict.fromkeys(o for b in blocks for o in b.weighted_ops)),
                 members=sum(b.members for b in blocks))


def merged_partition(graph: gs.Graph, blocks: Sequence[Block], groups: Sequence[Sequence[int]]
                     ) -> list[Block]:
    """The partition with each group of consecutive blocks merged (indices renumbered from 0)."""
    flat = [i for g in groups for i in g]
    if flat != list(range(len(blocks))):
        raise ValueError(f"groups {groups} do not cover the {len(blocks)} blocks in order")
    return [merge_blocks(graph, [blocks[i] for i in g], index) for index, g in enumerate(groups)]


def merged_partitioner(groups: Sequence[Sequence[int]], base_names: Sequence[str], max_chain: int = 3
                       ) -> Callable[[gs.Graph, Callable[[gs.Node], bool]], list[Block]]:
    """A ``ReconstructPass`` partitioner: the base partition (checked against ``base_names``), merged."""

    def partitioner(graph: gs.Graph, is_supported: Callable[[gs.Node], bool]) -> list[Block]:
        blocks = partition(graph, max_chain=max_chain, is_supported=is_supported)
        if [b.name for b in blocks] != list(base_names):
            raise RuntimeError("MRECG: the graph's partition changed between the two reconstruction passes")
        return merged_partition(graph, blocks, groups)

    return partitioner
