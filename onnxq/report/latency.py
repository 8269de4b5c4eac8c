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
import onnxruntime as ort

from onnxq.core.graph import serialize_for_ort
from onnxq.report.sessions import ENABLE_ALL, threads

RUNS = 20
MIN_RUNS = 3
BUDGET_S = 3.0


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ENABLE_ALL
    so.intra_op_num_threads = threads()
    so.log_severity_level = 4
    src = str(model) if isinstance(model, Path) else serialize_for_ort(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def quick_latency(float_model: onnx.ModelProto | Path, quant: onnx.ModelProto,
                  feed: dict[str, np.ndarray]) -> dict[str, Any]:
    """``{"float_ms", "quantized_ms", "ratio", "runs", "batch"}`` (module docstring)."""
    first_ms, second_ms, runs = paired_latency(float_model, quant, feed)
    first = np.asarray(next(iter(feed.values())))
    return {"float_ms": round(first_ms, 3), "quantized_ms": round(second_ms, 3),
            "ratio": round(second_ms / first_ms, 3) if first_ms > 0 else None, "runs": runs,
            "batch": int(first.shape[0]) if first.ndim else 1}


def paired_latency(first_model: onnx.ModelProto | Path, second_model: onnx.ModelProto,
                   feed: dict[str, np.ndarray]) -> tuple[float, float, int]:
    """The median ms of each model on ``feed``, runs interleaved, and the runs of each (module docstring)."""
    sessions = [_session(first_model), _session(second_model)]
    feeds = [{k: v for k, v in feed.items() if k in {i.name for i in s.get_inputs()}} for s in sessions]
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
