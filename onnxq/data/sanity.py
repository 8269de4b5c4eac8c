"""Calibration data that cannot stand for real inputs.

Quantization ranges come from the calibration data, and by default so does the validation (a
held-out part of it). Data that carry no information (all zeros, one constant, blank or upscaled
tiny images, one sample copied) give ranges that fit nothing real, and a held-out part of the same
data agrees with the model it made, so the check would pass a broken model. The rule, per float
input with at least ``MIN_ELEMENTS`` values per sample (smaller inputs are parameters, masks or
scalars that may well be constant):

1. every value is the same (a constant, e.g. all zeros), or every magnitude is under ``TINY``, or
   the median magnitude is over ``HUGE`` (a scaling mistake, not data);
2. every sample is the same (one sample repeated);
3. for an image-like (N, C, H, W) input with H*W >= ``MIN_PLANE``: more than half of the (sample,
   channel) planes hold at most ``FLAT_PLANE_VALUES`` distinct values (blank images, or images of
   one or two pixels upscaled).

An input that is constant or the same in every sample, beside another float input whose samples
differ, is not a finding (an attention mask of ones, a fixed flag): rules 1 (its constant case) and 2
apply when no judged input varies from sample to sample.

A finding is a warning; the run then validates only on data the user gives (``--validation``): a
check held out from degenerate data fails with the finding as its reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

MIN_ELEMENTS = 64
TINY = 1e-20
HUGE = 1e15
MIN_PLANE = 16
FLAT_PLANE_VALUES = 4
_MAX_PLANES = 4096  # planes examined for rule 3 (an even sample over the data)


def degenerate_inputs(batches: Iterable[Mapping[str, np.ndarray]]) -> list[str]:
    """One line per input whose calibration data break a rule of the module docstring."""
    per_input: dict[str, list[np.ndarray]] = {}
    for feed in batches:
        for name, value in feed.items():
            arr = np.asarray(value)
            if arr.dtype.kind == "f" and arr.ndim >= 1 and arr[0].size >= MIN_ELEMENTS:
                per_input.setdefault(name, []).append(arr)
    findings = {name: _finding(name, parts) for name, parts in per_input.items()}
    fixed = {name for name, parts in per_input.items() if _same_samples(parts)}
    return [line for name, line in findings.items() if line and not (name in fixed and len(fixed) < len(per_input))]


def _same_samples(parts: list[np.ndarray]) -> bool:
    """Every sample of the input equals the first one (a constant input included)."""
    first = parts[0][:1]
    return all(np.array_equal(p, first.repeat(len(p), axis=0)) for p in parts)


def _finding(name: str, parts: list[np.ndarray]) -> str | None:
    first = parts[0]
    lo = min(float(np.nanmin(p)) for p in parts)
    hi = max(float(np.nanmax(p)) for p in parts)
    if lo == hi:
        return f"input {name!r}: every calibration value is {lo:g}"
    if max(abs(lo), abs(hi)) < TINY:
        return f"input {name!r}: every calibration value is under {TINY:g} in magnitude (a scaling mistake?)"
    typical = float(np.nanmedian(np.abs(first)))
    if typical > HUGE:  # most values, not a few (an additive mask holds 0 and -1e30 on purpose)
        return f"input {name!r}: the typical calibration value is {typical:.3g} in magnitude (a scaling mistake?)"
    samples = sum(len(p) for p in parts)
    if samples > 1 and _same_samples(parts):
        return f"input {name!r}: all {samples} calibration samples are the same"
    if first.ndim == 4 and first.shape[2] * first.shape[3] >= MIN_PLANE:
        flat, total = _flat_planes(parts)
        if flat * 2 > total:
            return (f"input {name!r}: {flat} of {total} image planes hold at most {FLAT_PLANE_VALUES} distinct "
                    "values (blank images, or tiny images upscaled)")
    return None


def _flat_planes(parts: list[np.ndarray]) -> tuple[int, int]:
    per_part = max(1, _MAX_PLANES // len(parts))
    chosen = []
    for p in parts:
        rows = p.reshape(-1, p.shape[2] * p.shape[3])
        chosen.append(rows[np.linspace(0, len(rows) - 1, min(len(rows), per_part)).astype(np.int64)])
    planes = np.concatenate(chosen)
    ordered = np.sort(planes, axis=1)
    distinct = 1 + np.count_nonzero(np.diff(ordered, axis=1), axis=1)
    return int(np.count_nonzero(distinct <= FLAT_PLANE_VALUES)), len(planes)
