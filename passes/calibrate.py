"""CalibratePass: run the float model on calibration data and turn activation ranges into QParams.

Reads ``ctx.specs`` (activation tensors to calibrate), ``ctx.shared`` and ``ctx.calib``; writes
``ctx.qparams`` for every planned activation and ``ctx.report["calibration"]``. Observers stream
(one batch in memory at a time); the range -> (scale, zero-point) rule is in
:func:`onnxq.spec.qparams_from_range` and the search methods in :mod:`onnxq.observers`.
Passthrough outputs copy their source's parameters: s_out = s_in, z_out = z_in.
"""

from __future__ import annotations

import itertools
import logging
import time

import onnx_graphsurgeon as gs

from onnxq.capture import capture
from onnxq.context import QuantContext
from onnxq.errors import PassError, UserError
from onnxq.graph import to_model
from onnxq.observers import make_observer
from onnxq.pass_infra import Pass, PassResult

log = logging.getLogger(__name__)


def activation_names(graph: gs.Graph, ctx: QuantContext) -> list[str]:
    """Planned tensors that are activations (not constants) and own their parameters."""
    tensors = graph.tensors()
    return [name for name in ctx.specs
            if name in tensors and not isinstance(tensors[name], gs.Constant) and name not in ctx.shared]


class CalibratePass(Pass):
    def requires(self, graph: gs.Graph, ctx: QuantContext) -> None:
        if ctx.calib is None:
            raise PassError("CalibratePass needs ctx.calib")

    def call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        cfg = ctx.config
        names = activation_names(graph, ctx)
        options = {"percentile": cfg.percentile} if cfg.calib_method == "percentile" else {}
        observers = {n: make_observer(cfg.calib_method, ctx.specs[n], **options) for n in names}
        feeds = ctx.calib
        n_batches = len(feeds)
        if cfg.calib_samples is not None:
            per_batch = max(1, feeds.num_samples // max(1, n_batches)) if hasattr(feeds, "num_samples") else 1
            n_batches = min(n_batches, -(-cfg.calib_samples // per_batch))
            feeds = itertools.islice(feeds, n_batches)
        start = time.perf_counter()
        if names:
            count = capture(to_model(graph), names, feeds, lambda n, v: observers[n].update(v), total=n_batches)
            if count == 0:
                raise UserError("the calibration data is empty: give at least one sample")
        for name, obs in observers.items():
            ctx.qparams[name] = obs.qparams()
        for out, src in ctx.shared.items():
            if src in ctx.qparams:
                ctx.qparams[out] = ctx.qparams[src]
        ctx.report["calibration"] = {
            "method": cfg.calib_method, "tensors": len(names), "batches": n_batches,
            "seconds": round(time.perf_counter() - start, 2),
        }
        log.info("calibrated %d tensors on %d batches (%s)", len(names), n_batches, cfg.calib_method)
        return PassResult(graph, False)
