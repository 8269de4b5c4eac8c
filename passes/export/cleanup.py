"""CleanupPass: the last pass before export.

Removes nodes and initializers nothing uses, sorts the graph topologically, gives every node a
unique name (onnxruntime's reports and vendor tools key on node names) and raises the opset
import to what the emitted Q/DQ types need (13 for per-channel int8, 21 for int4, 25 for int2).
Function-preserving.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxq.core.context import QuantContext
from onnxq.core.graph import set_opset
from onnxq.core.pass_infra import Pass, PassResult


class CleanupPass(Pass):
    def call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        before = len(graph.nodes)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        seen: set[str] = set()
        renamed = 0
        for i, node in enumerate(graph.nodes):
            if not node.name or node.name in seen:
                base = node.name or f"{node.op}"
                name, k = base, i
                while name in seen:
                    name, k = f"{base}_{k}", k + 1
                node.name = name
                renamed += 1
            seen.add(node.name)
        need = max((s.min_opset for s in ctx.specs.values()), default=graph.opset)
        opset_changed = need > graph.opset
        if opset_changed:
            set_opset(graph, need)
        return PassResult(graph, renamed > 0 or len(graph.nodes) != before or opset_changed)
