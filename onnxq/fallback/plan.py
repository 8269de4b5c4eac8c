"""The float plan: the ops an accuracy-target run kept float, why, and what each bought, as an editable file.

``<output stem>.floatplan.json``::

    {"format": "onnxq-float-plan", "version": 1,
     "metric": "cosine", "max_drop": 0.5, "drop": {"quantized": 1.9, "planned": 0.4},
     "keep_float": [{"node": "/encoder/layer.0/attention/MatMul", "op": "MatMul",
                     "why": "alone: drop 1.9 -> 1.2", "bought": {"before": 1.9, "after": 1.1}}, ...]}

Only ``keep_float[*].node`` is read back (``--float-plan FILE``, which adds the nodes to ``exclude``);
the rest documents the choice. A user edits the list and re-applies it without a new search.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxq.config.files import load_float_plan
from onnxq.core.files import atomic_write_text

FORMAT = "onnxq-float-plan"
VERSION = 1


@dataclass(frozen=True)
class KeptOp:
    """One op kept float: its key, op type, the drop with it alone kept (on the ranking samples), and the drop
    before and after it joined (on all search samples)."""

    node: str
    op: str
    alone: float
    before: float
    after: float
    round: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "op": self.op,
                "why": f"the most sensitive left: kept alone, the drop is {self.alone:.4g}",
                "bought": {"before": round(self.before, 6), "after": round(self.after, 6)}, "round": self.round}


@dataclass(frozen=True)
class FloatPlan:
    """The kept ops (``nodes``) and how the search chose them (``kept``, ``summary``)."""

    nodes: tuple[str, ...]
    kept: tuple[KeptOp, ...] = ()
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        by_node = {k.node: k.to_dict() for k in self.kept}
        return {"format": FORMAT, "version": VERSION, **self.summary,
                "keep_float": [by_node.get(n, {"node": n}) for n in self.nodes]}

    def save(self, path: str | Path) -> Path:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> FloatPlan:
        """The plan of a file :meth:`save` wrote (or a user edited); one-line errors for anything else."""
        return cls(load_float_plan(path))
