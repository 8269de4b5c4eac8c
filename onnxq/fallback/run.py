"""An accuracy-target run: quantize everything, measure, keep the fewest ops float that meet the target.

Steps (``config.accuracy``, :class:`~onnxq.config.sections.AccuracyTarget`):

1. quantize with the run's configuration and score the model against the float one on the first
   ``accuracy.samples`` calibration samples (:mod:`onnxq.fallback.score`), as the target's runtime runs
   it (onnxruntime's fused kernels at ORT_ENABLE_ALL for ``ort-cpu``, the QDQ simulation otherwise);
2. while that misses ``max_drop`` (at most ``accuracy.rounds`` times): measure every quantized op's
   sensitivity on the switch model of the current model and choose ops to keep float
   (:mod:`onnxq.fallback.search`), then quantize again with them added to ``exclude`` (the placement
   rules, calibration and weight rounding all see the new plan) and score the real model again;
3. validate as every run does (on the held-out samples, never searched on), and judge the target there
   too: a model that meets it on the search samples but not on the held-out ones fails validation with
   a line saying so. The plan goes to ``report["accuracy_target"]`` and ``<stem>.floatplan.json``.

Targets other than onnxruntime CPU run the kept ops wherever their toolchain places float ops (often a
CPU fallback); the report says so.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.config import Config
from onnxq.core.graph import PROTO_LIMIT, proto_size
from onnxq.fallback.plan import FloatPlan, KeptOp
from onnxq.fallback.score import Score, Scorer, UserMetric
from onnxq.fallback.search import RANK_SAMPLES, SwitchRunner, search
from onnxq.fallback.switches import build_switch_model
from onnxq.pipeline.result import QuantResult
from onnxq.pipeline.run import CalibSource, PreparedRun, finish_run, prepare_run, quantize_prepared
from onnxq.report.latency import paired_latency
from onnxq.report.sessions import DISABLE_ALL, ENABLE_ALL, inputs_for, open_session
from onnxq.targets.profiles import get_target

log = logging.getLogger(__name__)

KEPT_REASON = "kept float for the accuracy target (--max-drop)"


def run_outputs(model: onnx.ModelProto | Path, level: ort.GraphOptimizationLevel,
                feeds: Sequence[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """The outputs of ``model`` (a ModelProto of any size, or a path) on every feed, in onnxruntime CPU."""
    sess = open_session(model, level)
    return [sess.run(None, inputs_for(sess, feed)) for feed in feeds]


def quantize_to_target(model: str | Path | onnx.ModelProto, calib: CalibSource, config: Config, *,
                       metric: UserMetric | None = None, validation: CalibSource | None = None,
                       recipe: Any = None, batch_size: int = 1) -> QuantResult:
    """Quantize ``model`` within ``config.accuracy.max_drop`` of the float model (module docstring)."""
    run = prepare_run(model, calib, config, validation=validation, recipe=recipe, batch_size=batch_size)
    target = run.config.accuracy
    assert target.max_drop is not None
    t0 = time.perf_counter()
    level = ENABLE_ALL if get_target(run.config.target).runtime == "ort-cpu" else DISABLE_ALL
    search_set = run.calib_set.first_samples(target.samples)
    feeds = list(search_set)
    scorer = Scorer(run_outputs(run.float_model, ENABLE_ALL, feeds), target.metric, metric)
    quantized, ctx = quantize_prepared(run)
    plain = quantized
    first = scorer(run_outputs(quantized, level, feeds))
    log.info("accuracy target: everything quantized, drop %.4g (%s; target %.4g)", first.judged,
             _metric_text(scorer), target.max_drop)
    score = first
    kept: list[KeptOp] = []
    rounds: list[dict[str, Any]] = []
    for round_no in range(1, target.rounds + 1):
        if score.meets(target.max_drop) or ctx.reference is None:
            break
        switch = build_switch_model(quantized, ctx.reference, frozenset(ctx.config.exclude),
                                    weighted=target.ops == "all")
        result = search(SwitchRunner(switch, feeds, scorer), target.max_drop,
                        search_set.leading_batches(RANK_SAMPLES), round_no)
        if result.kept:
            kept += result.kept
            config_r = dataclasses.replace(run.config, exclude=tuple(dict.fromkeys([*run.config.exclude,
                                                                                    *(k.node for k in kept)])))
            quantized, ctx = quantize_prepared(run, config_r)
            score = scorer(run_outputs(quantized, level, feeds))
        rounds.append({"round": round_no, "candidates": len(switch.candidates), "evaluations": result.evaluations,
                       "kept": len(result.kept), "predicted_drop": _num(result.predicted.judged),
                       "drop": _num(score.judged),
                       "most_sensitive": [{"node": r.key, "op": r.op, "drop_alone": _num(r.score.judged),
                                           "gain": _num(r.gain)} for r in result.ranking[:20]]})
        if not result.kept:
            log.warning("accuracy target: no op left whose float run lowers the error")
            break
        log.info("accuracy target: round %d kept %d ops, drop %.4g", round_no, len(result.kept), score.judged)
    for k in kept:
        ctx.float_ops[k.node] = KEPT_REASON
    held = _held_out(run, quantized, level, metric, target.metric)
    summary = {"metric": _metric_text(scorer), "max_drop": target.max_drop, "search_samples": search_set.num_samples,
               "drop": {"quantized": _num(first.judged), "planned": _num(score.judged),
                        "validation": _num(held.judged) if held is not None else None}}
    report = {"accuracy_target": {**summary, "met_on_search_samples": score.meets(target.max_drop),
                                  "kept_float": [k.to_dict() for k in kept], "rounds": rounds,
                                  "seconds": round(time.perf_counter() - t0, 2),
                                  **_plan_latency(plain, quantized, feeds, kept), **_runtime_note(run.config)}}
    failures = _failures(score, held, target.max_drop, scorer, kept)
    if failures and not run.config.validation.enabled:  # nothing will judge the model: say it here
        log.warning("%s", failures[0])
    out = finish_run(run, quantized, ctx, extra_report=report, extra_failures=failures)
    return dataclasses.replace(out, float_plan=FloatPlan(tuple(k.node for k in kept), tuple(kept), summary))


def _held_out(run: PreparedRun, quantized: onnx.ModelProto, level: ort.GraphOptimizationLevel,
              metric: UserMetric | None, kind: str) -> Score | None:
    """The target judged on the validation samples (None when validation is off, or for a user metric, which
    scores the search samples only: it may hold their labels)."""
    if not run.config.validation.enabled or kind == "metric":
        return None
    feeds = list(run.val_set)
    return Scorer(run_outputs(run.float_model, ENABLE_ALL, feeds), kind, metric)(run_outputs(quantized, level, feeds))


def _failures(score: Score, held: Score | None, max_drop: float, scorer: Scorer, kept: list[KeptOp]) -> tuple[str, ...]:
    what = _metric_text(scorer)
    if not score.meets(max_drop):
        return (f"the accuracy target is not met: drop {score.judged:.4g} ({what}) on the search samples with "
                f"{len(kept)} ops kept float, over --max-drop {max_drop:g}: raise --max-drop, use a learned "
                "method (--method brecq), or wider bits",)
    if held is not None and not held.meets(max_drop):
        return (f"the accuracy target is met on the search samples but not on the validation samples: drop "
                f"{held.judged:.4g} ({what}) over --max-drop {max_drop:g}: give more calibration samples "
                "(accuracy.samples) or a looser target",)
    return ()


def _metric_text(scorer: Scorer) -> str:
    kinds = sorted(set(scorer.describe().values()))
    return kinds[0] if len(kinds) == 1 else "/".join(kinds)


def _plan_latency(plain: onnx.ModelProto, planned: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]],
                  kept: list[KeptOp]) -> dict[str, Any]:
    """What the kept ops cost in speed: the everything-quantized and the planned model on one search batch
    (:func:`onnxq.report.latency.paired_latency`, onnxruntime CPU at ORT_ENABLE_ALL)."""
    if not kept or max(proto_size(plain), proto_size(planned)) >= PROTO_LIMIT:
        return {}
    plain_ms, planned_ms, runs = paired_latency(plain, planned, feeds[0])
    return {"latency": {"everything_quantized_ms": round(plain_ms, 3), "planned_ms": round(planned_ms, 3),
                        "ratio": round(planned_ms / plain_ms, 3) if plain_ms > 0 else None, "runs": runs}}


def _runtime_note(config: Config) -> dict[str, str]:
    if get_target(config.target).runtime == "ort-cpu":
        return {}
    return {"note": f"target {config.target} runs the kept ops wherever its toolchain places float ops "
                    "(often a CPU fallback); check its partitioning report"}


def _num(x: float) -> float | None:
    return round(float(x), 6) if np.isfinite(x) else None
