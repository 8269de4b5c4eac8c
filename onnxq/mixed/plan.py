"""Mixed-precision bit allocation by integer programming (CalibTIP's IP) and its one-run flow.

Given a sensitivity table (:mod:`onnxq.mixed.sensitivity`) with costs ``c(l, b) >= 0`` (increase of the
measured degradation when layer ``l`` alone goes from 8 to ``b`` bits), pick one width per layer:

    variables  x[l, b] in {0, 1}                    (candidate layers l, widths b)
    one-hot    sum_b x[l, b] = 1                    for every l
    primal     min sum c(l, b) x[l, b]   s.t.  sum size(l, b) x[l, b] <= budget - fixed
    dual       min sum size(l, b) x[l, b]  s.t.  sum c(l, b) x[l, b] <= D

with ``size(l, b) = params_l * b`` (weight bits; biases and scales do not count) for a model-size
budget, or ``bops(l, b) = b * a_l * MACs_l`` (``a_l`` the layer's input activation bits, MACs per
sample from inferred shapes) for a BOPs budget. Budgets are a ratio ``R`` of the model with every
quantized weight at 8 bits (``8 * sum params`` resp. ``8 * sum a_l MACs_l``) or absolute numbers;
layers fixed by ``first_last_bits`` count with their fixed width and are not variables. Ties are
broken towards wider layers (primal) and lower cost (dual) by a negligible secondary term. Solved
with :func:`scipy.optimize.milp` (HiGHS). The predicted degradation of a plan is
``base + sum c(l, b)`` (the all-8-bit measure plus the costs: the IP's additivity assumption).

The :class:`BitPlan` saved as JSON is exactly the ``--bit-plan`` format: ``{"layers": {name: bits},
...}`` plus what it was planned for (``widths``, ``measure``, ``predicted``, ``budget``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.config import Config, QuantConfig, as_config
from onnxq.core.files import atomic_write_text
from onnxq.errors import UserError
from onnxq.mixed.sensitivity import SensitivityTable, measure_sensitivity

log = logging.getLogger(__name__)

BUDGET_KINDS = ("size", "bops", "degradation")


@dataclass(frozen=True)
class Budget:
    """What the integer program is bound by.

    Attributes:
        kind: "size" (weight bits), "bops" (bit operations) or "degradation" (the dual: bound on
            the summed cost, the smallest model under it is chosen).
        value: a ratio of the all-8-bit model (size, bops) unless ``absolute``; the bound D for
            "degradation" (in the measure's units).
        absolute: ``value`` is in bits (size) or BOPs (bops) instead of a ratio.
    """

    kind: str
    value: float
    absolute: bool = False

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise UserError(f"budget kind {self.kind!r} is not supported: choose one of {', '.join(BUDGET_KINDS)}")
        if not np.isfinite(self.value) or self.value < 0 or (self.kind != "degradation" and self.value <= 0):
            raise UserError(f"{self.kind} budget {self.value} must be a positive number")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "absolute": self.absolute}


@dataclass(frozen=True)
class BitPlan:
    """One width per layer and what the table predicts for it."""

    layers: tuple[tuple[str, int], ...]
    widths: tuple[int, ...]
    measure: str
    size_bits: int
    size_ratio: float
    bops: int
    bops_ratio: float
    degradation: float
    degradation_increase: float
    budget: Budget

    def to_dict(self) -> dict[str, Any]:
        counts = {str(b): sum(1 for _, w in self.layers if w == b) for b in sorted({w for _, w in self.layers})}
        return {"layers": dict(self.layers), "widths": list(self.widths), "measure": self.measure,
                "predicted": {"size_bits": self.size_bits, "size_bytes": self.size_bits / 8,
                              "size_ratio": self.size_ratio, "bops": self.bops, "bops_ratio": self.bops_ratio,
                              "degradation": self.degradation, "degradation_increase": self.degradation_increase,
                              "layers_per_width": counts},
                "budget": self.budget.to_dict()}

    def save(self, path: str | Path) -> Path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(out, json.dumps(self.to_dict(), indent=1) + "\n")


# ---------------------------------------------------------------------------- the integer program
def _totals(table: SensitivityTable) -> tuple[float, float]:
    size8 = sum(8 * info.params for info in table.layers)
    bops8 = sum(8 * info.act_bits * info.macs for info in table.layers)
    return float(size8), float(bops8)


def evaluate_plan(table: SensitivityTable, bits: dict[str, int], measure: str = "mse",
                  budget: Budget | None = None) -> BitPlan:
    """The :class:`BitPlan` of given widths (every layer of the table; fixed ones at their width)."""
    size8, bops8 = _totals(table)
    size = sops = 0
    increase = 0.0
    out = []
    for info in table.layers:
        b = info.fixed_bits if info.fixed_bits is not None else bits[info.name]
        if b not in table.choices(info):
            raise UserError(f"layer {info.name!r} cannot take {b} bits here: the table has {table.choices(info)}")
        size += info.params * b
        sops += b * info.act_bits * info.macs
        increase += table.cost(info.name, b, measure)
        out.append((info.name, int(b)))
    base = float(table.base.get(measure, 0.0))
    return BitPlan(tuple(out), table.widths, measure, int(size), size / size8, int(sops), sops / max(bops8, 1.0),
                   base + increase, increase, budget or Budget("size", size / size8))


def uniform_plan(table: SensitivityTable, bits: int, measure: str = "mse") -> BitPlan:
    """Every candidate layer at ``bits`` (e.g. the size of uniform W4A8 with 8-bit first/last layers)."""
    return evaluate_plan(table, {i.name: bits for i in table.layers if i.fixed_bits is None}, measure)


def solve(table: SensitivityTable, budget: Budget, measure: str = "mse", *, time_limit: float = 60.0) -> BitPlan:
    """Solve the integer program (see the module docstring) and return the plan.

    Raises:
        UserError: the budget is infeasible (below the smallest plan), or the measure is missing.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    table.cost(table.layers[0].name, table.choices(table.layers[0])[0], measure)  # measure exists
    cands = [i for i in table.layers if i.fixed_bits is None]
    widths = list(table.widths)
    size8, bops8 = _totals(table)
    n = len(cands) * len(widths)
    cost = np.array([table.cost(i.name, b, measure) for i in cands for b in widths])
    # integer coefficients (bits, BOPs): an integer plan is then exactly within an integer limit
    size = np.array([i.params * b for i in cands for b in widths], dtype=np.float64)
    bops = np.array([b * i.act_bits * i.macs for i in cands for b in widths], dtype=np.float64)
    fixed = [i for i in table.layers if i.fixed_bits is not None]
    fixed_size = sum(i.params * i.fixed_bits for i in fixed)
    fixed_bops = sum(i.fixed_bits * i.act_bits * i.macs for i in fixed)
    onehot = np.zeros((len(cands), n))
    for k in range(len(cands)):
        onehot[k, k * len(widths):(k + 1) * len(widths)] = 1.0
    constraints = [LinearConstraint(onehot, 1.0, 1.0)]
    scale = max(float(cost.max(initial=0.0)), 1e-12)
    narrow = np.array([(8 - b) / 8 for _ in cands for b in widths])
    limit = None
    if budget.kind == "degradation":
        constraints.append(LinearConstraint(cost[None, :], -np.inf, budget.value * (1 + 1e-9) + 1e-15))
        objective = size / size8 + 1e-7 * cost / scale
    else:
        row, fixed_part, total = (size, fixed_size, size8) if budget.kind == "size" else (bops, fixed_bops, bops8)
        limit = np.floor((budget.value if budget.absolute else budget.value * total) + 1e-6) - fixed_part
        smallest = float(sum(row[k * len(widths):(k + 1) * len(widths)].min() for k in range(len(cands))))
        if smallest > limit:
            least = (smallest + fixed_part) / max(total, 1.0)
            kind = "" if budget.absolute else " (ratio)"
            raise UserError(f"{budget.kind} budget {budget.value:g}{kind} is below the "
                            f"smallest plan (every layer at {min(widths)} bits: ratio {least:.4f} of the 8-bit "
                            f"model): raise the budget or add narrower widths")
        constraints.append(LinearConstraint(row[None, :], -np.inf, limit))
        objective = cost + 1e-7 * scale * narrow
    res = milp(objective, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1),
               options={"time_limit": time_limit})
    if res.x is None:
        raise UserError(f"the integer program found no plan ({res.message}): relax the {budget.kind} budget")
    x = np.rint(res.x).reshape(len(cands), len(widths))
    bits = {info.name: widths[int(np.argmax(x[k]))] for k, info in enumerate(cands)}
    plan = evaluate_plan(table, bits, measure, budget)
    used = {"size": plan.size_bits - fixed_size, "bops": plan.bops - fixed_bops}.get(budget.kind)
    if limit is not None and used > limit:
        raise RuntimeError(f"internal error: the integer program's plan exceeds the {budget.kind} limit")
    log.info("mixed precision (%s, %s budget %g): size ratio %.4f, bops ratio %.4f, predicted %s %.4g (+%.4g)",
             measure, budget.kind, budget.value, plan.size_ratio, plan.bops_ratio, measure, plan.degradation,
             plan.degradation_increase)
    return plan


# ---------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class MixedPrecisionResult:
    """The final quantization of the plan, the plan and the table it came from."""

    result: Any  # onnxq.api.QuantResult
    plan: BitPlan
    table: SensitivityTable


def report_section(table: SensitivityTable, plan: BitPlan) -> dict[str, Any]:
    """The report's "mixed_precision" section: the plan and a row per layer with its sensitivities."""
    chosen = dict(plan.layers)
    rows = []
    for info in table.layers:
        rows.append({"layer": info.name, "op": info.op, "params": info.params, "macs": info.macs,
                     "act_bits": info.act_bits, "bits": chosen[info.name], "fixed": info.fixed_bits is not None,
                     "sensitivity": {str(b): table.values[info.name][b].get(plan.measure)
                                     for b in table.choices(info)}})
    return {"plan": plan.to_dict(), "base": dict(table.base), "holdout_samples": table.holdout_samples,
            "sensitivity_seconds": round(table.seconds, 2), "table_weights": table.reconstruct,
            "layers": rows}


def config_budget(config: Config) -> Budget:
    """The budget of ``config.mixed_precision`` (the one of size, BOPs or degradation that is set)."""
    kinds = {"size_budget": "size", "bops_budget": "bops", "max_degradation": "degradation"}
    given = [(kinds[k], v) for k, v in config.mixed_precision.budgets().items() if v is not None]
    if len(given) != 1:
        raise UserError("mixed precision needs exactly one of --size-budget R, --bops-budget R, --max-degradation D")
    return Budget(*given[0])


def quantize_mixed(model: Any, calib: Any, config: Config | QuantConfig | None = None, *,
                   budget: Budget | None = None, table: SensitivityTable | None = None,
                   metric: Callable[[np.ndarray], float] | None = None, validation: Any = None,
                   recipe: Any = None, batch_size: int = 1) -> MixedPrecisionResult:
    """Sensitivity table (unless given), integer program, then the final quantization with the plan.

    ``config.mixed_precision`` gives the candidate widths, the measure, the held-out samples, the
    table's weights ("rtn" or "adaquant", :mod:`onnxq.mixed.sensitivity`) and the budget (``budget``
    overrides it). The final run quantizes with ``config.weights.bit_plan`` set to the plan (so the
    configured method, bias correction and tuning apply); its report gets a "mixed_precision"
    section (:func:`report_section`).
    """
    from onnxq.pipeline.run import run_quantize

    config = as_config(config)
    mp = config.mixed_precision
    if config.weights.bit_plan:
        raise UserError("mixed precision chooses the bit plan itself: drop the given bit plan (or use it alone)")
    budget = budget if budget is not None else config_budget(config)
    if table is None:
        table = measure_sensitivity(model, calib, config, widths=mp.widths, holdout=mp.holdout, metric=metric,
                                    fisher=mp.measure == "fisher", recipe=recipe, batch_size=batch_size,
                                    reconstruct=mp.reconstruct)
    plan = solve(table, budget, mp.measure)
    final = config.replace(weights=replace(config.weights, bit_plan=plan.layers))
    result = run_quantize(model, calib, final, validation=validation, recipe=recipe, batch_size=batch_size)
    result.report["mixed_precision"] = report_section(table, plan)
    result.bit_plan = plan
    return MixedPrecisionResult(result, plan, table)
