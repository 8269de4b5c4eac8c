"""Pass infrastructure: the contract every pass follows.

A graph pass is an object with ``requires`` (checks what it needs in the context), ``call`` (does
the work, returns a :class:`PassResult`) and ``ensures`` (checks what it promised). Graph passes
mutate the onnx-graphsurgeon graph in place (GS is a mutation API) and say whether they changed
anything. :class:`PassManager` runs a list of passes, optionally to a fixpoint, and in debug mode
runs the ONNX checker after every pass so the pass that breaks a graph is named.

A :class:`ModelPass` works on the exported ``ModelProto`` instead: the last steps of writing a file
(metadata, containers onnxruntime reads through a Cast) that have no graphsurgeon form.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from onnxq.core import mapped, memory
from onnxq.core.context import QuantContext
from onnxq.errors import PassError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassResult:
    graph: gs.Graph
    modified: bool


class Pass(abc.ABC):
    """Base class of graph passes (in place)."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def requires(self, graph: gs.Graph, ctx: QuantContext) -> None:  # noqa: B027 - optional hook
        """Raise PassError if the context lacks what this pass reads."""

    def ensures(self, graph: gs.Graph, ctx: QuantContext) -> None:  # noqa: B027 - optional hook
        """Raise PassError if the pass broke its promise."""

    @abc.abstractmethod
    def call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult: ...

    def __call__(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        self.requires(graph, ctx)
        start = time.perf_counter()
        result = self.call(graph, ctx)
        if result.graph is not graph:
            raise PassError(f"{self.name} is an in-place pass but returned a different graph")
        result.graph.cleanup().toposort()
        self.ensures(result.graph, ctx)
        ctx.log_pass(self.name, result.modified, time.perf_counter() - start)
        return result


class ModelPass(abc.ABC):
    """A pass over the exported model (in place), after the graph passes."""

    @property
    def name(self) -> str:
        return type(self).__name__

    @abc.abstractmethod
    def call(self, model: onnx.ModelProto, ctx: QuantContext) -> bool:
        """Edit ``model`` in place; return whether it changed."""

    def __call__(self, model: onnx.ModelProto, ctx: QuantContext) -> bool:
        start = time.perf_counter()
        modified = self.call(model, ctx)
        ctx.log_pass(self.name, modified, time.perf_counter() - start)
        return modified


class PassManager:
    """Runs passes in order, ``steps`` times or until none modifies the graph (``early_stop``)."""

    def __init__(self, passes: Sequence[Pass], *, steps: int = 1, early_stop: bool = True, debug: bool = False):
        self.passes = list(passes)
        self.steps = steps
        self.early_stop = early_stop
        self.debug = debug

    def __call__(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        any_modified = False
        for _ in range(self.steps):
            modified = False
            for p in self.passes:
                result = p(graph, ctx)
                mapped.release(graph)  # weights the pass only read leave memory again
                memory.trim()
                modified |= result.modified
                if self.debug:
                    try:
                        onnx.checker.check_model(gs.export_onnx(graph, do_type_check=False))
                    except Exception as exc:
                        raise PassError(f"graph invalid after {p.name}: {exc}") from exc
            any_modified |= modified
            if self.early_stop and not modified:
                break
        return PassResult(graph, any_modified)
