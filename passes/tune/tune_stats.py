"""TuneStatsPass: restore each quantized layer's per-channel output mean and std to the float model's.

The folded-graph equivalent of CalibTIP's BatchNorm re-estimation ("statistics tuning"). For a
quantized Conv/ConvTranspose/Gemm/MatMul with output ``z`` (the op's own output, before any fused
activation) and output channel ``c``, the float reference gives ``mu_f[c], sd_f[c]`` and the
quantized graph, *with every earlier layer already tuned*, gives ``mu_q[c], sd_q[c]`` on the
calibration data (both captured with onnxruntime). With ``b`` the current (dequantized) bias:

    alpha_c = sd_f[c] / sd_q[c]                 (1 where either is ~0, or where the new INT32 bias
                                                 would overflow on the shrunk grid; clipped to [1/4, 4])
    s_w'[c] = alpha_c * s_w[c]                  (the weight DQ scale; the integer codes are unchanged,
                                                 so z' - b' = alpha_c (z - b) exactly up to float32)
    b'[c]   = mu_f[c] - alpha_c (mu_q[c] - b[c])

so that ``E[z'] = mu_f`` and ``std(z') = sd_f``. The bias is requantized to INT32 on the new grid
``s_b' = float32(s_in * s_w')`` (the product onnxruntime's integer kernels assume), codes
``round(b' / s_b')``; a float bias (targets without INT32 biases) is written as it is.

Layers are visited in topological order and the quantized statistics of layer ``l`` are captured
after layers ``< l`` were tuned, so each correction sees the earlier ones. The graph runs forward in
segments (:class:`onnxq.data.forward_cache.ForwardCache`): the tensors at the cut before layer ``l`` are
kept, and reaching layer ``l + 1`` runs only the nodes in between, so a sweep costs about two forward
passes instead of one truncated forward pass per layer (quadratic in depth); the values are the
same node by node. Graphs with subgraphs fall back to the truncated-graph run per layer. The float
statistics come from one run
of ``ctx.reference``. The std is left alone (mean only, reported) where the weight scale cannot be
scaled per channel: per-tensor or power-of-two weight scales, or a weight DQ shared by several ops.
The last weighted layer (the network output, e.g. the classifier) is not tuned: CalibTIP leaves the
final layer out, and per-class logit statistics fitted on a calibration subset would bias classes.

:class:`~onnxq.passes.tune.tune_bias.TuneBiasPass` is the same sequential procedure with ``alpha = 1``.
Runs after InsertQDQPass (and ReconstructPass), before CleanupPass. Reads ``ctx.calib``,
``ctx.reference``, ``ctx.qparams``; updates the weight/bias QParams in ``ctx.qparams`` and writes
``ctx.report[<report_key>]``.
"""

from __future__ import annotations

import itertools
import logging
import time

import numpy as np
import onnx_graphsurgeon as gs
from tqdm.auto import tqdm

from onnxq.core.context import QuantContext
from onnxq.core.graph import FreshNames, constant, to_model
from onnxq.core.layers import WEIGHT_INPUTS, node_key
from onnxq.core.pass_infra import Pass, PassResult
from onnxq.core.qdq import (
    QDQNames,
    bias_codes,
    bias_overflows,
    bias_scale,
    bias_spec,
    constant_dq,
    input_scale,
    quantized_name,
)
from onnxq.core.spec import QParams
from onnxq.data.capture import capture
from onnxq.data.forward_cache import ForwardCache
from onnxq.data.forward_cache import supported as supports_segments
from onnxq.errors import PassError

log = logging.getLogger(__name__)

ALPHA_LIMIT = 4.0
#: Calibration samples the tuning passes use at most (statistics converge well before).
MAX_SAMPLES = 256
_TINY = 1e-12


class ChannelStats:
    """Streaming per-channel mean and std (float64 sums) along ``axis``."""

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.sum: np.ndarray | float = 0.0
        self.sq: np.ndarray | float = 0.0
        self.count = 0

    def update(self, value: np.ndarray) -> None:
        a = np.moveaxis(np.asarray(value, dtype=np.float64), self.axis, 0)
        flat = a.reshape(a.shape[0], -1)
        self.sum = self.sum + flat.sum(axis=1)
        self.sq = self.sq + np.square(flat).sum(axis=1)
        self.count += flat.shape[1]

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.sum) / max(1, self.count)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(np.maximum(np.asarray(self.sq) / max(1, self.count) - np.square(self.mean), 0.0))


def channel_axis(node: gs.Node) -> int:
    """Output-channel axis of a weighted op's output: the last one for MatMul, else 1."""
    return -1 if node.op == "MatMul" else 1


class TuneStatsPass(Pass):
    """Sequential per-layer statistics tuning (see the module docstring).

    Args:
        match_std: also restore the std (False: mean only, i.e. bias tuning).
        max_samples: calibration samples used at most.
        incremental: run the graph forward in segments (False: one truncated-graph run per layer).
    """

    report_key = "stats_tuning"

    def __init__(self, *, match_std: bool = True, max_samples: int = MAX_SAMPLES, incremental: bool = True) -> None:
        self.match_std = match_std
        self.max_samples = max_samples
        self.incremental = incremental

    def requires(self, graph: gs.Graph, ctx: QuantContext) -> None:
        if ctx.calib is None or ctx.reference is None:
            raise PassError(f"{self.name} needs ctx.calib and ctx.reference (the float model)")

    def call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        start = time.perf_counter()
        report = {"layers": [], "skipped": []}
        layers = self._layers(graph, ctx, report["skipped"])
        feeds = self._feeds(ctx)
        ref_names = {o for n in ctx.reference.graph.node for o in n.output}
        usable = []
        for node in layers:
            if node.outputs[0].name in ref_names:
                usable.append(node)
            else:
                report["skipped"].append({"node": node_key(node), "reason": "output not in the float reference"})
        float_stats = {n.outputs[0].name: ChannelStats(channel_axis(n)) for n in usable}
        if usable:
            capture(ctx.reference, list(float_stats), feeds, lambda k, v: float_stats[k].update(v),
                    total=len(feeds), desc=f"{self.report_key} (float)")
        names = FreshNames(graph)
        forward = ForwardCache(feeds) if self.incremental and supports_segments(to_model(graph)) else None
        for node in tqdm(usable, desc=self.report_key, unit="layer", leave=False, disable=None):
            z = node.outputs[0].name
            q_stats = ChannelStats(channel_axis(node))
            if forward is not None:
                graph.toposort()
                forward.layer_output(to_model(graph), node.outputs[0].name, z, q_stats.update)
            else:
                sub = graph.copy()
                sub.outputs = [sub.tensors()[z]]
                sub.cleanup()
                capture(to_model(sub), [z], feeds, lambda k, v: q_stats.update(v), total=len(feeds),
                        desc=f"{self.report_key} {node_key(node)}")
            report["layers"].append(self._tune(graph, ctx, node, float_stats[z], q_stats, names))
        report["samples"] = sum(int(next(iter(f.values())).shape[0]) for f in feeds)
        report["seconds"] = round(time.perf_counter() - start, 2)
        ctx.report[self.report_key] = report
        log.info("%s: %d layers tuned, %d skipped (%.1f s)", self.report_key, len(report["layers"]),
                 len(report["skipped"]), report["seconds"])
        return PassResult(graph, bool(report["layers"]))

    # ------------------------------------------------------------------ selection and data
    def _feeds(self, ctx: QuantContext) -> list[dict[str, np.ndarray]]:
        limit = min(self.max_samples, ctx.config.calibration.samples or self.max_samples)
        out, total = [], 0
        for feed in itertools.islice(ctx.calib, None):
            if total >= limit:
                break
            out.append(dict(feed))
            total += int(next(iter(feed.values())).shape[0]) if feed else 1
        return out

    @staticmethod
    def _layers(graph: gs.Graph, ctx: QuantContext, skipped: list) -> list[gs.Node]:
        """Quantized weighted ops (weight from a DQ of a constant) in topological order, minus the last."""
        layers = []
        for node in graph.nodes:
            if node.op not in WEIGHT_INPUTS:
                continue
            w_idx, _ = WEIGHT_INPUTS[node.op]
            if len(node.inputs) > w_idx and constant_dq(node.inputs[w_idx]) is not None:
                layers.append(node)
        if layers:
            skipped.append({"node": node_key(layers[-1]), "reason": "last weighted layer (network output) not tuned"})
        kept = []
        for node in layers[:-1]:
            if WEIGHT_INPUTS[node.op][1] is None:
                skipped.append({"node": node_key(node), "reason": f"{node.op} has no bias input (MatMul + Add "
                                "is not tuned)"})
            else:
                kept.append(node)
        return kept

    # ------------------------------------------------------------------ the correction
    def _tune(self, graph: gs.Graph, ctx: QuantContext, node: gs.Node, fl: ChannelStats, q: ChannelStats,
              names: FreshNames) -> dict:
        w_idx, b_idx = WEIGHT_INPUTS[node.op]
        w_dq = constant_dq(node.inputs[w_idx])
        channels = int(np.asarray(fl.mean).size)
        old_b = self._current_bias(node, b_idx, channels)
        alpha = np.ones(channels)
        std_note = None
        if self.match_std:
            std_note = self._std_blocker(w_dq, channels)
            if std_note is None:
                ok = (q.std > _TINY) & (fl.std > _TINY)
                alpha = np.where(ok, fl.std / np.where(ok, q.std, 1.0), 1.0)
                alpha = np.clip(alpha, 1.0 / ALPHA_LIMIT, ALPHA_LIMIT)
        new_b = fl.mean - alpha * (q.mean - old_b)
        kept = 0
        s_in = input_scale(node)
        if self.match_std and std_note is None and s_in is not None:
            # a channel whose new INT32 bias would overflow on the shrunk grid s_in * alpha * s_w keeps alpha = 1
            w_scale = np.asarray(w_dq.inputs[1].values, dtype=np.float64)
            over = bias_overflows(new_b, s_in * w_scale * alpha)
            kept = int(np.sum(over))
            alpha = np.where(over, 1.0, alpha)
            new_b = fl.mean - alpha * (q.mean - old_b)
        if self.match_std and std_note is None:
            self._scale_weight(ctx, w_dq, alpha, names)
        bias_kind = self._write_bias(graph, ctx, node, b_idx, new_b, names)
        entry = {"node": node_key(node), "bias": bias_kind,
                 "max_abs_mean_shift": float(np.max(np.abs(fl.mean - q.mean))),
                 "max_abs_bias_change": float(np.max(np.abs(new_b - old_b)))}
        if self.match_std:
            entry.update(std_tuned=std_note is None, alpha_min=float(alpha.min()), alpha_max=float(alpha.max()))
            if kept:
                entry["std_kept_for_int32"] = kept
            if std_note:
                entry["std_note"] = std_note
        return entry

    @staticmethod
    def _std_blocker(w_dq: gs.Node, channels: int) -> str | None:
        scale = np.asarray(w_dq.inputs[1].values)
        if scale.ndim != 1 or scale.size != channels:
            return "per-tensor weight scale (std left alone)"
        if len(w_dq.outputs[0].outputs) != 1:
            return "weight shared by several ops (std left alone)"
        from onnxq.core.spec import is_power_of_two

        if np.all(is_power_of_two(scale)):
            return "power-of-two weight scale (std left alone)"
        return None

    @staticmethod
    def _scale_weight(ctx: QuantContext, w_dq: gs.Node, alpha: np.ndarray, names: FreshNames) -> None:
        old = np.asarray(w_dq.inputs[1].values, dtype=np.float32)
        new = (old.astype(np.float64) * alpha).astype(np.float32)
        w_dq.inputs[1] = constant(names.fresh(w_dq.inputs[1].name), new)
        key = quantized_name(w_dq)
        qp = ctx.qparams.get(key)
        if qp is not None:
            ctx.qparams[key] = QParams(new, qp.zero_point, qp.spec)

    @staticmethod
    def _current_bias(node: gs.Node, b_idx: int | None, channels: int) -> np.ndarray:
        if b_idx is None or len(node.inputs) <= b_idx or not node.inputs[b_idx].name:
            return np.zeros(channels)
        t = node.inputs[b_idx]
        if isinstance(t, gs.Constant):
            return np.asarray(t.values, dtype=np.float64)
        dq = constant_dq(t)
        if dq is None:
            raise PassError(f"{node_key(node)}: the bias is neither a constant nor a DequantizeLinear of one")
        codes = np.asarray(dq.inputs[0].values).astype(np.float32)
        return (codes * np.asarray(dq.inputs[1].values, dtype=np.float32)).astype(np.float64)

    @staticmethod
    def _write_bias(graph: gs.Graph, ctx: QuantContext, node: gs.Node, b_idx: int | None, bias: np.ndarray,
                    names: FreshNames) -> str:
        """Write ``bias``: INT32 on ``float32(s_in * s_w)`` when the layer has (or can have) an INT32
        bias, else float. Returns "int32" or "float"."""
        w_idx, _ = WEIGHT_INPUTS[node.op]
        w_scale = np.asarray(constant_dq(node.inputs[w_idx]).inputs[1].values, dtype=np.float32)
        has = b_idx is not None and len(node.inputs) > b_idx and node.inputs[b_idx].name
        existing = constant_dq(node.inputs[b_idx]) if has else None
        s_in = input_scale(node)
        if b_idx is None:
            raise PassError(f"{node_key(node)}: {node.op} has no bias input; it cannot be tuned")
        if existing is not None or (not has and s_in is not None and ctx.target.quantize_bias):
            s_b = bias_scale(s_in, w_scale)
            if np.any(bias_overflows(bias, s_b)):
                log.warning("%s: tuned bias clipped to the int32 range", node_key(node))
            codes = bias_codes(bias, s_b).astype(np.int32)
            per_channel = s_b.ndim == 1
            spec = bias_spec(per_channel)
            base = existing.outputs[0].name if existing is not None else f"{node_key(node)}_bias"
            out = gs.Variable(names.fresh(base + "_tuned"), dtype=np.float32, shape=[int(codes.size)])
            tuned = QDQNames(base + "_tuned")
            inputs = [constant(names.fresh(tuned.quantized), codes),
                      constant(names.fresh(tuned.scale), s_b.reshape(-1) if per_channel else s_b)]
            graph.nodes.append(gs.Node("DequantizeLinear", name=names.fresh(tuned.node("DequantizeLinear")),
                                       attrs={"axis": 0} if per_channel else {}, inputs=inputs, outputs=[out]))
            if existing is not None:
                ctx.qparams[quantized_name(existing)] = QParams(s_b, np.zeros(s_b.shape, dtype=np.int64), spec)
            _set_input(node, b_idx, out)
            return "int32"
        _set_input(node, b_idx, constant(names.fresh(f"{node_key(node)}_bias_tuned"), bias.astype(np.float32)))
        return "float"


def _set_input(node: gs.Node, idx: int, tensor: gs.Tensor) -> None:
    while len(node.inputs) <= idx:
        node.inputs.append(gs.Variable.empty())
    node.inputs[idx] = tensor


