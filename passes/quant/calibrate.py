"""CalibratePass: run the float model on calibration data and turn activation ranges into QParams.

Reads ``ctx.specs`` (activation tensors to calibrate), ``ctx.shared`` and ``ctx.calib``; writes
``ctx.qparams`` for every planned activation, ``ctx.layer_hessians`` (for the gptq rounding method: the
second moment ``E[x x^T]`` of each weighted op's input in its weight's GEMM layout,
:mod:`onnxq.data.moments`, from the same float runs) and ``ctx.report["calibration"]``. Observers stream
(one batch in memory at a time); the range -> (scale, zero-point) rule is in
:func:`onnxq.core.spec.qparams_from_range` and the search methods in :mod:`onnxq.core.observers`.
Passthrough outputs copy their source's parameters: s_out = s_in, z_out = z_in.
"""

from __future__ import annotations

import itertools
import logging
import time

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.core.context import QuantContext
from onnxq.core.gemm_layout import gemm_layout
from onnxq.core.graph import to_model
from onnxq.core.observers import make_observer
from onnxq.core.pass_infra import Pass, PassResult
from onnxq.data.capture import capture
from onnxq.data.moments import InputMoments
from onnxq.errors import PassError, UserError
from onnxq.targets.placement import unplan_unpaired_layers

log = logging.getLogger(__name__)


def activation_names(graph: gs.Graph, ctx: QuantContext) -> list[str]:
    """Planned tensors that are activations (not constants) and own their parameters."""
    tensors = graph.tensors()
    return [name for name in ctx.specs
            if name in tensors and not isinstance(tensors[name], gs.Constant) and name not in ctx.shared]


#: A calibrated |value| above this is a sentinel, not a signal: an additive attention mask of
#: float32's lowest value (-3.4e38) or -inf-like fill. One 8-bit scale over it would put every real
#: value into the zero bin, so such a tensor stays float.
HUGE_RANGE = 1e30


def _drop_huge_ranges(graph: gs.Graph, ctx: QuantContext, observers: dict) -> set[str]:
    """Unplan the tensors whose calibrated range exceeds :data:`HUGE_RANGE` (and the passthrough
    tensors sharing their parameters); their producers are recorded in ``ctx.float_ops``."""
    huge = {n for n, obs in observers.items()
            if obs.num_updates and max(np.abs(obs._min).max(), np.abs(obs._max).max()) > HUGE_RANGE}
    huge |= {out for out, src in ctx.shared.items() if src in huge}
    tensors = graph.tensors()
    for name in sorted(huge):
        ctx.specs.pop(name, None)
        ctx.shared.pop(name, None)
        producer = tensors[name].inputs[0].name if name in tensors and tensors[name].inputs else name
        ctx.float_ops.setdefault(producer, f"output {name!r} reaches |x| > {HUGE_RANGE:.0e} (an additive mask?): "
                                           "one 8-bit scale would flatten it, kept float")
        log.warning("%s: calibrated range beyond %.0e (an additive mask?); kept float", name, HUGE_RANGE)
    unplan_unpaired_layers(graph, ctx.target, ctx.specs, ctx.float_ops, huge)
    return huge


def layer_moments(graph: gs.Graph, ctx: QuantContext) -> dict[str, tuple[str, InputMoments]]:
    """Output tensor name (unique, unlike node names) -> (input name, :class:`~onnxq.data.moments.InputMoments`)
    for every Conv / Gemm / MatMul whose constant weight is planned (not ternary), when the rounding
    method rounds against them (gptq); ops that read one input the same way share one."""
    if ctx.config.rounding.method != "gptq":
        return {}
    out: dict[str, tuple[str, InputMoments]] = {}
    shared: dict[tuple, InputMoments] = {}
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        spec = ctx.specs.get(w.name)
        if not isinstance(w, gs.Constant) or isinstance(x, gs.Constant) or spec is None or spec.ternary:
            continue
        layout = gemm_layout(node.op, node.attrs, w.values.shape)
        if layout is None:
            continue
        key = (x.name, node.op, layout.matrix_shape[1], layout.group, layout.shape[1:],
               tuple(sorted((k, str(v)) for k, v in node.attrs.items() if k not in ("transB", "alpha", "beta"))))
        out[node.outputs[0].name] = (x.name, shared.setdefault(key, InputMoments(node.op, node.attrs, layout)))
    return _within_budget(out, ctx)


def _within_budget(moments: dict[str, tuple[str, InputMoments]], ctx: QuantContext
                   ) -> dict[str, tuple[str, InputMoments]]:
    """``moments`` without the widest inputs' while their matrices (:attr:`InputMoments.nbytes` each, shared
    ones once) pass ``rounding.moments_mb``: those layers round to nearest (a warning and
    ``report["gptq_moments_over_budget"]`` name them)."""
    budget = int(getattr(ctx.config.rounding, "moments_mb", 0)) << 20
    distinct = {id(m): m for _, m in moments.values() if m.kept}
    size = {key: m.nbytes for key, m in distinct.items()}
    total, dropped = sum(size.values()), set()
    for key in sorted(size, key=lambda k: -size[k]):  # widest first; ties keep graph order (stable sort)
        if total <= budget:
            break
        dropped.add(key)
        total -= size[key]
    if not dropped:
        return moments
    skipped = sorted(out for out, (_, m) in moments.items() if id(m) in dropped)
    log.warning("GPTQ: %d layer(s) round to nearest (%s): the second moments of all layer inputs need "
                "%.1f MiB, over rounding.moments_mb = %d; raise it to round them with GPTQ", len(skipped),
                ", ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else ""), sum(size.values()) / 2**20,
                budget >> 20)
    ctx.report["gptq_moments_over_budget"] = skipped
    return {out: pair for out, pair in moments.items() if id(pair[1]) not in dropped}


class CalibratePass(Pass):
    def requires(self, graph: gs.Graph, ctx: QuantContext) -> None:
        if ctx.calib is None:
            raise PassError("CalibratePass needs ctx.calib")

    def call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        cfg = ctx.config
        names = activation_names(graph, ctx)
        options = {"percentile": cfg.calibration.percentile} if cfg.calibration.method == "percentile" else {}
        observers = {n: make_observer(cfg.calibration.method, ctx.specs[n], **options) for n in names}
        feeds = ctx.calib
        n_batches = len(feeds)
        if cfg.calibration.samples is not None:
            per_batch = max(1, feeds.num_samples // max(1, n_batches)) if hasattr(feeds, "num_samples") else 1
            n_batches = min(n_batches, -(-cfg.calibration.samples // per_batch))
            feeds = itertools.islice(feeds, n_batches)
        start = time.perf_counter()
        moments = layer_moments(graph, ctx)
        readers: dict[str, list[InputMoments]] = {}
        for node_input, m in moments.values():
            if all(r is not m for r in readers.get(node_input, [])):
                readers.setdefault(node_input, []).append(m)

        def observe(name: str, value: np.ndarray) -> None:
            if name in observers:
                observers[name].update(value)
            for m in readers.get(name, ()):
                m.update(value)

        wanted = list(dict.fromkeys([*names, *readers]))
        if wanted:
            count = capture(to_model(graph), wanted, feeds, observe, total=n_batches)
            if count == 0:
                raise UserError("the calibration data is empty: give at least one sample")
        for output, (_, m) in moments.items():
            hessian = m.hessian()
            if hessian is not None and np.isfinite(hessian).all():  # else (overflow) round to nearest
                ctx.layer_hessians[output] = hessian
        huge = _drop_huge_ranges(graph, ctx, observers)
        for name, obs in observers.items():
            if name not in huge:
                ctx.qparams[name] = obs.qparams()
        for out, src in ctx.shared.items():
            if src in ctx.qparams:
                ctx.qparams[out] = ctx.qparams[src]
        ctx.report["calibration"] = {
            "method": cfg.calibration.method, "tensors": len(names) - len(huge), "kept_float": sorted(huge),
            "batches": n_batches,
            "seconds": round(time.perf_counter() - start, 2),
        }
        if moments:
            ctx.report["calibration"]["layer_moments"] = len(ctx.layer_hessians)
        log.info("calibrated %d tensors on %d batches (%s)", len(names), n_batches, cfg.calibration.method)
        return PassResult(graph, False)
