"""AbsorbBiasPass: high-bias absorption (DFQ, Nagel et al. 2019) across ``L1 -> Relu -> L2``.

Cross-layer equalization can leave large biases in ``L1`` (``b1 / s`` grows when ``s < 1``), which
widen the range of the activation between the layers. If channel ``i`` of the pre-activation
``h = L1(x)`` is (almost) always ``>= c_i >= 0`` then ``relu(h_i) = relu(h_i - c_i) + c_i``, so::

    b1_i <- b1_i - c_i            b2 <- b2 + W2 . c

leaves the output of ``L2`` unchanged wherever ``h >= c``. ``W2 . c`` is the response of ``L2`` to a
constant per-channel input: Conv ``b2[o] += sum_{i,k} W2[o, i, k] c_i`` (all spatial taps; grouped and
depthwise Convs only sum the taps that read channel ``i``: depthwise ``b2[i] += c_i sum_k W2[i, 0, k]``),
Gemm ``C2 <- beta C2 + alpha c B2'`` (``beta`` then 1).

**Choice of c.** ``source="bn"`` (data-free, DFQ): ``c_i = max(0, beta_i - n_sigma |gamma_i|)`` with
``(beta, gamma)`` the BatchNormalization folded into ``L1`` (``ctx.bn_stats``, kept current by
:class:`~onnxq.passes.float.equalize_weights.EqualizeWeightsPass`): ``h_i ~ N(beta_i, gamma_i^2)``, so
``h_i < c_i`` has probability ``Phi(-n_sigma)`` (0.13 % at 3 sigma). Pairs without statistics are
skipped. ``source="data"``: ``c_i = max(0, min h_i)`` over the calibration data (``ctx.calib``, one
float run capturing every candidate ``h``), exact on that data.

**Limits (documented approximations).**
* Only Relu (or ``Clip(0, inf)``) between the layers. A bounded ``Clip(0, m)`` (ReLU6) would need the
  per-channel upper bound ``m - c_i`` after the shift, and ONNX Clip bounds are scalars, so such pairs
  are skipped (equalize with ``relu6="replace"`` first to turn them into Relu). Identity and LeakyRelu
  pairs are skipped too (DFQ absorbs across ReLU only; ``leaky(h - c) + c != leaky(h)``).
* Zero padding of a Conv ``L2`` pads the shifted input with 0, i.e. the original with ``c``: outputs
  whose window touches the border differ by ``W2[:, :, taps in the padding] . c``. DFQ ignores this;
  so do we, and the report marks such pairs ``"inexact_borders": true``. 1x1 / unpadded ``L2`` is exact.
* In a chain the shift of a later pair is computed after the earlier ones were absorbed; earlier
  absorptions leave ``L2``'s output unchanged (up to the border effect), so later statistics stay valid.

Reads ``ctx.bn_stats`` (and ``ctx.calib`` for ``source="data"``); updates ``ctx.bn_stats``
(``beta <- beta - c``, the pre-activation's new mean). Writes new bias initializers (fresh names) and
``ctx.report["absorb_bias"] = {"source", "n_sigma", "pairs", "absorbed": [{"pair", "channels",
"max_c", "mean_c", "inexact_borders"}], "skipped": [{"pair", "reason"}]}``.
Run it after EqualizeWeightsPass (float phase, before AssignSpecsPass).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.core.channels import effective_bias, out_channels, response, write_bias
from onnxq.core.context import QuantContext
from onnxq.core.graph import FreshNames, to_model
from onnxq.core.layer_pairs import Pair, find_pairs
from onnxq.core.pass_infra import Pass, PassResult
from onnxq.data.capture import capture
from onnxq.errors import PassError, UserError

log = logging.getLogger(__name__)

SOURCES = ("bn", "data")


class AbsorbBiasPass(Pass):
    """High-bias absorption (see module docstring).

    Args:
        n_sigma: ``c = max(0, beta - n_sigma |gamma|)`` for ``source="bn"``.
        source: "bn" (folded BatchNorm statistics, data-free) or "data" (calibration minima).
    """

    def __init__(self, *, n_sigma: float = 3.0, source: str = "bn"):
        if source not in SOURCES:
            raise UserError(f"source={source!r} is not supported: choose one of {', '.join(SOURCES)}")
        if not n_sigma >= 0:
            raise UserError(f"n_sigma={n_sigma} must be >= 0")
        self.n_sigma, self.source = float(n_sigma), source

    def requires(self, graph: gs.Graph, ctx: QuantContext) -> None:
        if self.source == "data" and ctx.calib is None:
            raise PassError("AbsorbBiasPass(source='data') needs ctx.calib")

    def call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        report = {"source": self.source, "n_sigma": self.n_sigma, "pairs": 0, "absorbed": [], "skipped": []}
        ctx.report["absorb_bias"] = report
        graph.toposort()
        pairs, refused = find_pairs(graph)
        report["skipped"].extend(refused)

        def skip(p: Pair, reason: str) -> None:
            log.debug("absorb_bias: %s skipped: %s", p.label, reason)
            report["skipped"].append({"pair": p.label, "reason": reason})

        relu_pairs = []
        for p in pairs:
            if p.kind == "relu":
                relu_pairs.append(p)
            else:
                skip(p, f"{p.kind} activation between the layers (absorption is exact across Relu only)")
        minima = _channel_minima(graph, ctx, relu_pairs) if self.source == "data" and relu_pairs else {}
        names = FreshNames(graph)
        for p in relu_pairs:
            t = p.first.outputs[0].name
            c = self._shift(ctx, t, minima)
            if c is None:
                skip(p, f"no BatchNormalization statistics for {t} (no BN folded into it; use source='data')")
                continue
            if not np.any(c > 0):
                skip(p, "c = 0 in every channel (nothing to absorb)")
                continue
            borders = _absorb(p, c, names)
            if t in ctx.bn_stats:
                beta, gamma = ctx.bn_stats[t]
                ctx.bn_stats[t] = (beta - c, gamma)
            report["absorbed"].append({"pair": p.label, "channels": int(np.sum(c > 0)),
                                       "max_c": float(c.max()), "mean_c": float(c.mean()),
                                       "inexact_borders": borders})
        report["pairs"] = len(report["absorbed"])
        log.info("absorb_bias (%s): %d pairs absorbed, %d skipped", self.source, report["pairs"],
                 len(report["skipped"]))
        return PassResult(graph, modified=report["pairs"] > 0)

    def _shift(self, ctx: QuantContext, t: str, minima: dict[str, np.ndarray]) -> np.ndarray | None:
        if self.source == "data":
            return np.maximum(minima[t], 0.0) if t in minima else None
        stats = ctx.bn_stats.get(t)
        if stats is None:
            return None
        beta, gamma = (np.asarray(a, dtype=np.float64) for a in stats)
        return np.maximum(beta - self.n_sigma * np.abs(gamma), 0.0)


def _absorb(p: Pair, c: np.ndarray, names: FreshNames) -> bool:
    """Apply ``b1 -= c``, ``b2 += W2 . c``; returns whether L2 zero-pads (border outputs inexact)."""
    w1 = np.asarray(p.first.inputs[1].values, dtype=np.float64)
    w2 = np.asarray(p.second.inputs[1].values, dtype=np.float64)
    b1 = effective_bias(p.first, out_channels(p.first, w1))
    b2 = effective_bias(p.second, out_channels(p.second, w2))
    write_bias(p.first, b1 - c, names, "absorbed")
    write_bias(p.second, b2 + response(p.second, w2, c), names, "absorbed")
    return _pads(p.second)


def _pads(node: gs.Node) -> bool:
    if node.op != "Conv":
        return False
    auto = node.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    kernel = np.asarray(node.inputs[1].values).shape[2:]
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return any(k > 1 for k in kernel)
    return any(int(v) != 0 for v in node.attrs.get("pads", []))


def _channel_minima(graph: gs.Graph, ctx: QuantContext, pairs: list[Pair]) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) minimum of each pair's pre-activation over the calibration data."""
    minima: dict[str, np.ndarray] = {}

    def update(name: str, value: np.ndarray) -> None:
        a = np.asarray(value)
        m = np.moveaxis(a, 1, 0).reshape(a.shape[1], -1).min(axis=1).astype(np.float64)
        minima[name] = m if name not in minima else np.minimum(minima[name], m)

    names = sorted({p.first.outputs[0].name for p in pairs})
    total = len(ctx.calib) if hasattr(ctx.calib, "__len__") else None
    count = capture(to_model(graph), names, ctx.calib, update, total=total, desc="absorb bias")
    if count == 0:
        raise UserError("the calibration data is empty: give at least one sample")
    return minima
