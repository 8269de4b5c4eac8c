"""The sections of a run's configuration (everything but the rounding method, :mod:`onnxq.config.rounding`).

Each section is a frozen dataclass whose defaults are the values a run uses when nothing is said;
``None`` or ``"auto"`` marks a value the run resolves once from other settings, as the field's
documentation says (:meth:`onnxq.config.Config.resolved`), and the report records what it became.
Why the defaults are what they are: ``docs/defaults.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from onnxq.config.choices import (
    ACTIVATION_BITS,
    ACTIVATION_DTYPES,
    ADD_INPUT_MODES,
    BIAS_ABSORB_SOURCES,
    BIAS_CORRECTION_SOURCES,
    CALIB_METHODS,
    DROP_METRICS,
    FALLBACK_OPS,
    FIRST_LAST_BITS,
    INT2_GRIDS,
    MP_MEASURES,
    MP_RECONSTRUCT,
    PLAN_BITS,
    RELU6_MODES,
    TERNARY_ALIASES,
    TERNARY_METHODS,
    TWO_BIT_STORAGES,
    WEIGHT_BITS,
    WEIGHT_RANGE_METHODS,
    canonical_ternary_method,
    check_bool,
    check_choice,
    check_count,
    check_device,
    check_number,
)
from onnxq.errors import UserError


@dataclass(frozen=True)
class Weights:
    """The weight grids.

    Attributes:
        bits: 8, 4 (INT4 stored natively, opset 21) or 2 (``int2_grid``, stored as ``storage`` says).
        int2_grid: the 2-bit grid: "ternary" (codes {-1, 0, 1} times a per-channel scale from
            ``ternary_method``) or "uniform" (the 4-level INT2 grid [-2, 1] with per-channel
            zero-points, the W2 grid of BRECQ/QDrop/MRECG; needs ``symmetric = False``).
        ternary_method: rtn, twn, tquant, mquant-a or mquant-b ("mquant" is an alias of mquant-b).
        storage: container of 2-bit codes: "int2" (opset 25), "int4" (opset 21), "int8", or "auto"
            (the narrowest the target allows and onnxruntime runs).
        per_channel: one scale per output channel (on each op's output axis) or one per tensor.
        symmetric: zero-points 0. False: each channel's grid fitted to its [min, max] with an integer
            zero-point (BRECQ's and QDrop's quantizers); only targets whose kernels take weight
            zero-points allow it (ort-cpu). Ternary codes are always symmetric.
        range_method: how a channel's range is chosen: "minmax" or "mse" (the L2.4-optimal clip); None:
            the scale kind's choice (minmax for float scales, mse for power-of-two ones).
        first_last_bits: width of the first and last weighted layers when ``bits`` < 8 (None: ``bits``).
        bit_plan: per-layer widths ``((node name, bits), ...)`` (8, 4 or 2) that win over ``bits`` and
            ``first_last_bits``; written by mixed precision (``<output stem>.bitplan.json``).
    """

    bits: int = 8
    int2_grid: str = "ternary"
    ternary_method: str = "rtn"
    storage: str = "auto"
    per_channel: bool = True
    symmetric: bool = True
    range_method: str | None = None
    first_last_bits: int | None = 8
    bit_plan: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        check_choice("weights.bits", self.bits, WEIGHT_BITS)
        check_choice("weights.int2_grid", self.int2_grid, INT2_GRIDS)
        object.__setattr__(self, "ternary_method", canonical_ternary_method(self.ternary_method))
        check_choice("weights.ternary_method", self.ternary_method, (*TERNARY_METHODS, *TERNARY_ALIASES))
        check_choice("weights.storage", self.storage, TWO_BIT_STORAGES)
        check_bool("weights.per_channel", self.per_channel)
        check_bool("weights.symmetric", self.symmetric)
        check_choice("weights.range_method", self.range_method, (*WEIGHT_RANGE_METHODS, None))
        check_choice("weights.first_last_bits", self.first_last_bits, (*FIRST_LAST_BITS, None))
        if self.int2_grid == "uniform" and self.symmetric:
            raise UserError("the 4-level INT2 grid [-2, 1] has zero-points: set weights.symmetric = false "
                            "(--weights int2 does), or use weights.int2_grid = 'ternary'")
        object.__setattr__(self, "bit_plan", bit_plan_pairs(self.bit_plan))

    @property
    def uses_two_bits(self) -> bool:
        """Some layer has 2-bit weights (``bits`` or the bit plan)."""
        return self.bits == 2 or any(b == 2 for _, b in self.bit_plan)


def bit_plan_pairs(plan: Any) -> tuple[tuple[str, int], ...]:
    """A bit plan as ``((name, bits), ...)``; bad widths or repeated names are a UserError."""
    items = list(plan.items()) if isinstance(plan, dict) else list(plan or ())
    out: list[tuple[str, int]] = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise UserError(f"bit_plan entry {item!r} is not (node name, bits): give pairs or a mapping")
        name, bits = item
        if isinstance(bits, bool) or bits not in PLAN_BITS:
            raise UserError(f"bit_plan gives {name!r} {bits!r} bits: use one of {', '.join(map(str, PLAN_BITS))}")
        out.append((name, int(bits)))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f"bit_plan names {dup[0]!r} twice: give each layer one width")
    return tuple(out)


@dataclass(frozen=True)
class Activations:
    """The activation grids.

    Attributes:
        dtype: "uint8" (asymmetric) or "int8" (symmetric, zero-point 0); None: the target's choice.
        bits: 8 or 4 (4-bit grids stored as Q -> Clip -> DQ in 8-bit containers; the network input and
            the last layer's input stay at 8 bits when ``weights.first_last_bits`` is 8); None: the
            target's choice (8, or 16 for qnn-a16).
        dynamic: weight MatMuls quantize their input at run time (DynamicQuantizeLinear + MatMulInteger,
            onnxruntime's DynamicQuantizeMatMul) instead of with a calibrated range; onnxruntime CPU only.
        add_inputs: "all" float inputs of an Add get Q/DQ, or "residual": in ``Conv -> Add(x)`` the
            weighted op's output is not rounded before the Add (the Add output and ``x`` still are), as
            runtimes that add a residual in the convolution's epilogue run it and as BRECQ and QDrop
            place their quantizers; onnxruntime CPU then runs that Conv on dequantized weights in
            float. None: the target's choice.
    """

    dtype: str | None = None
    bits: int | None = None
    dynamic: bool = False
    add_inputs: str | None = None

    def __post_init__(self) -> None:
        check_choice("activations.dtype", self.dtype, (*ACTIVATION_DTYPES, None))
        check_choice("activations.bits", self.bits, (*ACTIVATION_BITS, 16, None))
        check_bool("activations.dynamic", self.dynamic)
        check_choice("activations.add_inputs", self.add_inputs, (*ADD_INPUT_MODES, None))


@dataclass(frozen=True)
class Calibration:
    """How activation ranges are found.

    Attributes:
        method: minmax, percentile, mse (the L_p-optimal clip) or entropy (KL); None: the scale kind's
            choice (minmax for float scales, mse for power-of-two ones).
        percentile: the kept percentile of ``method = "percentile"``, in (50, 100].
        samples: use at most this many calibration samples (None: all).
    """

    method: str | None = None
    percentile: float = 99.999
    samples: int | None = None

    def __post_init__(self) -> None:
        check_choice("calibration.method", self.method, (*CALIB_METHODS, None))
        check_number("calibration.percentile", self.percentile, minimum=50.0, strict=True, maximum=100.0)
        if self.samples is not None:
            check_count("calibration.samples", self.samples, minimum=1)


@dataclass(frozen=True)
class FloatPhase:
    """Function-preserving rewrites before any quantization decision (and the DFQ rewrites).

    Attributes:
        fold_batchnorm: fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm.
        equalize: cross-layer equalization (DFQ) of consecutive Conv/Gemm pairs.
        relu6: what equalization does with a ReLU6 (Clip 0..6) between a pair: "skip" the pair
            (function-preserving) or "replace" it by Relu (changes the float function, as DFQ did).
        bias_absorb: high-bias absorption across Relu: None, "bn" (from folded BatchNorm statistics)
            or "data" (from calibration data).
        smooth: SmoothQuant: move activation outliers into the weights of the MatMul/Gemm ops they
            feed (per-channel factors, function-preserving).
        smooth_alpha: the migration strength in [0, 1]; None: searched per tensor on calibration data.
    """

    fold_batchnorm: bool = True
    equalize: bool = False
    relu6: str = "skip"
    bias_absorb: str | None = None
    smooth: bool = False
    smooth_alpha: float | None = None

    def __post_init__(self) -> None:
        check_bool("float_phase.fold_batchnorm", self.fold_batchnorm)
        check_bool("float_phase.equalize", self.equalize)
        check_choice("float_phase.relu6", self.relu6, RELU6_MODES)
        check_choice("float_phase.bias_absorb", self.bias_absorb, (*BIAS_ABSORB_SOURCES, None))
        check_bool("float_phase.smooth", self.smooth)
        if self.smooth_alpha is not None:
            check_number("float_phase.smooth_alpha", self.smooth_alpha, minimum=0.0, maximum=1.0)


@dataclass(frozen=True)
class Tuning:
    """Corrections of the quantized model's output statistics.

    Attributes:
        bias_correction: before the weights are written, correct the output shift their rounding
            causes (DFQ): None, "data" (E[x] measured) or "bn" (analytic, from BatchNorm statistics).
        bias_tuning: after quantization, tune each layer's bias to the float output mean, layer by layer.
        stats_tuning: after quantization, restore each layer's per-channel output mean and std.
    """

    bias_correction: str | None = None
    bias_tuning: bool = False
    stats_tuning: bool = False

    def __post_init__(self) -> None:
        check_choice("tuning.bias_correction", self.bias_correction, (*BIAS_CORRECTION_SOURCES, None))
        check_bool("tuning.bias_tuning", self.bias_tuning)
        check_bool("tuning.stats_tuning", self.stats_tuning)


@dataclass(frozen=True)
class Engine:
    """Where and with what resources the torch engine runs (reconstruction, AdaQuant, Fisher).

    Attributes:
        device: "cpu", "cuda" or "cuda:<k>".
        checkpoint_dir: folder where finished blocks are saved so an interrupted run resumes (the CLI
            uses ``<output>.ckpt`` when this is unset and the method learns).
        keep_checkpoint: keep the checkpoint of a finished run; a re-run with the same reconstruction
            settings then reuses every block (to try tuning options on top for free).
        cache_budget_mb: RAM for cached block tensors before they spill to disk.
    """

    device: str = "cpu"
    checkpoint_dir: str | None = None
    keep_checkpoint: bool = False
    cache_budget_mb: int = 2048

    def __post_init__(self) -> None:
        check_device("engine.device", self.device)
        check_bool("engine.keep_checkpoint", self.keep_checkpoint)
        check_count("engine.cache_budget_mb", self.cache_budget_mb, minimum=1)
        if self.keep_checkpoint and not self.checkpoint_dir:
            raise UserError("engine.keep_checkpoint needs engine.checkpoint_dir: name the folder to keep it in")


@dataclass(frozen=True)
class MixedPrecision:
    """Per-layer weight widths chosen by an integer program under a budget (CalibTIP).

    Exactly one budget is set when ``enabled``; the chosen plan is written to
    ``<output stem>.bitplan.json`` and can be given back as ``weights.bit_plan``.

    Attributes:
        enabled: measure each layer's sensitivity, solve, then quantize with the plan.
        size_budget: weight size at most this times the all-8-bit weights (e.g. 0.55 ~ W4 with 8-bit
            first and last layers).
        bops_budget: bit operations (weight bits x activation bits x MACs) at most this times 8-bit's.
        max_degradation: the dual: the smallest model whose summed sensitivity increase is at most this.
        widths: candidate widths (8 is always one).
        measure: sensitivity measure: output MSE, 1 - cosine, or BRECQ's Fisher estimate.
        reconstruct: the table's weights at each width: "rtn" or parallel "adaquant" per layer.
        table_iters / table_samples: the iterations and cached samples of that parallel AdaQuant (None:
            its schedule's, which is the run's AdaQuant, else AdaQuant on the run's schedule).
        holdout: calibration samples held out to measure the sensitivity (None: a fifth, at most 64).
    """

    enabled: bool = False
    size_budget: float | None = None
    bops_budget: float | None = None
    max_degradation: float | None = None
    widths: tuple[int, ...] = (8, 4, 2)
    measure: str = "mse"
    reconstruct: str = "rtn"
    table_iters: int | None = None
    table_samples: int | None = None
    holdout: int | None = None

    def __post_init__(self) -> None:
        check_bool("mixed_precision.enabled", self.enabled)
        budgets = {k: v for k, v in self.budgets().items() if v is not None}
        for name, value in budgets.items():
            check_number(f"mixed_precision.{name}", value)
        if self.enabled and len(budgets) != 1:
            raise UserError("mixed precision needs exactly one of size_budget, bops_budget, max_degradation "
                            "(--size-budget R, --bops-budget R, --max-degradation D)")
        if budgets and not self.enabled:
            raise UserError(f"mixed_precision.{next(iter(budgets))} needs mixed precision on: add "
                            "--mixed-precision (mixed_precision.enabled = true)")
        object.__setattr__(self, "widths", tuple(self.widths))
        for w in self.widths:
            check_choice("mixed_precision.widths", w, PLAN_BITS)
        check_choice("mixed_precision.measure", self.measure, MP_MEASURES)
        check_choice("mixed_precision.reconstruct", self.reconstruct, MP_RECONSTRUCT)
        for name in ("holdout", "table_iters", "table_samples"):
            if getattr(self, name) is not None:
                check_count(f"mixed_precision.{name}", getattr(self, name), minimum=1)

    def budgets(self) -> dict[str, float | None]:
        return {"size_budget": self.size_budget, "bops_budget": self.bops_budget,
                "max_degradation": self.max_degradation}


@dataclass(frozen=True)
class AccuracyTarget:
    """Quantize everything, then keep the fewest ops float that bring the model within ``max_drop`` of the
    float one (:mod:`onnxq.fallback`); the kept ops are written to ``<output stem>.floatplan.json``, which
    ``--float-plan`` applies again.

    Attributes:
        max_drop: the largest drop allowed, in percentage points of ``metric`` (None: no target).
        metric: "agreement" (top-1 agreement with the float model, for classifier outputs), "cosine" (of
            the outputs with the float ones), "metric" (the Python API's ``metric`` callable on the first
            output of the search samples, higher is better, its own units; it may hold their labels, so the
            held-out samples are not judged with it) or "auto" (agreement for a classifier, else cosine).
        samples: calibration samples the search measures on (validation samples are never searched on).
        rounds: re-quantizations at most while the target is not met on those samples.
        ops: which ops may be kept float: "all", or "activations" (every Conv, Gemm and weight MatMul stays
            integer, for speed; only Add, Mul, Softmax, activation MatMuls, ... may run float).
    """

    max_drop: float | None = None
    metric: str = "auto"
    samples: int = 64
    rounds: int = 3
    ops: str = "all"

    def __post_init__(self) -> None:
        if self.max_drop is not None:
            check_number("accuracy.max_drop", self.max_drop)
        check_choice("accuracy.metric", self.metric, DROP_METRICS)
        check_count("accuracy.samples", self.samples, minimum=1)
        check_count("accuracy.rounds", self.rounds, minimum=1)
        check_choice("accuracy.ops", self.ops, FALLBACK_OPS)


@dataclass(frozen=True)
class Validation:
    """The check of the written model in onnxruntime against the float model.

    ``ok`` means: the checker passes, both onnxruntime optimisation levels run, the fused kernels agree
    with the QDQ simulation (``levels_max_gap``) and the model is close enough to the float one
    (``min_top1_agreement`` for outputs with a class axis, ``min_cosine`` for the others);
    :mod:`onnxq.report.verdict`.

    Attributes:
        enabled: run it.
        details: also measure, for the report page, each quantized tensor's error along depth and calibrated
            range on the first validation samples and a quick latency check (:mod:`onnxq.report.layers`,
            :mod:`onnxq.report.latency`; models under 2 GB).
        holdout_fraction / holdout_min / holdout_max: without separate validation data, this fraction
            of the calibration samples, at least ``holdout_min`` (at most a quarter of them) and at most
            ``holdout_max``, is held out of calibration to validate on.
        min_top1_agreement: the floor of top-1 agreement with the float model (outputs with a class axis).
        min_cosine: the floor of cosine similarity with the float model (other outputs).
        levels_max_gap: the most the outputs at ORT_ENABLE_ALL (the fused integer kernels of this CPU) may
            differ from those at ORT_DISABLE_ALL (the QDQ simulation), as a fraction of the simulation's
            own error: ``||y_ALL - y_DISABLE||^2 <= levels_max_gap * ||y_DISABLE - y_float||^2``. Exact
            kernels differ only by requantization rounding (0.1 to 0.4 on EfficientNet-Lite0).
    """

    enabled: bool = True
    details: bool = True
    holdout_fraction: float = 0.125
    holdout_min: int = 32
    holdout_max: int = 64
    min_top1_agreement: float = 0.9
    min_cosine: float = 0.95
    levels_max_gap: float = 1.0

    def __post_init__(self) -> None:
        check_bool("validation.enabled", self.enabled)
        check_bool("validation.details", self.details)
        check_number("validation.holdout_fraction", self.holdout_fraction, maximum=0.5)
        check_count("validation.holdout_min", self.holdout_min, minimum=1)
        check_count("validation.holdout_max", self.holdout_max, minimum=1)
        for name in ("min_top1_agreement", "min_cosine"):
            check_number(f"validation.{name}", getattr(self, name), minimum=-1.0, maximum=1.0)
        check_number("validation.levels_max_gap", self.levels_max_gap)

    def holdout(self, samples: int) -> int:
        """Samples to hold out of ``samples`` calibration samples."""
        return min(self.holdout_max, max(min(self.holdout_min, samples // 4), int(samples * self.holdout_fraction)))
