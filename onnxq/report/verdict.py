"""When a validated model is ``ok``: the criteria and the one-line reasons (with the fix) when it is not.

The validator measures three things (:mod:`onnxq.report.validate`):

* **kernel fidelity**: the outputs at ORT_ENABLE_ALL (onnxruntime's fused integer kernels on the CPU
  the check runs on) against ORT_DISABLE_ALL (the QDQ simulation: dequantize, float op, quantize), as
  the *gap* ``||y_ALL - y_DISABLE||^2 / ||y_DISABLE - y_float||^2`` (all samples stacked): how much
  error the kernels add, as a fraction of the error quantization itself causes. Exact kernels add only
  requantization rounding (0.1 to 0.4 on EfficientNet-Lite0); over ``levels_max_gap`` the file does
  not compute on this CPU what its QDQ graph says;
* **portability**: the weight pairs that onnxruntime's saturating kernels (x86 without VNNI) would get
  wrong (:mod:`onnxq.report.kernel_check`), read from the file, so it is found on any CPU;
* **fidelity**: the quantized model against the float one: top-1 agreement for an output with a class
  axis (``min_top1_agreement``), cosine for the others (``min_cosine``) and for a class axis on which
  the float model's most common class already covers the floor's share of the samples (a constant
  prediction would pass there, so agreement says nothing). Agreement measured on ``n``
  samples fails only when its 95 % upper confidence bound is under the floor (Wilson score:
  ``(p + z^2/2n + z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``, ``z = 1.96``), so one flip in eight
  samples does not fail a good model while a model under the floor on many samples does.

``runtime`` says what the model is meant to run on. ``"ort-cpu"``: onnxruntime on CPU, the fused
result is what users get, so fidelity is measured on it and a kernel gap fails. ``"qdq"``: another
runtime (TensorRT, an NPU) executes the QDQ graph exactly; fidelity is measured on the QDQ simulation
and the onnxruntime CPU figures are shown beside it, not judged. ``portable``: the file must be
exact on every CPU (onnxq's ``kernels = "portable"``), so a saturating pair fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from onnxq.config.choices import RUNTIMES, check_choice
from onnxq.targets.ort_kernels import saturates
from onnxq.targets.profiles import get_target

if TYPE_CHECKING:
    from onnxq.config import Config
    from onnxq.report.metrics import OutputFidelity

@dataclass(frozen=True)
class Criteria:
    """The thresholds of ``ok`` and what the model is meant to run on (see the module docstring)."""

    min_top1_agreement: float = 0.9
    min_cosine: float = 0.95
    levels_max_gap: float = 1.0
    runtime: str = "ort-cpu"
    portable: bool = True

    def __post_init__(self) -> None:
        check_choice("validation runtime", self.runtime, RUNTIMES)

    def to_dict(self) -> dict:
        return {"min_top1_agreement": self.min_top1_agreement, "min_cosine": self.min_cosine,
                "levels_max_gap": self.levels_max_gap, "runtime": self.runtime, "portable": self.portable}


def agreement_upper_bound(p: float, n: int, z: float = 1.96) -> float:
    """The Wilson score upper bound of a proportion ``p`` measured on ``n`` samples (``p`` when ``n`` is 0)."""
    if n <= 0:
        return p
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z * z / n))


def criteria_for(config: Config) -> Criteria:
    """The criteria of a resolved configuration: its validation floors; onnxruntime CPU is the runtime of
    the ort-cpu target only; portable when its weights were fitted to the saturating kernels."""
    v = config.validation
    return Criteria(min_top1_agreement=v.min_top1_agreement, min_cosine=v.min_cosine,
                    levels_max_gap=v.levels_max_gap, runtime=get_target(config.target).runtime,
                    portable=saturates(config.kernels or "int32"))


def failures(criteria: Criteria, *, fidelity: tuple[OutputFidelity, ...], gaps: dict[str, float],
             saturating: dict[str, int], cpu: str) -> list[str]:
    """One line per failed criterion: what is wrong and how to fix it."""
    out: list[str] = []
    pairs = sum(saturating.values())
    if pairs and criteria.portable:
        out.append(f"{pairs} weight pairs in {len(saturating)} layers can saturate onnxruntime's int8 kernels on "
                   "x86 CPUs without VNNI (there ORT_ENABLE_ALL differs from the QDQ graph): quantize with "
                   "--kernels portable")
    if criteria.runtime == "ort-cpu":
        for name, gap in gaps.items():
            if gap > criteria.levels_max_gap:
                fix = ("quantize with --kernels portable" if pairs else
                       "report it with the model: onnxruntime's fused kernels should match its QDQ graph")
                out.append(f"output {name}: onnxruntime's fused kernels on this CPU ({cpu}) add {gap:.2f} times the "
                           f"quantization error to the QDQ simulation (tolerance {criteria.levels_max_gap}): {fix}")
    for fid in fidelity:
        # Top-1 agreement judges a classifier only where a constant prediction could not meet the floor
        # (the float model predicts varied classes on these samples); elsewhere the cosine does.
        floor = criteria.min_top1_agreement
        informative = fid.majority is None or fid.majority < floor or floor <= 0
        if fid.top1_agreement is not None and informative:
            upper = agreement_upper_bound(fid.top1_agreement, fid.rows)
            if upper < criteria.min_top1_agreement:
                out.append(f"output {fid.name}: top-1 agreement with the float model {100 * fid.top1_agreement:.2f}% "
                           f"on {fid.rows} samples (at most {100 * upper:.2f}% at 95 % confidence) is under the "
                           f"floor {100 * criteria.min_top1_agreement:.2f}%: use wider bits or a learned method "
                           "(--method gptq, brecq), or set validation.min_top1_agreement lower")
        elif fid.cosine < criteria.min_cosine:
            out.append(f"output {fid.name}: cosine with the float model {fid.cosine:.5f} is under the floor "
                       f"{criteria.min_cosine}: use wider bits or a learned method (--method gptq, brecq), or set "
                       "validation.min_cosine lower")
    return out
