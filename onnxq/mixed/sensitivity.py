"""Per-layer sensitivity to the weight bit width: the cost table of mixed precision.

For every quantized weighted layer ``l`` and candidate width ``b`` (default 8/4/2), the model is
evaluated with only layer ``l`` at ``b`` bits and every other layer at 8 bits (activations and
everything else as the config says; with ``first_last_bits`` set, the first and last layers keep
it and are not candidates). The degradation against the float model ``f`` is measured on held-out
calibration samples ``X`` (never used to calibrate), label-free:

    mse(l, b)    = mean_x mean_k (f_q(x)_k - f(x)_k)^2          (summed over graph outputs)
    cosine(l, b) = mean_x (1 - cos(f_q(x), f(x)))               (per sample, flattened outputs)
    metric(l, b) = m(f(X)) - m(f_q(X))                          (optional user score m, higher = better)
    fisher(l, b) = 1/2 mean_x sum_k F_k(x) dz_k(x)^2            (BRECQ-style, :mod:`onnxq.mixed.fisher`)

The mixed-precision cost of a choice is the increase over the layer's 8-bit value,
``c(l, b) = max(v(l, b) - v(l, 8), 0)`` (:meth:`SensitivityTable.cost`); like CalibTIP's integer
program, the costs are assumed to add up over layers.

Efficiency (the model is quantized and calibrated once):
  * activations are calibrated once, on the calibration part of the data;
  * each width's quantized weights come from one run of the weight passes (bias correction when
    configured, then QDQ insertion) with every candidate layer at that width, so a layer's swapped
    weight is exactly what a plan would export (ternary operators, raised scales, corrected biases);
  * the evaluation model is the 8-bit model with every candidate layer's weight and bias fed as a
    float graph input (``DequantizeLinear`` is ``(q - z) s`` in float32, computed here the same
    way); a swap re-runs only the layers downstream of the swapped one, from cached activations
    (:mod:`onnxq.mixed.swap_eval`).
Bias/statistics tuning are not applied here; they apply to the final quantization of a plan.

Weights at each width (``reconstruct``):
  * ``"rtn"``: round to nearest (the default; minutes).
  * ``"adaquant"``: CalibTIP's pre-optimisation. At every width below 8, parallel AdaQuant
    (:mod:`onnxq.passes.rounding.adaquant`: inputs from the float model, so layers are independent) tunes each
    layer's weights, bias and ranges at that width, and the table swaps in those weights and biases.
    The 8-bit base stays round to nearest (8-bit rounding is near-lossless). It prices a layer by what
    is left after reconstruction, not by its round-to-nearest damage: a plan then follows a
    reconstruction method's view (AdaRound repairs 4-bit early layers well and a 2-bit layer badly,
    which an RTN table cannot see). Cost: one parallel AdaQuant run per width below 8.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq.blocks.engine_settings import adaquant_settings
from onnxq.config import AdaQuant, Config, QuantConfig, RoundToNearest, as_config
from onnxq.config.choices import MP_RECONSTRUCT as RECONSTRUCT
from onnxq.config.choices import PLAN_BITS
from onnxq.core import graph as g
from onnxq.core.context import QuantContext
from onnxq.core.layers import WEIGHT_INPUTS, node_key, weighted_layers
from onnxq.data.loaders import CalibrationSet, ImageRecipe, load_calibration, model_inputs
from onnxq.errors import UserError
from onnxq.mixed.swap_eval import SwapEvaluator
from onnxq.pipeline.calibrated import CalibratedModel
from onnxq.targets.profiles import resolve_config

log = logging.getLogger(__name__)

MEASURES = ("mse", "cosine", "metric", "fisher")
#: Held-out samples set aside from the calibration data when none are given.
DEFAULT_HOLDOUT = 64


@dataclass(frozen=True)
class LayerInfo:
    """One quantized weighted layer.

    Attributes:
        name: the node name the bit plan uses (``node_key`` at spec-assignment time).
        op: ONNX op type.
        params: weights (elements of the weight tensor).
        macs: multiply-accumulates per sample (weights times output positions, from inferred shapes;
            unknown dims count 1).
        act_bits: bit width of the layer's quantized input (32: float input).
        fixed_bits: width it keeps (first/last layer under ``first_last_bits``), None for a candidate.
    """

    name: str
    op: str
    params: int
    macs: int
    act_bits: int
    fixed_bits: int | None = None


@dataclass(frozen=True)
class SensitivityTable:
    """Measured degradation per layer and width (see the module docstring).

    ``values[layer][bits][measure]``; fixed layers have only their fixed width. ``base`` holds the
    measures of the all-8-bit base model (fisher: 0). ``reconstruct``: how the weights at each width
    were made (``RECONSTRUCT``).
    """

    layers: tuple[LayerInfo, ...]
    widths: tuple[int, ...]
    values: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    base: dict[str, float] = field(default_factory=dict)
    holdout_samples: int = 0
    seconds: float = 0.0
    reconstruct: str = "rtn"

    @property
    def measures(self) -> tuple[str, ...]:
        return tuple(m for m in MEASURES if m in self.base)

    def layer(self, name: str) -> LayerInfo:
        for info in self.layers:
            if info.name == name:
                return info
        raise KeyError(name)

    def choices(self, info: LayerInfo) -> tuple[int, ...]:
        """The widths layer ``info`` may take (its fixed width, or every candidate width)."""
        return (info.fixed_bits,) if info.fixed_bits is not None else self.widths

    def cost(self, name: str, bits: int, measure: str = "mse") -> float:
        """``max(v(l, b) - v(l, 8), 0)``: the increase over the layer at 8 bits (0 for fixed layers)."""
        if measure not in self.base:
            raise UserError(f"the sensitivity table has no {measure!r} measure: it has {', '.join(self.measures)}")
        info = self.layer(name)
        if info.fixed_bits is not None:
            return 0.0
        row = self.values[name]
        return max(float(row[bits][measure]) - float(row[8][measure]), 0.0)

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for info in self.layers:
            row = {"name": info.name, "op": info.op, "params": info.params, "macs": info.macs,
                   "act_bits": info.act_bits, "fixed_bits": info.fixed_bits,
                   "values": {str(b): dict(v) for b, v in self.values.get(info.name, {}).items()}}
            rows.append(row)
        return {"widths": list(self.widths), "base": dict(self.base), "holdout_samples": self.holdout_samples,
                "seconds": round(self.seconds, 2), "reconstruct": self.reconstruct, "layers": rows}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensitivityTable:
        layers = tuple(LayerInfo(r["name"], r["op"], int(r["params"]), int(r["macs"]), int(r["act_bits"]),
                                 r.get("fixed_bits")) for r in data["layers"])
        values = {r["name"]: {int(b): {k: float(x) for k, x in v.items()} for b, v in r["values"].items()}
                  for r in data["layers"]}
        return cls(layers, tuple(int(b) for b in data["widths"]), values, dict(data["base"]),
                   int(data.get("holdout_samples", 0)), float(data.get("seconds", 0.0)),
                   str(data.get("reconstruct", "rtn")))

    def save(self, path: str | Path) -> Path:
        import json

        from onnxq.core.files import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> SensitivityTable:
        import json

        return cls.from_dict(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------------------- public entry point
def measure_sensitivity(model: str | Path | onnx.ModelProto, calib: Any, config: Config | QuantConfig | None = None, *,
                        widths: Sequence[int] = (8, 4, 2), holdout: Any = None,
                        metric: Callable[[np.ndarray], float] | None = None, fisher: bool = False,
                        recipe: ImageRecipe | None = None, batch_size: int = 1, reconstruct: str = "rtn",
                        adaquant: AdaQuant | None = None) -> SensitivityTable:
    """Measure the per-layer sensitivity table (see the module docstring).

    Args:
        model: path or ModelProto of the float model.
        calib: calibration data (anything :func:`onnxq.data.loaders.load_calibration` takes).
        config: the run's config; its weight width and bit plan are ignored (the base is 8-bit).
        widths: candidate widths (8 is always added).
        holdout: held-out feeds for the measurement; None sets aside the last calibration batches
            (about a fifth, at most :data:`DEFAULT_HOLDOUT` samples); an int sets aside that many samples.
        metric: optional ``score(first_output_of_all_holdout_samples) -> float`` (higher is better,
            e.g. top-1 against labels the caller knows for the held-out samples, in order).
        fisher: also compute the Fisher measure (needs torch; :mod:`onnxq.mixed.fisher`).
        recipe / batch_size: for image folders and file sources.
        reconstruct: "rtn" or "adaquant" (parallel AdaQuant per width below 8; see the module docstring).
        adaquant: the :class:`~onnxq.config.AdaQuant` of ``reconstruct="adaquant"`` (its mode must be
            parallel); None: the run's AdaQuant, else AdaQuant on the run's schedule, in parallel mode.
    """
    t0 = time.perf_counter()
    config = as_config(config)
    if reconstruct not in RECONSTRUCT:
        raise UserError(f"sensitivity reconstruct={reconstruct!r} is unknown: use {' or '.join(RECONSTRUCT)}")
    optimiser = _adaquant_config(config, adaquant) if reconstruct == "adaquant" else None
    original = g.load_model(model) if isinstance(model, (str, Path)) else model
    widths = _widths(widths)
    base_cfg = _base_config(config, widths)
    inputs = model_inputs(original)
    calib_set = load_calibration(calib, inputs, recipe=recipe, batch_size=batch_size)
    fit_set, eval_set = _split(calib_set, holdout, inputs, recipe, batch_size)

    cal = CalibratedModel.build(original, base_cfg, fit_set)
    reference = cal.reference
    layers = _layers(cal.graph, cal.ctx)
    candidates = [info for info in layers if info.fixed_bits is None]
    if not candidates:
        raise UserError("the model has no quantized weighted layer to choose a width for (first/last layers are "
                        "fixed by first_last_bits): nothing to plan")
    log.info("sensitivity: %d candidate layers x widths %s on %d held-out samples", len(candidates), widths,
             eval_set.num_samples)
    weights = {b: _width_weights(cal, layers, b, optimiser if b < 8 else None) for b in widths}
    feed_model, slots = _feed_model(cal, candidates)
    base_inputs = {slots[i.name][0]: weights[8][i.name][0] for i in candidates}
    base_inputs.update({slots[i.name][1]: weights[8][i.name][1] for i in candidates if slots[i.name][1]})
    evaluator = SwapEvaluator(reference, feed_model, slots, base_inputs, list(eval_set), metric)
    swaps = {i.name: {b: weights[b][i.name] for b in widths if b != 8} for i in candidates}
    base, measured = evaluator.run(swaps)
    values: dict[str, dict[int, dict[str, float]]] = {}
    for info in layers:
        if info.fixed_bits is not None:
            values[info.name] = {info.fixed_bits: {m: 0.0 for m in base}}
        else:
            values[info.name] = {8: dict(base), **measured[info.name]}
    jobs = sum(len(v) for v in swaps.values())
    if fisher:
        from onnxq.mixed.fisher import fisher_sensitivity

        fisher_values = fisher_sensitivity(reference, candidates, weights, eval_set, seed=base_cfg.seed)
        for name, per_bits in fisher_values.items():
            for b, v in per_bits.items():
                values[name][b]["fisher"] = v
        base["fisher"] = 0.0
        for info in layers:
            if info.fixed_bits is not None:
                values[info.name][info.fixed_bits]["fisher"] = 0.0
    seconds = time.perf_counter() - t0
    log.info("sensitivity: %d evaluations in %.1f s", jobs + 1, seconds)
    return SensitivityTable(tuple(layers), widths, values, base, eval_set.num_samples, seconds, reconstruct)


# ---------------------------------------------------------------------------- configuration and data
def _widths(widths: Sequence[int]) -> tuple[int, ...]:
    out = sorted({int(b) for b in widths} | {8}, reverse=True)
    bad = [b for b in out if b not in PLAN_BITS]
    if bad:
        raise UserError(f"candidate width(s) {bad} not supported: use {', '.join(map(str, PLAN_BITS))}")
    return tuple(out)


def _base_config(config: Config, widths: tuple[int, ...]) -> Config:
    """8-bit weights, no plan, no tuning, round to nearest, an opset every candidate width fits."""
    probe = resolve_config(config.replace(weights=replace(config.weights, bits=8,
                                                          bit_plan=tuple((f"#{b}", b) for b in widths)),
                                          validation=replace(config.validation, enabled=False)))
    return probe.replace(weights=replace(probe.weights, bit_plan=()), opset=probe.output_opset,
                         tuning=replace(probe.tuning, bias_tuning=False, stats_tuning=False),
                         rounding=RoundToNearest())


def _adaquant_config(config: Config, given: AdaQuant | None) -> Any:
    """The engine record of the table's parallel AdaQuant: ``given``, else the run's AdaQuant in parallel
    mode, else AdaQuant on the run's schedule (paper, or fast) in parallel mode."""
    if given is None:
        rounding = config.rounding
        if isinstance(rounding, AdaQuant):
            given = replace(rounding, mode="parallel")
        else:
            schedule = "paper" if getattr(rounding, "schedule", "fast") == "paper" else "fast"
            given = AdaQuant.from_schedule(schedule, mode="parallel")
        mp = config.mixed_precision
        sizes = {k: v for k, v in (("iters", mp.table_iters), ("samples", mp.table_samples)) if v is not None}
        given = replace(given, **sizes)
    if given.mode != "parallel":
        raise UserError("a reconstruction-aware sensitivity table needs parallel AdaQuant (layers "
                        f"independent, float-model inputs), got mode {given.mode!r}")
    return adaquant_settings(given, seed=config.seed, device=config.engine.device)


def _split(calib_set: CalibrationSet, holdout: Any, inputs, recipe, batch_size
           ) -> tuple[CalibrationSet, CalibrationSet]:
    if holdout is not None and not isinstance(holdout, int):
        return calib_set, load_calibration(holdout, inputs, recipe=recipe, batch_size=batch_size)
    if len(calib_set) < 2:
        log.warning("a single calibration batch: the sensitivity is measured on the calibration samples")
        return calib_set, calib_set
    want = holdout if isinstance(holdout, int) else min(DEFAULT_HOLDOUT, max(1, calib_set.num_samples // 5))
    if want < 1:
        raise UserError(f"holdout={holdout} must be at least 1 sample")
    n, total = 0, 0
    for size in reversed(calib_set.batch_sizes[1:]):  # keep at least one calibration batch
        if total >= want:
            break
        n, total = n + 1, total + size
    return calib_set.split(n)


# ---------------------------------------------------------------------------- layers and weights
def _layers(graph: gs.Graph, ctx: QuantContext) -> list[LayerInfo]:
    cfg = ctx.config
    weighted = weighted_layers(graph, cfg.exclude)  # AssignSpecsPass's list: its first and last are fixed
    ends = {id(weighted[0]), id(weighted[-1])} if weighted else set()
    out = []
    for node in weighted:
        if node.op not in ctx.target.weight_ops or node.inputs[WEIGHT_INPUTS[node.op][0]].name not in ctx.specs:
            continue
        w = np.asarray(node.inputs[WEIGHT_INPUTS[node.op][0]].values)
        spec_in = ctx.specs.get(node.inputs[0].name)
        first_last = cfg.weights.first_last_bits
        fixed = first_last if (id(node) in ends and first_last is not None) else None
        out.append(LayerInfo(node_key(node), node.op, int(w.size), int(w.size) * _positions(node),
                             spec_in.bits if spec_in is not None else 32, fixed))
    return out


def _positions(node: gs.Node) -> int:
    """Output positions one weight is applied at: spatial size (Conv), tokens (MatMul), 1 (Gemm)."""
    ref = node.inputs[0] if node.op == "ConvTranspose" else node.outputs[0]
    shape = list(ref.shape or [])
    if node.op in ("Conv", "ConvTranspose"):
        dims = shape[2:]
    elif node.op == "MatMul":
        dims = shape[1:-1]
    else:
        dims = []
    return int(np.prod([d if isinstance(d, int) and d > 0 else 1 for d in dims], dtype=np.int64))


def dq_value(t: gs.Tensor) -> np.ndarray | None:
    """The float value of a constant input: a Constant, or a DequantizeLinear of constants
    (``(q - z) * s`` in float32 along ``axis``, as ONNX computes it); None otherwise."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values, dtype=np.float32)
    node = t.inputs[0] if t.inputs else None
    if node is None or node.op != "DequantizeLinear":
        return None
    ins = [i for i in node.inputs if i.name]
    if not all(isinstance(i, gs.Constant) for i in ins):
        return None
    q = np.asarray(ins[0].values).astype(np.float32)
    s = np.asarray(ins[1].values, dtype=np.float32)
    z = np.asarray(ins[2].values).astype(np.float32) if len(ins) > 2 else np.zeros_like(s)
    if s.ndim == 1 and q.ndim > 0:
        shape = [1] * q.ndim
        axis = int(node.attrs.get("axis", 1))
        shape[axis if axis >= 0 else axis + q.ndim] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return ((q - z) * s).astype(np.float32)


def _width_weights(cal: CalibratedModel, layers: list[LayerInfo], bits: int, adaquant: Any = None
                   ) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Dequantized (weight, bias) of every candidate layer with all candidates at ``bits``; with an
    ``adaquant`` config, after parallel AdaQuant on that model."""
    plan = tuple((i.name, bits) for i in layers if i.fixed_bits is None)
    graph, ctx = cal.quantize_graph(plan)
    if adaquant is not None:
        log.info("sensitivity: parallel AdaQuant of every layer at %d bits", bits)
        cal.adaquant(graph, ctx, adaquant)
    wanted = {name for name, _ in plan}
    out = {}
    for node in graph.nodes:
        if node.op in WEIGHT_INPUTS and node_key(node) in wanted:
            w_idx, b_idx = WEIGHT_INPUTS[node.op]
            w = dq_value(node.inputs[w_idx])
            b = (dq_value(node.inputs[b_idx]) if b_idx is not None and len(node.inputs) > b_idx
                 and node.inputs[b_idx].name else None)
            if w is None:
                raise RuntimeError(f"internal error: the weight of {node_key(node)} is not a constant DQ")
            out[node_key(node)] = (w, b)
    missing = wanted - set(out)
    if missing:
        raise RuntimeError(f"internal error: layers {sorted(missing)[:3]} lost their names during quantization")
    return out


def _feed_model(cal: CalibratedModel, candidates: list[LayerInfo]
                ) -> tuple[onnx.ModelProto, dict[str, tuple[str, str | None]]]:
    """The 8-bit model with each candidate's weight (and bias) a float graph input; returns the
    model and layer -> (weight input name, bias input name or None)."""
    plan = tuple((i.name, 8) for i in candidates)
    graph, _ = cal.quantize_graph(plan)
    names = {i.name: k for k, i in enumerate(candidates)}
    slots: dict[str, tuple[str, str | None]] = {}
    for node in graph.nodes:
        key = node_key(node)
        if node.op not in WEIGHT_INPUTS or key not in names:
            continue
        w_idx, b_idx = WEIGHT_INPUTS[node.op]
        k = names[key]
        w_name = _as_input(graph, node, w_idx, f"onnxq_sensitivity_w{k}")
        b_name = None
        if b_idx is not None and len(node.inputs) > b_idx and node.inputs[b_idx].name:
            b_name = _as_input(graph, node, b_idx, f"onnxq_sensitivity_b{k}")
        slots[key] = (w_name, b_name)
    graph.cleanup().toposort()
    return g.to_model(graph, template=cal.reference), slots


def _as_input(graph: gs.Graph, node: gs.Node, idx: int, name: str) -> str:
    value = dq_value(node.inputs[idx])
    var = gs.Variable(name, dtype=np.float32, shape=list(value.shape))
    node.inputs[idx] = var
    graph.inputs.append(var)
    return name
