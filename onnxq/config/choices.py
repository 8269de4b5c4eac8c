"""The allowed values of every setting that has a fixed set of them, and the checks that enforce them.

This is the one home of these lists: the configuration dataclasses validate against them, the CLI
shows them in its help, and the modules that implement a choice (the ternary operators, the
observers, the targets) are tested to implement exactly these names.
"""

from __future__ import annotations

import math

from onnxq.errors import UserError

#: A value that the run resolves once from other settings (documented per field); see
#: :meth:`onnxq.config.Config.resolved`.
AUTO = "auto"

WEIGHT_BITS = (8, 4, 2)
#: 2-bit weight grids: ternary {-1, 0, 1} x scale, or the 4-level INT2 grid [-2, 1] with zero-points.
INT2_GRIDS = ("ternary", "uniform")
TERNARY_METHODS = ("rtn", "twn", "tquant", "mquant-a", "mquant-b")
#: "mquant" is the MQuant variant with the lower weight error (docs/defaults.md).
TERNARY_ALIASES = {"mquant": "mquant-b"}
#: Containers of 2-bit codes ("auto": the narrowest the target allows and onnxruntime runs).
TWO_BIT_STORAGES = ("auto", "int2", "int4", "int8")
FIRST_LAST_BITS = (8, 4)
#: Per-layer widths of a bit plan.
PLAN_BITS = (8, 4, 2)
WEIGHT_RANGE_METHODS = ("minmax", "mse")
#: The range methods (weights, activations) when the user sets none, by scale kind: a power-of-two
#: scale rounded up from the min/max range is up to twice too coarse, so pow2 grids choose between
#: the powers of two around it by the L_p error (docs/defaults.md).
RANGE_METHODS_BY_SCALE = {"float": ("minmax", "minmax"), "pow2": ("mse", "mse")}
ACTIVATION_DTYPES = ("uint8", "int8")
ACTIVATION_BITS = (8, 4)
#: Which float inputs of an Add get Q/DQ: "all", or "residual": the input coming straight from a
#: weighted op (its only consumer) stays float, so the runtime adds it in that op's epilogue.
ADD_INPUT_MODES = ("all", "residual")
SCALE_KINDS = ("float", "pow2")
CALIB_METHODS = ("minmax", "percentile", "mse", "entropy")
RELU6_MODES = ("skip", "replace")
BIAS_ABSORB_SOURCES = ("bn", "data")
BIAS_CORRECTION_SOURCES = ("data", "bn")
#: What runs a validated model: onnxruntime on CPU (its fused kernels are judged) or another runtime that
#: executes the QDQ graph exactly (the simulation is judged), :mod:`onnxq.report.verdict`.
RUNTIMES = ("ort-cpu", "qdq")
ROUNDING_METHODS = ("rtn", "gptq", "adaround", "brecq", "qdrop", "adaquant")
#: The rounding method of a configuration that names none (docs/defaults.md).
DEFAULT_ROUNDING = "gptq"
#: The methods that round without training (no checkpoints, no schedule).
UNTRAINED_ROUNDING = ("rtn", "gptq")
SCHEDULES = ("fast", "long", "paper")
WEIGHT_PHASE_INPUTS = ("quantized", "weights_only")
BRECQ_ORDERS = ("interleaved", "two_pass")
ADAQUANT_MODES = ("parallel", "sequential")
MRECG_CAPACITIES = ("data", "proxy")
MRECG_ITERS = ("per_unit", "per_block")
MP_MEASURES = ("mse", "cosine", "fisher")
#: What the accuracy target (``accuracy.max_drop``) measures: :mod:`onnxq.fallback.score`.
DROP_METRICS = ("auto", "agreement", "cosine", "metric")
#: Which ops the accuracy target may keep float: any quantized op, or only ops without a weight.
FALLBACK_OPS = ("all", "activations")
#: How a mixed-precision sensitivity table's weights at each width are made (onnxq.mixed.sensitivity).
MP_RECONSTRUCT = ("rtn", "adaquant")
DEVICES = ("cpu", "cuda")
#: The CPUs whose onnxruntime integer kernels 8-bit weights must be exact on (onnxq.targets.ort_kernels):
#: every one ("portable"), this machine's ("auto"), a family, or "int32" (a runtime that accumulates in
#: int32, as TensorRT, OpenVINO and NPUs do: no fitting).
KERNELS = ("portable", "auto", "vnni", "avx2", "avx512", "arm64", "int32")


def canonical_ternary_method(method: str) -> str:
    """``method`` with an alias (:data:`TERNARY_ALIASES`) replaced by the method it names."""
    return TERNARY_ALIASES.get(method, method)


def check_choice(name: str, value: object, allowed: tuple) -> None:
    """A one-line UserError unless ``value`` is one of ``allowed``."""
    if isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed):
        ok = False  # True == 1: a bool is never a bit width
    else:
        ok = value in allowed
    if not ok:
        shown = ", ".join("none" if a is None else str(a) for a in allowed)
        raise UserError(f"{name}={value!r} is not supported: choose one of {shown}")


def is_count(value: object) -> bool:
    """An integer >= 0 (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_finite_number(value: object) -> bool:
    """An int or float, neither nan nor infinite (a bool is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_count(name: str, value: object, *, minimum: int = 0) -> None:
    """A one-line UserError unless ``value`` is an integer >= ``minimum``."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise UserError(f"{name}={value!r} must be an integer >= {minimum}")


def check_number(name: str, value: object, *, minimum: float = 0.0, strict: bool = False,
                 maximum: float | None = None) -> None:
    """A one-line UserError unless ``value`` is a finite number in range (``strict``: > minimum)."""
    ok = False
    if isinstance(value, (int, float)) and is_finite_number(value):
        ok = value > minimum if strict else value >= minimum
        if ok and maximum is not None:
            ok = value <= maximum
    if not ok:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        if maximum is not None:
            bound += f" and <= {maximum}"
        raise UserError(f"{name}={value!r} must be a finite number {bound}")


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise UserError(f"{name}={value!r} must be true or false")


def check_device(name: str, value: object) -> None:
    """"cpu", "cuda" or "cuda:<k>"."""
    text = str(value)
    if not (text in DEVICES or (text.startswith("cuda:") and text[5:].isdigit())):
        raise UserError(f"{name}={value!r} is not a torch device: use 'cpu', 'cuda' or 'cuda:<k>'")
