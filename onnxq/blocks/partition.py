"""Partition a QDQ graph into reconstruction blocks (BRECQ granularity).

BRECQ reconstructs one *block* at a time: every residual unit (shortcut and downsample conv
included), chains of up to three plain layers (MQBench), and the first conv and the classifier as
single layers. onnxq finds these units on the ONNX graph rather than on torch classes.

**Compute graph.** Structure is read on the float computation inside the QDQ graph: *static* nodes
(all inputs constant: weight/bias DQs, ``Constant``...) and *probes* (``Shape``/``Size``) carry no
activation; an activation quantizer ``t -> Q [-> Clip] -> DQ`` (QCDQ for sub-8-bit grids) is
contracted: a DQ output reads as ``t``.
The *main* input is the graph input with the most compute descendants; compute nodes that do not
descend from it (branches fed only by other graph inputs) are *side* nodes. The rest, ``U``, is
what the cut search sees.

**Cuts (single entry, single exit, as PPQ's BlockBuilder).** Walk ``U`` in topological order.
After ``U[i]`` the live set holds the tensors produced so far (main input included) that a later
node of ``U`` reads, plus graph outputs. When it is one tensor ``t``, no other tensor crosses from
the executed nodes to the rest, every later node descends from ``t`` and every earlier one is an
ancestor (in a graph without dead ends, which CleanupPass guarantees), so ``t`` is a cut whatever
topological order is used. The nodes between consecutive cuts form an SESE *region*; a graph with
no cut is one region. Probes and side nodes are left out of this walk, so ``Shape`` logic or a
second input does not hide cuts.

**Blocks.** A region where one node reads two different main tensors (Add, Mul, Concat... joining
two paths) and that has weighted ops (Conv, ConvTranspose, Gemm, MatMul with a constant weight)
is a ``"residual"`` block: inverted residuals, bottlenecks and downsample shortcuts close at their
join. Weight-free regions (a Relu after the Add, pooling, reshapes) join the previous block, else
the next. Runs of plain one-op regions become ``"chain"`` blocks of at most ``max_chain`` weighted
ops, ``ceil(n / max_chain)`` of them, cut at the tensors with the fewest elements where every candidate's
size is known (an inverted residual without a shortcut ends at its projection, as BRECQ's blocks do),
else evenly (:mod:`onnxq.blocks.chain_split`). A group of one is a ``"layer"``. With
``separate_first_last`` the first and last weighted ops (stem conv, classifier) are ``"layer"`` blocks
when their region is plain.

**Node ownership.** A block owns its compute nodes and every auxiliary node feeding them: weight
and bias DQs, internal activation Q/DQ pairs and the Q/DQ pair of its inputs (a quantizer belongs
to the block that reads its output); the Q/DQ of its output belongs to the next block. Static
nodes, probes and quantizers read by several blocks (a shared weight, a ``Shape``) are listed in
each, so every block computes shapes from its own mini-batch. Side nodes go to the first block that
reads them; tensors that probe and side nodes read from elsewhere (the input of a ``Shape``, a
second graph input) are extra block inputs, so such a block is not single entry.

``is_supported`` is asked about every node of a region except activation Q/DQ pairs and constant
DQs (reconstruction replaces those by its own quantizers); one refusal skips the region and breaks
a chain. Nodes inside control-flow subgraphs are not inspected.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from onnxq.blocks.chain_split import even_split, narrowest_split
from onnxq.core.layers import WEIGHT_INPUTS
from onnxq.errors import UserError

log = logging.getLogger(__name__)

_Q, _DQ = "QuantizeLinear", "DequantizeLinear"
_PROBES = frozenset({"Shape", "Size"})


@dataclass(frozen=True)
class Block:
    """One reconstruction unit of a QDQ graph.

    Attributes:
        index: position in the partition (topological order), from 0.
        name: ``"block07:residual(Conv_12..Add_15)"``: index, kind, first and last compute node.
        kind: ``"residual"``, ``"chain"`` or ``"layer"``.
        nodes: names of all nodes of the block in topological order (compute nodes, weight and
            bias DQs, internal and input activation Q/DQ pairs; not the output's Q/DQ).
        inputs: pre-Q float tensors entering the block (names shared with the float model).
        outputs: float tensors leaving the block (names shared with the float model).
        weights: outputs (``"<w>_dequantized"``) of the weight DQs of the block's weighted ops.
        weighted_ops: names of the Conv/ConvTranspose/Gemm/MatMul nodes with a constant weight.
        members: how many blocks of the base partition this unit holds (MRECG's merged units: 2 or 3).
    """

    index: int
    name: str
    kind: str
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    weights: tuple[str, ...]
    weighted_ops: tuple[str, ...]
    members: int = 1


@dataclass
class _Region:
    nodes: list[int]                      # main compute nodes (topological positions)
    cut: str | None = None                # the one tensor live after it (None: the last region)
    weighted: list[int] = field(default_factory=list)
    join: bool = False
    supported: bool = True


@dataclass
class _Unit:
    regions: list[int]
    weighted: int
    join: bool
    supported: bool
    layer: bool = False
    cut_size: int | None = None           # elements per sample of the tensor after it (None: unknown)


class _View:
    """Index of a gs graph: topological order, producers/consumers by name, node classes."""

    def __init__(self, graph: gs.Graph) -> None:
        self.nodes = _toposort(graph)
        names = [n.name for n in self.nodes]
        if any(not n for n in names) or len(set(names)) != len(names):
            raise UserError("blocks.partition needs unique node names: "
                            "run onnxq's CleanupPass on the graph first")
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            for t in node.outputs:
                self.producer[t.name] = i
            for t in node.inputs:
                if t.name and i not in self.consumers.setdefault(t.name, []):
                    self.consumers[t.name].append(i)
        self.graph_inputs = [t.name for t in graph.inputs if not isinstance(t, gs.Constant)]
        self.graph_outputs = [t.name for t in graph.outputs]
        self.kind: list[str] = []           # static | probe | quant | compute | side
        self.static: set[str] = set()
        self.alias: dict[str, str] = {}     # DQ output -> pre-Q tensor
        self._classify()

    def is_static(self, t: gs.Tensor) -> bool:
        return isinstance(t, gs.Constant) or t.name in self.static

    def _classify(self) -> None:
        outs = set(self.graph_outputs)
        for node in self.nodes:
            ins = [t for t in node.inputs if t.name]
            if node.op in _PROBES:
                self.kind.append("static" if all(self.is_static(t) for t in ins) else "probe")
            else:
                self.kind.append("static" if all(self.is_static(t) for t in ins) else "compute")
            if self.kind[-1] != "compute":
                self.static.update(t.name for t in node.outputs)
        for i, node in enumerate(self.nodes):
            if node.op != _Q or self.kind[i] != "compute" or len(node.outputs) != 1:
                continue
            chain, cur = [i], node.outputs[0].name
            while True:  # QCDQ: sub-8-bit grids are clipped to [qmin, qmax] between Q and DQ
                users = self.consumers.get(cur, [])
                nxt = self.nodes[users[0]] if len(users) == 1 else None
                if (nxt is None or nxt.op != "Clip" or cur in outs or nxt.inputs[0].name != cur
                        or not all(self.is_static(t) for t in nxt.inputs[1:] if t.name)):
                    break
                chain.append(users[0])
                cur = nxt.outputs[0].name
            dqs = self.consumers.get(cur, [])
            if (not dqs or cur in outs
                    or any(self.nodes[j].op != _DQ or self.nodes[j].inputs[0].name != cur for j in dqs)):
                continue
            for j in chain + dqs:
                self.kind[j] = "quant"
            for j in dqs:
                self.alias[self.nodes[j].outputs[0].name] = node.inputs[0].name

    def resolve(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def data_inputs(self, i: int) -> list[str]:
        """Distinct non-static inputs of node ``i``, read through activation quantizers."""
        seen: list[str] = []
        for t in self.nodes[i].inputs:
            if t.name and not self.is_static(t):
                r = self.resolve(t.name)
                if r not in seen:
                    seen.append(r)
        return seen

    def sample_size(self, name: str | None) -> int | None:
        """Elements per sample (every axis but the first) of tensor ``name``; None where unknown."""
        if name is None or name not in self.producer:
            return None
        shape = next((t.shape for t in self.nodes[self.producer[name]].outputs if t.name == name), None)
        if not shape or not all(isinstance(d, int) and d >= 0 for d in shape[1:]):
            return None
        return math.prod(shape[1:])

    def is_weighted(self, i: int) -> bool:
        node = self.nodes[i]
        if node.op not in WEIGHT_INPUTS or self.kind[i] not in ("compute", "side"):
            return False
        w_idx = WEIGHT_INPUTS[node.op][0]
        return len(node.inputs) > w_idx and self.is_static(node.inputs[w_idx])

    def weight_dqs(self, i: int) -> list[str]:
        """Outputs of the constant DQs that the weight input of node ``i`` is computed from."""
        found: list[str] = []
        stack = [self.nodes[i].inputs[WEIGHT_INPUTS[self.nodes[i].op][0]].name]
        while stack:
            name = stack.pop()
            j = self.producer.get(name)
            if j is None or self.kind[j] != "static":
                continue
            node = self.nodes[j]
            if node.op == _DQ and isinstance(node.inputs[0], gs.Constant):
                found.append(name)
            else:
                stack.extend(t.name for t in node.inputs if t.name)
        return found


def _toposort(graph: gs.Graph) -> list[gs.Node]:
    """Kahn's algorithm, ties broken by the original position (deterministic, stable)."""
    nodes = list(graph.nodes)
    made = {t.name: i for i, n in enumerate(nodes) for t in n.outputs}
    deps = [{made[t.name] for t in n.inputs if made.get(t.name, i) != i} for i, n in enumerate(nodes)]
    users: list[list[int]] = [[] for _ in nodes]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    left = [len(d) for d in deps]
    ready = [i for i, k in enumerate(left) if k == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in users[i]:
            left[j] -= 1
            if left[j] == 0:
                heapq.heappush(ready, j)
    if len(order) < len(nodes):
        log.warning("graph has a cycle: %d node(s) kept in file order", len(nodes) - len(order))
        done = set(order)
        order += [i for i in range(len(nodes)) if i not in done]
    return [nodes[i] for i in order]


def _main_nodes(view: _View) -> tuple[str | None, list[int]]:
    """The main input and the compute nodes descending from it (topological order)."""
    readers: dict[str, list[int]] = {}
    for i, kind in enumerate(view.kind):
        if kind == "compute":
            for name in view.data_inputs(i):
                readers.setdefault(name, []).append(i)

    def reach(source: str) -> set[int]:
        seen: set[int] = set()
        stack = list(readers.get(source, []))
        while stack:
            i = stack.pop()
            if i not in seen:
                seen.add(i)
                stack.extend(j for t in view.nodes[i].outputs for j in readers.get(t.name, []))
        return seen

    best: tuple[int, str | None, set[int]] = (0, None, set())
    for name in view.graph_inputs:
        r = reach(name)
        if len(r) > best[0]:
            best = (len(r), name, r)
    for i, kind in enumerate(view.kind):
        if kind == "compute" and i not in best[2]:
            view.kind[i] = "side"
    return best[1], sorted(best[2])


def _regions(view: _View, main: str, order: list[int]) -> list[_Region]:
    """Split the main compute nodes at single-live-tensor cuts."""
    produced = {t.name for i in order for t in view.nodes[i].outputs} | {main}
    keep = {view.resolve(name) for name in view.graph_outputs}
    left: dict[str, int] = {}
    for i in order:
        for name in view.data_inputs(i):
            if name in produced:
                left[name] = left.get(name, 0) + 1
    live = {main} if left.get(main) or main in keep else set()
    regions: list[_Region] = []
    start = 0
    for pos, i in enumerate(order):
        for name in view.data_inputs(i):
            if name in left:
                left[name] -= 1
                if left[name] == 0 and name not in keep:
                    live.discard(name)
        live.update(t.name for t in view.nodes[i].outputs if left.get(t.name) or t.name in keep)
        if len(live) == 1 or pos == len(order) - 1:
            regions.append(_Region(order[start:pos + 1], next(iter(live)) if len(live) == 1 else None))
            start = pos + 1
    for r in regions:  # a region is single entry: two main inputs of one node join two of its paths
        r.join = any(sum(n in produced for n in view.data_inputs(i)) >= 2 for i in r.nodes)
    return regions


def _home(view: _View, regions: list[_Region]) -> dict[int, set[int]]:
    """Regions each auxiliary node serves (through its consumers); side nodes: the first only.

    A probe (``Shape``/``Size``), like a static node, is copied into every block that reads it, so each
    block computes shapes from its own mini-batch: a shape passed between blocks as a tensor would be
    the shape of the calibration batch it was captured on (its batch size), not a per-sample value."""
    home: dict[int, set[int]] = {}
    for r, region in enumerate(regions):
        for i in region.nodes:
            home[i] = {r}
    main = set(home)
    for i in reversed(range(len(view.nodes))):
        if i in main:
            continue
        regs: set[int] = set()
        for t in view.nodes[i].outputs:
            for j in view.consumers.get(t.name, []):
                regs |= home.get(j, set())
        if view.kind[i] == "side" and regs:
            regs = {min(regs)}
        home[i] = regs
    return home


def partition(graph: gs.Graph, *, max_chain: int = 3,
              is_supported: Callable[[gs.Node], bool] = lambda n: True,
              separate_first_last: bool = True) -> list[Block]:
    """Partition a QDQ graph into BRECQ reconstruction blocks (see the module docstring).

    Args:
        graph: the QDQ graph (not modified); node names must be unique.
        max_chain: most weighted ops in one chain block (MQBench: 3).
        is_supported: False for a node that reconstruction cannot run; its region is skipped.
        separate_first_last: make the first and last weighted ops ``"layer"`` blocks of their own.

    Returns:
        Blocks in topological order; a weighted op is in at most one block. Empty when the graph
        has no compute reachable from a graph input.
    """
    if max_chain < 1:
        raise UserError(f"max_chain must be >= 1, got {max_chain}: use 1 for layer-wise reconstruction")
    view = _View(graph)
    main, order = _main_nodes(view)
    if main is None:
        log.warning("no compute node reads a graph input: no reconstruction blocks")
        return []
    regions = _regions(view, main, order)
    home = _home(view, regions)
    members: list[list[int]] = [[] for _ in regions]
    for i in range(len(view.nodes)):
        for r in home.get(i, ()):
            members[r].append(i)
    for r, region in enumerate(regions):
        region.weighted = [i for i in members[r] if view.is_weighted(i)]
        region.supported = all(is_supported(view.nodes[i]) for i in members[r] if view.kind[i] != "quant"
                               and not (view.kind[i] == "static" and view.nodes[i].op in (_Q, _DQ)))
    units = _units(regions, separate_first_last)
    for u in units:
        u.cut_size = view.sample_size(regions[u.regions[-1]].cut)
    blocks: list[Block] = []
    for kind, group in _groups(units, max_chain):
        nodes = sorted({i for r in group for i in members[r]})
        compute = [i for r in group for i in regions[r].nodes]
        blocks.append(_make_block(view, len(blocks), kind, nodes, compute))
    log.info("partition: %d compute nodes, %d regions, %d blocks (%d region(s) skipped as unsupported)",
             len(order), len(regions), len(blocks), sum(not r.supported for r in regions))
    return blocks


def _units(regions: list[_Region], separate_first_last: bool) -> list[_Unit]:
    """Attach weight-free regions to a neighbour (previous preferred); mark first/last layers."""
    units: list[_Unit] = []
    pending: list[int] = []
    for r, region in enumerate(regions):
        if not region.weighted and region.supported:
            prev = units[-1] if units else None
            if prev is not None and prev.supported and prev.weighted:
                prev.regions.append(r)
            else:
                pending.append(r)
            continue
        units.append(_Unit(pending + [r], len(region.weighted), region.join, region.supported))
        pending = []
    if pending:
        log.debug("%d weight-free region(s) at the end have no block to join", len(pending))
    weighted = [u for u in units if u.weighted]
    if separate_first_last and weighted:
        for u in (weighted[0], weighted[-1]):
            u.layer = u.weighted == 1 and not u.join
    return units


def _groups(units: list[_Unit], max_chain: int) -> list[tuple[str, list[int]]]:
    """(kind, region ids) of every block; plain runs split into chains of <= max_chain (chain_split)."""
    out: list[tuple[str, list[int]]] = []
    run: list[_Unit] = []

    def flush() -> None:
        weights = [u.weighted for u in run]
        sizes = [u.cut_size for u in run[:-1]]
        split = (narrowest_split(weights, [s or 0 for s in sizes], max_chain)
                 if all(s is not None for s in sizes) else None)
        start = 0
        for count in split or even_split(weights, max_chain):
            group = run[start:start + count]
            start += count
            size = sum(u.weighted for u in group)
            out.append(("chain" if size > 1 else "layer", [r for u in group for r in u.regions]))
        run.clear()

    for u in units:
        if u.supported and u.weighted and not u.join and not u.layer:
            run.append(u)
            continue
        flush()
        if not u.supported or not u.weighted:
            continue
        out.append(("layer" if u.layer else "residual" if u.join else "chain", u.regions))
    flush()
    return out


def _make_block(view: _View, index: int, kind: str, nodes: list[int], compute: list[int]) -> Block:
    inside = set(nodes)
    made = {t.name for i in nodes for t in view.nodes[i].outputs}
    outs = set(view.graph_outputs)
    inputs: list[str] = []
    outputs: list[str] = []
    for i in nodes:
        for t in view.nodes[i].inputs:
            if isinstance(t, gs.Variable) and t.name and t.name not in made:
                name = view.resolve(t.name)
                if name not in inputs:
                    inputs.append(name)
        if view.kind[i] in ("static", "quant", "probe"):  # copies live in every block that reads them
            continue
        for t in view.nodes[i].outputs:
            leaves = any(j not in inside for j in view.consumers.get(t.name, [])) or t.name in outs
            name = _float_name(view, t.name)
            if leaves and name not in outputs:
                outputs.append(name)
    weighted = [i for i in nodes if view.is_weighted(i)]
    weights = [w for i in weighted for w in view.weight_dqs(i)]
    first, last = view.nodes[min(compute)].name, view.nodes[max(compute)].name
    span = first if first == last else f"{first}..{last}"
    return Block(index=index, name=f"block{index:02d}:{kind}({span})", kind=kind,
                 nodes=tuple(view.nodes[i].name for i in nodes), inputs=tuple(inputs),
                 outputs=tuple(outputs), weights=tuple(dict.fromkeys(weights)),
                 weighted_ops=tuple(view.nodes[i].name for i in weighted))


def _float_name(view: _View, name: str) -> str:
    """The float model's name of a pre-Q tensor: a quantized graph output was renamed ``<y>_float``."""
    for out in view.graph_outputs:
        if out != name and view.resolve(out) == name:
            return out
    return name


def describe_blocks(blocks: Sequence[Block]) -> list[str]:
    """One line per block for ``onnxq inspect``: name, weighted ops, node count, inputs -> outputs."""
    return [f"{b.name}: {len(b.weighted_ops)} weighted op(s), {len(b.nodes)} nodes, "
            f"{', '.join(b.inputs)} -> {', '.join(b.outputs)}" for b in blocks]
