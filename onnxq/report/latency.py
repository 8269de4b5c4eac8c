"""A quick latency check for the report: the float and the quantized model in onnxruntime CPU at
ORT_ENABLE_ALL on one validation batch, runs interleaved (float, quantized, float, ...) so that both see the
same machine state, the median of each. At most :data:`RUNS` runs each and about :data:`BUDGET_S`
seconds in all (at least :data:`MIN_RUNS` each); the benchmarks in ``scripts/`` measure latency properly.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxq.report.sessions import ENABLE_ALL, inputs_for, open_session

RUNS = 20
MIN_RUNS = 3
BUDGET_S = 3.0


def quick_latency(float_model: onnx.ModelProto | Path, quant: onnx.ModelProto, feed: dict[str, np.ndarray],
                  batch: int) -> dict[str, Any]:
    """``{"float_ms", "quantized_ms", "ratio", "runs", "batch"}`` on ``feed`` of ``batch`` samples (module
    docstring)."""
    first_ms, second_ms, runs = paired_latency(float_model, quant, feed)
    return {"float_ms": round(first_ms, 3), "quantized_ms": round(second_ms, 3),
            "ratio": round(second_ms / first_ms, 3) if first_ms > 0 else None, "runs": runs, "batch": batch}


def paired_latency(first_model: onnx.ModelProto | Path, second_model: onnx.ModelProto,
                   feed: dict[str, np.ndarray]) -> tuple[float, float, int]:
    """The median ms of each model on ``feed``, runs interleaved, and the runs of each (module docstring)."""
    sessions = [open_session(first_model, ENABLE_ALL), open_session(second_model, ENABLE_ALL)]
    feeds = [inputs_for(s, feed) for s in sessions]
    for s, f in zip(sessions, feeds, strict=True):  # warm-up: prepacking, arena growth
        s.run(None, f)
    times: list[list[float]] = [[], []]
    start = time.perf_counter()
    while len(times[0]) < RUNS and (len(times[0]) < MIN_RUNS or time.perf_counter() - start < BUDGET_S):
        for i, (s, f) in enumerate(zip(sessions, feeds, strict=True)):
            t0 = time.perf_counter()
            s.run(None, f)
            times[i].append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times[0]), statistics.median(times[1]), len(times[0])
