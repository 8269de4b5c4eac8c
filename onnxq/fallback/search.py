"""Which ops to keep float: per-op sensitivity, then a greedy choice until the target is met.

On the switch model (:mod:`onnxq.fallback.switches`) and the search samples ``X``:

1. **Sensitivity.** On the first :data:`RANK_SAMPLES` samples ``X_r`` of ``X``: for every candidate ``n``,
   ``gain(n) = error(nothing kept) - error(keep n alone)`` (:mod:`onnxq.fallback.score`): one run over
   ``X_r`` per candidate, on one session. The ranking error is continuous, so a few samples order the
   candidates; the choice below is judged on all of ``X``.
2. **Greedy choice.** Candidates with ``gain > 0`` in decreasing gain: each joins the kept set ``K``
   only if ``score(K + n)`` is better than ``score(K)`` (a lower error or a lower judged drop), and the
   search stops as soon as ``score(K)`` meets the target. An op whose effect the others already cover
   is left quantized, so the plan stays small; every kept op records the drop before and after it
   joined (what it bought).

Cost: ``1 + |candidates|`` runs over ``X_r`` and ``1 + |tried|`` over ``X``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from onnxq.fallback.plan import KeptOp
from onnxq.fallback.score import Score, Scorer
from onnxq.fallback.switches import SwitchModel
from onnxq.report.sessions import DISABLE_ALL, inputs_for, open_session

log = logging.getLogger(__name__)

#: A candidate joins only if it lowers the ranking error by more than this fraction (or the judged drop).
_MIN_IMPROVEMENT = 1e-3
#: Samples the per-candidate sensitivities are measured on (the first ones of the search samples).
RANK_SAMPLES = 16


@dataclass(frozen=True)
class Sensitivity:
    """One candidate's score when it alone is kept float."""

    key: str
    op: str
    score: Score
    gain: float


@dataclass(frozen=True)
class SearchResult:
    base: Score
    kept: tuple[KeptOp, ...]
    predicted: Score
    ranking: tuple[Sensitivity, ...]
    evaluations: int


class SwitchRunner:
    """Runs the switch model over the search feeds for a set of kept keys and scores the outputs."""

    def __init__(self, switch: SwitchModel, feeds: Sequence[dict[str, np.ndarray]], scorer: Scorer,
                 session: ort.InferenceSession | None = None) -> None:
        self.session = session if session is not None else open_session(switch.model, DISABLE_ALL)
        self.switch, self.feeds, self.scorer = switch, feeds, scorer
        self.evaluations = 0

    def subset(self, batches: int) -> SwitchRunner:
        """A runner on the same session over the first ``batches`` batches."""
        return SwitchRunner(self.switch, self.feeds[:batches], self.scorer.first(batches), self.session)

    def __call__(self, keep: set[str] | frozenset[str]) -> Score:
        flags = self.switch.feed(keep)
        outs = []
        for feed in self.feeds:
            outs.append(self.session.run(None, {**inputs_for(self.session, feed), **flags}))
        self.evaluations += 1
        return self.scorer(outs)


def search(runner: SwitchRunner, max_drop: float, rank_batches: int, round_no: int = 1) -> SearchResult:
    """Rank the candidates of ``runner``'s switch model on its first ``rank_batches`` batches (those holding
    :data:`RANK_SAMPLES` samples) and choose the kept set (module docstring)."""
    ranker = runner.subset(rank_batches)
    unswitched = ranker(frozenset())
    candidates = runner.switch.candidates
    ranking: list[Sensitivity] = []
    t0 = time.perf_counter()
    for i, c in enumerate(candidates):
        s = ranker({c.key})
        ranking.append(Sensitivity(c.key, c.op, s, unswitched.error - s.error))
        done = i + 1
        if done % 10 == 0 or done == len(candidates):
            spent = time.perf_counter() - t0
            log.info("accuracy target: sensitivity of %d/%d ops (ETA %.0f s)", done, len(candidates),
                     spent / done * (len(candidates) - done))
    ranking.sort(key=lambda r: -r.gain)
    base = runner(frozenset())
    kept: list[KeptOp] = []
    current, keys = base, set[str]()
    for r in ranking:
        if current.meets(max_drop) or r.gain <= 0:
            break
        trial = runner(keys | {r.key})
        better = trial.error < current.error * (1 - _MIN_IMPROVEMENT) or trial.judged < current.judged
        if better:
            kept.append(KeptOp(r.key, r.op, r.score.judged, current.judged, trial.judged, round_no))
            keys.add(r.key)
            current = trial
            log.info("accuracy target: keep %s float (%s): drop %.4g -> %.4g", r.key, r.op, kept[-1].before,
                     kept[-1].after)
    return SearchResult(base, tuple(kept), current, tuple(ranking), runner.evaluations + ranker.evaluations)
