"""How far a quantized model is from its float original: the drop the accuracy target bounds, and the
error that ranks the candidates to keep float.

Outputs ``y`` (float model) and ``y'`` (quantized), each stacked over the samples
(:func:`onnxq.report.metrics.stack_samples`). Per output, in percentage points:

* ``agreement``: ``drop = 100 (1 - a)`` with ``a`` the top-1 agreement over ``n`` rows. The target is
  judged on the optimistic end of its 95 % interval, ``100 (1 - upper(a, n))`` (the validator's Wilson
  bound, :func:`onnxq.report.verdict.agreement_upper_bound`): a flip or two in a few dozen samples is
  noise, not a reason to run an op in float;
* ``cosine``: ``drop = 100 (1 - cos(y, y'))`` over all samples (the validator's cosine);
* ``metric``: ``drop = m(y) - m(y')`` for the user's score ``m`` of the first output (higher is better;
  its own units).

``auto`` takes agreement for an output with a class axis on which the float model predicts varied
classes (its most common class under 90 % of the rows), cosine otherwise; the model's drop is the
largest over its outputs.

The ranking error is continuous, so it orders candidates that no sample's top-1 separates:
``error = sum_o ||y'_o - y_o||^2 / ||y_o||^2``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from onnxq.errors import UserError
from onnxq.report.metrics import cosine, majority_share, stack_samples, top1_agreement
from onnxq.report.verdict import agreement_upper_bound

#: ``auto`` judges a class axis by agreement only while the float model's most common class stays under this share.
_VARIED = 0.9

UserMetric = Callable[[np.ndarray], float]


@dataclass(frozen=True)
class Score:
    """One model's distance to the float model on the search samples.

    Attributes:
        drop: the measured drop (percentage points; the user metric's units for "metric").
        judged: the drop the target is judged on (agreement: at the bound of its 95 % interval).
        error: the ranking error (sum of relative squared errors of the outputs).
    """

    drop: float
    judged: float
    error: float

    def meets(self, max_drop: float) -> bool:
        return self.judged <= max_drop + 1e-12


class Scorer:
    """Scores output sets against the float model's outputs on the same samples."""

    def __init__(self, reference: Sequence[Sequence[np.ndarray]], metric: str, user_metric: UserMetric | None = None,
                 names: Sequence[str] | None = None) -> None:
        """``reference``: the float model's outputs per batch, in its output order (``names``, default
        ``output 0``, ...)."""
        if not reference:
            raise UserError("the accuracy target needs samples to measure on: give more calibration data")
        self.reference, self.metric = reference, metric
        self.names = list(names) if names is not None else [f"output {i}" for i in range(len(reference[0]))]
        self.ref = [stack_samples([np.asarray(r[i], dtype=np.float64) for r in reference])
                    for i in range(len(self.names))]
        if metric == "metric" and user_metric is None:
            raise UserError("accuracy.metric = 'metric' needs a metric callable: pass quantize(..., metric=fn)")
        self.user_metric = user_metric
        self.metrics = [self._metric_of(metric, r) for r in self.ref]
        self.user_reference = float(user_metric(self.ref[0])) if metric == "metric" and user_metric else 0.0

    def first(self, batches: int) -> Scorer:
        """A scorer of the first ``batches`` batches only, with the same per-output metrics."""
        sub = Scorer(self.reference[:batches], self.metric, self.user_metric, self.names)
        sub.metrics = list(self.metrics)
        return sub

    @staticmethod
    def _metric_of(metric: str, ref: np.ndarray) -> str:
        if metric != "auto":
            return metric
        classifier = top1_agreement(ref, ref) is not None
        share = majority_share(ref) if classifier else None
        return "agreement" if classifier and share is not None and share < _VARIED else "cosine"

    def describe(self) -> dict[str, str]:
        """Output name -> the metric it is judged by."""
        return dict(zip(self.names, self.metrics, strict=True))

    def __call__(self, outputs: Sequence[Sequence[np.ndarray]]) -> Score:
        """The score of one model's outputs per batch, in the float model's output order."""
        drop = judged = -np.inf
        error = 0.0
        for i, name in enumerate(self.names):
            r = self.ref[i]
            t = stack_samples([np.asarray(o[i], dtype=np.float64) for o in outputs])
            if r.shape != t.shape:
                raise RuntimeError(f"{name}: shape {t.shape} differs from the float model's {r.shape}")
            error += float(np.sum((t - r) ** 2) / max(float(np.sum(r * r)), 1e-30))
            d, j = self._drop(self.metrics[i], r, t, first=i == 0)
            drop, judged = max(drop, d), max(judged, j)
        return Score(float(drop), float(judged), error)

    def _drop(self, metric: str, r: np.ndarray, t: np.ndarray, *, first: bool) -> tuple[float, float]:
        if metric == "agreement":
            a = top1_agreement(r, t)
            if a is None:
                raise UserError(f"accuracy.metric = 'agreement' needs outputs with a class axis ([N, C]), got shape "
                                f"{r.shape}: use --drop-metric cosine")
            rows = r.shape[0]
            return 100.0 * (1.0 - a), 100.0 * (1.0 - agreement_upper_bound(a, rows))
        if metric == "cosine":
            d = 100.0 * (1.0 - cosine(r, t))
            return d, d
        if not first or self.user_metric is None:
            return -np.inf, -np.inf  # the user's metric scores the first output only
        d = self.user_reference - float(self.user_metric(t))
        return d, d
