"""CorrectBiasPass: bias correction of quantization error (DFQ, Nagel et al. 2019).

Quantizing a weight ``W`` to ``W_hat = fake_quantize(W)`` adds ``eps = W_hat - W`` and shifts the
expected layer output by ``E[y_hat] - E[y] = eps . E[x]``. The pass removes that shift::

    b <- b - eps . E[x]

with ``eps . E[x]`` the response of the layer to a constant per-channel input (see
:func:`~onnxq.passes.float.equalize_weights.response`): Conv ``shift[o] = sum_{i,k} eps[o, i, k] E[x_i]``
(grouped/depthwise: only the taps reading channel ``i``, depthwise ``shift[i] = E[x_i] sum_k eps[i, 0, k]``),
Gemm ``shift = alpha E[x] eps'``. Zero padding makes border outputs see fewer taps; DFQ ignores it.

**E[x], per input channel** (axis 1 of the layer's data input):

* ``source="data"``: the mean over the calibration data (``ctx.calib``) of the float model's tensor,
  streamed (one float run capturing every corrected layer's input; sum and count per channel).
* ``source="bn"`` (data-free): the input is ``act(h)`` with ``h`` a BN-folded output (``ctx.bn_stats``),
  ``h_i ~ N(beta_i, gamma_i^2)``, optionally followed by GlobalAveragePool (+ Flatten), which keep
  the per-channel mean. With ``sigma = |gamma|``, ``a = (lo - beta) / sigma``, ``b = (hi - beta) / sigma``::

      E[clip(h, lo, hi)] = lo Phi(a) + beta (Phi(b) - Phi(a)) + sigma (phi(a) - phi(b)) + hi (1 - Phi(b))

  which is ``beta`` for no activation, ``sigma phi(beta / sigma) + beta Phi(beta / sigma)`` for Relu
  (``lo = 0, hi = inf``) and exact for ReLU6 (``Clip(0, 6)``) as well, under the Gaussian assumption.
  Layers whose input has no such statistics (e.g. the first layer) are skipped.

**Where it runs.** Once per context (a second run skips the layers it already corrected, as listed
in the report), after AssignSpecsPass (and CalibratePass), before InsertQDQPass. For every planned
Conv/Gemm weight it computes the weight QParams as InsertQDQPass would (``ctx.qparams[w]`` when set,
else :func:`~onnxq.core.observers.weight_qparams` with ``ctx.config.weights.range_method``; ternary weights: their
operator's codes and scale, :func:`~onnxq.ternary.export.weight_codes`) and stores them in
``ctx.qparams[w]``, so InsertQDQPass quantizes with the same ``W_hat`` (unless it must raise a scale to
fit the INT32 bias): the codes are :func:`~onnxq.targets.weight_codes.rounded_weight`'s, which
InsertQDQPass writes (GPTQ, fitted to the CPU kernels; deterministic for the same inputs). The
corrected float bias is a new initializer (fresh name); its INT32 spec moves to the new name (a layer
without a bias gets one, planned INT32 like AssignSpecsPass does).
Reads ``ctx.specs``, ``ctx.qparams``, ``ctx.bn_stats``, ``ctx.calib``; writes ``ctx.qparams`` (weights),
``ctx.specs`` (biases) and ``ctx.report["bias_correction"] = {"source", "layers": [{"node",
"max_abs_shift", "mean_abs_shift", "max_abs_bias"}], "skipped": [{"node", "reason"}]}``.
"""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.core.channels import (
    bias_tensor,
    clip_bounds,
    effective_bias,
    layer_problem,
    out_channels,
    response,
    write_bias,
)
from onnxq.core.context import QuantContext
from onnxq.core.graph import FreshNames, to_model
from onnxq.core.layers import WEIGHT_INPUTS, node_key
from onnxq.core.pass_infra import Pass, PassResult
from onnxq.core.spec import INT32_BIAS, dequantize
from onnxq.data.capture import capture
from onnxq.errors import PassError, UserError
from onnxq.targets.weight_codes import rounded_weight
from onnxq.ternary.export import weight_codes

log = logging.getLogger(__name__)

SOURCES = ("data", "bn")
_MEAN_PRESERVING = ("GlobalAveragePool", "Flatten")


def _ndtr(z: np.ndarray) -> np.ndarray:
    """Standard normal CDF Phi(z) (math.erf; +-inf allowed)."""
    return 0.5 * (1.0 + np.vectorize(math.erf, otypes=[np.float64])(np.asarray(z) / math.sqrt(2.0)))


def clipped_normal_mean(mu: np.ndarray, sigma: np.ndarray, lo: float = -np.inf,
                        hi: float = np.inf) -> np.ndarray:
    """``E[clip(h, lo, hi)]`` for ``h ~ N(mu, sigma^2)`` (elementwise; ``sigma = 0`` gives ``clip(mu)``)."""
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.abs(np.asarray(sigma, dtype=np.float64))
    safe = np.where(sigma > 0, sigma, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        a, b = (lo - mu) / safe, (hi - mu) / safe
    pa, pb = _ndtr(a), _ndtr(b)
    da = np.exp(-0.5 * np.square(np.where(np.isfinite(a), a, 0.0))) / np.sqrt(2 * np.pi) * np.isfinite(a)
    db = np.exp(-0.5 * np.square(np.where(np.isfinite(b), b, 0.0))) / np.sqrt(2 * np.pi) * np.isfinite(b)
    low = lo * pa if np.isfinite(lo) else 0.0
    high = hi * (1.0 - pb) if np.isfinite(hi) else 0.0
    mean = low + mu * (pb - pa) + sigma * (da - db) + high
    return np.where(sigma > 0, mean, np.clip(mu, lo, hi))


class CorrectBiasPass(Pass):
    """Bias correction (see module docstring).

    Args:
        source: "data" (E[x] measured on ``ctx.calib``) or "bn" (analytic, from folded BatchNorms).
    """

    def __init__(self, *, source: str = "data"):
        if source not in SOURCES:
            raise UserError(f"source={source!r} is not supported: choose one of {', '.join(SOURCES)}")
        self.source = source

    def requires(self, graph: gs.Graph, ctx: QuantContext) -> None:
        if not ctx.specs:
            raise PassError("CorrectBiasPass needs ctx.specs: run AssignSpecsPass first")
        if self.source == "data" and ctx.calib is None:
            raise PassError("CorrectBiasPass(source='data') needs ctx.calib")

    def call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        report = ctx.report.setdefault("bias_correction",
                                       {"source": self.source, "layers": [], "skipped": []})
        report["skipped"] = []
        done = {entry["node"] for entry in report["layers"]}
        layers = [n for n in self._layers(graph, ctx, report) if node_key(n) not in done]
        if self.source == "data":
            means = _input_means(graph, ctx, layers) if layers else {}
        else:
            found = {n.inputs[0].name: _bn_input_mean(ctx, n.inputs[0]) for n in layers}
            means = {name: m for name, m in found.items() if m is not None}
        names = FreshNames(graph)
        corrected = 0
        for node in layers:
            ex = means.get(node.inputs[0].name)
            if ex is None:
                reason = f"no E[x] for {node.inputs[0].name} (no folded BatchNorm statistics before it)"
                log.debug("bias correction: %s skipped: %s", node_key(node), reason)
                report["skipped"].append({"node": node_key(node), "reason": reason})
                continue
            shift, bias = self._correct(node, ctx, ex, names)
            corrected += 1
            report["layers"].append({"node": node_key(node), "max_abs_shift": float(np.max(np.abs(shift))),
                                     "mean_abs_shift": float(np.mean(np.abs(shift))),
                                     "max_abs_bias": float(np.max(np.abs(bias)))})
        log.info("bias correction (%s): %d layers corrected, %d skipped", self.source, corrected,
                 len(report["skipped"]))
        return PassResult(graph, modified=corrected > 0)

    @staticmethod
    def _layers(graph: gs.Graph, ctx: QuantContext, report: dict) -> list[gs.Node]:
        layers = []
        for node in graph.nodes:
            if node.op not in WEIGHT_INPUTS:
                continue
            w_idx, _ = WEIGHT_INPUTS[node.op]
            if len(node.inputs) <= w_idx or node.inputs[w_idx].name not in ctx.specs:
                continue  # not quantized: nothing to correct
            problem = layer_problem(node, allow_shared_weight=True)
            if problem:
                report["skipped"].append({"node": node_key(node), "reason": problem})
            elif node.inputs[0].shape is not None and len(node.inputs[0].shape) < 2:
                report["skipped"].append({"node": node_key(node), "reason": "input has no channel axis"})
            else:
                layers.append(node)
        return layers

    @staticmethod
    def _correct(node: gs.Node, ctx: QuantContext, ex: np.ndarray, names: FreshNames
                 ) -> tuple[np.ndarray, np.ndarray]:
        w_t = node.inputs[1]
        w32 = np.asarray(w_t.values, dtype=np.float32)
        cfg = ctx.config
        spec = ctx.specs[w_t.name]
        qp, codes = weight_codes(w32, spec, cfg.weights.ternary_method, cfg.weights.range_method,
                                 ctx.qparams.get(w_t.name))
        ctx.qparams[w_t.name] = qp
        if not spec.ternary:  # the codes InsertQDQPass will write (GPTQ, fitted to the CPU kernels)
            qp, codes = rounded_weight(node, w32, qp, ctx)
        eps = dequantize(codes, qp).astype(np.float64) - w32.astype(np.float64)
        shift = response(node, eps, ex)
        old = bias_tensor(node)
        bias = effective_bias(node, out_channels(node, w32)) - shift
        new = write_bias(node, bias, names, "biascorr")
        if old is not None:
            ctx.specs.pop(old.name, None)
        ctx.specs[new.name] = INT32_BIAS  # a 1-D float bias of a planned weighted op (as AssignSpecsPass)
        return shift, bias


# ---------------------------------------------------------------------- E[x]
def _input_means(graph: gs.Graph, ctx: QuantContext, layers: list[gs.Node]) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) mean of every layer input over the calibration data (float model)."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def update(name: str, value: np.ndarray) -> None:
        a = np.asarray(value, dtype=np.float64)
        flat = np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)
        sums[name] = flat.sum(axis=1) + sums.get(name, 0.0)
        counts[name] = counts.get(name, 0) + flat.shape[1]

    names = sorted({n.inputs[0].name for n in layers})
    feeds, total = ctx.calib, (len(ctx.calib) if hasattr(ctx.calib, "__len__") else None)
    limit = ctx.config.calibration.samples
    if limit is not None and total is not None:
        per_batch = max(1, getattr(feeds, "num_samples", total) // max(1, total))
        total = min(total, -(-limit // per_batch))
        feeds = itertools.islice(feeds, total)
    count = capture(to_model(graph), names, feeds, update, total=total, desc="bias correction")
    if count == 0:
        raise UserError("the calibration data is empty: give at least one sample")
    return {name: sums[name] / counts[name] for name in sums if counts[name] > 0}


def _bn_input_mean(ctx: QuantContext, x: gs.Tensor) -> np.ndarray | None:
    """Analytic E[x] per channel from the folded BN statistics before ``x``, or None."""
    t = x
    prod = t.inputs[0] if t.inputs else None
    while prod is not None and prod.op in _MEAN_PRESERVING:
        src = prod.inputs[0]
        before = src.inputs[0] if src.inputs else None
        if prod.op == "Flatten" and (int(prod.attrs.get("axis", 1)) != 1 or before is None
                                     or before.op != "GlobalAveragePool"):
            return None  # Flatten keeps channels only on a (N, C, 1, ..., 1) input
        t, prod = src, before
    lo, hi = -np.inf, np.inf
    if prod is not None and prod.op in ("Relu", "Clip"):
        bounds = (0.0, np.inf) if prod.op == "Relu" else clip_bounds(prod)
        if bounds is None:
            return None
        (lo, hi), t = bounds, prod.inputs[0]
    stats = ctx.bn_stats.get(t.name)
    if stats is None:
        return None
    beta, gamma = stats
    return clipped_normal_mean(beta, gamma, lo, hi)
