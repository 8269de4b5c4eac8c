"""How weights are rounded: one type per method, each with its schedules.

* :class:`RoundToNearest` ("rtn"): no learning.
* :class:`GPTQ` ("gptq"): each layer's codes chosen against its calibration inputs, no training
  (Frantar et al. 2023).
* :class:`AdaRound` ("adaround"): learned rounding one weighted layer at a time (Nagel et al. 2020).
* :class:`BRECQ` ("brecq"): learned rounding one block at a time, then the activation step sizes
  (Li et al. 2021); optionally Fisher-weighted.
* :class:`QDrop` ("qdrop"): rounding and activation step sizes learned jointly while activation
  quantization is dropped at random (Wei et al. 2022).
* :class:`AdaQuant` ("adaquant"): layer-wise weights, bias and quantizer ranges (Hubara et al. 2021).

BRECQ and QDrop take an optional :class:`MRECGMerge` (Ma et al. 2023): neighbour blocks with the
largest capacity gaps are merged and reconstructed together.

A schedule is a set of values for every field: ``BRECQ.fast()`` (sized for a 2-core CPU, the
default), ``BRECQ.long()`` (fast's rates, 1,000 iterations, 3 augmented views of each image) and
``BRECQ.paper()`` (the papers' 20k iterations, batch 32, 1,024 samples); keyword arguments override
single fields (``BRECQ.long(iters=600)``). Values that depend on other settings are ``"auto"`` and
resolved once (:meth:`BRECQ.resolved`); the engine receives only resolved values. The reasoning
behind each schedule's values is in ``docs/defaults.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from onnxq.config.choices import (
    ADAQUANT_MODES,
    AUTO,
    BRECQ_ORDERS,
    DEFAULT_ROUNDING,
    MRECG_CAPACITIES,
    MRECG_ITERS,
    SCHEDULES,
    WEIGHT_PHASE_INPUTS,
    check_bool,
    check_choice,
    check_count,
    check_number,
)
from onnxq.errors import UserError


def _field_names(kind: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else set()


def _from_schedule(cls: Any, schedule: str, overrides: dict[str, Any]) -> Any:
    unknown = sorted(set(overrides) - _field_names(cls))
    if unknown:
        name = unknown[0]
        owners = [kind.method for kind in ROUNDING_TYPES.values() if name in _field_names(kind)]
        where = f" (a setting of {', '.join(owners)})" if owners else ""
        raise UserError(f"rounding method {cls.method} has no setting {name!r}{where}: drop it or choose "
                        f"a method that has it")
    return cls(**{**cls.schedule_values(schedule), **overrides})


@dataclass(frozen=True)
class RoundToNearest:
    """Round to nearest on the calibrated grid (no learning)."""

    method: ClassVar[str] = "rtn"

    def resolved(self, activation_bits: int) -> RoundToNearest:
        return self


@dataclass(frozen=True)
class GPTQ:
    """GPTQ: each weighted layer's codes rounded one reduction column at a time, the error of each
    spread over the columns not yet rounded so that the layer's output on the calibration inputs
    changes least (:mod:`onnxq.core.gptq`); seconds per model, no training.

    Attributes:
        damping: ``lambda / mean(diag H)``, added to the inputs' second-moment matrix ``H`` before it is
            inverted (larger: closer to round-to-nearest, steadier on few samples).
        moments_mb: the most memory the second-moment matrices may take together (``8 K^2`` bytes per
            distinct layer input of width ``K``); past it the layers with the widest inputs round to
            nearest instead (named in a warning and the report), so a large model's run stays bounded.
    """

    method: ClassVar[str] = "gptq"
    damping: float = 0.01
    moments_mb: int = 512

    def __post_init__(self) -> None:
        check_number("rounding (gptq) damping", self.damping, strict=True)
        if not isinstance(self.moments_mb, int) or isinstance(self.moments_mb, bool) or self.moments_mb < 0:
            raise UserError(f"rounding (gptq) moments_mb={self.moments_mb!r} must be a whole number of MiB >= 0")

    def resolved(self, activation_bits: int) -> GPTQ:
        return self


@dataclass(frozen=True)
class MRECGMerge:
    """MRECG on top of BRECQ or QDrop: merge the ``k`` adjacent block pairs with the largest capacity
    differentials and reconstruct each merged unit as one block.

    Attributes:
        k: number of block pairs to merge.
        capacity: "data" (block losses of a first, shorter reconstruction pass, the paper's practice)
            or "proxy" (our data-free proxy: the block's relative weight quantization noise).
        iters: "per_unit" (every unit, merged or not, runs the method's ``iters``: the paper),
            "per_block" (a merged unit of n blocks runs n times them) or "auto" (per_unit on the paper
            schedule, per_block on the others, whose few iterations under-train merged units).
    """

    k: int = 4
    capacity: str = "data"
    iters: str = AUTO

    def __post_init__(self) -> None:
        check_count("rounding.mrecg.k", self.k)
        check_choice("rounding.mrecg.capacity", self.capacity, MRECG_CAPACITIES)
        check_choice("rounding.mrecg.iters", self.iters, (*MRECG_ITERS, AUTO))


@dataclass(frozen=True, kw_only=True)
class LearnedRounding:
    """Fields shared by AdaRound, BRECQ and QDrop (block reconstruction in torch).

    Attributes:
        schedule: the schedule the values came from ("fast", "long", "paper"); recorded in the report
            and used by the "auto" values.
        iters: iterations per block (BRECQ's weight phase; QDrop's joint loop).
        batch_size: mini-batch size. samples: calibration samples cached per block.
        round_lr: Adam rate of the rounding variables V.
        round_weight: lambda, the weight of the rounding regulariser.
        beta: (start, end) of the regulariser's temperature. warmup: fraction of ``iters`` without it.
        act_lr: Adam rate of the activation step sizes (BRECQ's activation phase, QDrop).
        act_lr_relative: ``act_lr`` is relative to each quantizer's initial step (False: absolute).
        p: exponent of the block output error. act_p: exponent of BRECQ's activation phase.
        eval_samples: samples the block loss is scored on before and after.
        log_every: record the training error every this many iterations.
        augment: augmented views per calibration image (a flip, then random resized crops), fitted too.
        augment_optional: a model without an image input runs without the views (logged) instead of
            being refused (set by the long schedule, whose views are a default, not a request).
        fisher: weight the block error with BRECQ's diagonal Fisher (|g| + 1)^2 (classifiers).
        learn_weight_scale: also learn each weight's per-channel scale (LSQ), biases requantized.
        weight_inputs: block inputs of the rounding phase: "quantized" (the model quantized so far),
            "weights_only" (that model with activation quantizers off) or "auto" (weights_only for
            adaround and BRECQ's two-pass order, quantized otherwise).
        max_chain: longest chain of plain layers merged into one block.
    """

    method: ClassVar[str]
    schedule: str = "fast"
    iters: int = 300
    batch_size: int = 16
    samples: int = 256
    round_lr: float = 5e-2
    round_weight: float = 10.0
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    act_lr: float = 5e-3
    act_lr_relative: bool = True
    p: float = 2.0
    act_p: float = 2.4
    eval_samples: int = 128
    log_every: int = 25
    augment: int = 0
    augment_optional: bool = False
    fisher: bool = False
    learn_weight_scale: bool = False
    weight_inputs: str = AUTO
    max_chain: int = 3

    def __post_init__(self) -> None:
        name = f"rounding ({self.method})"
        check_choice(f"{name} schedule", self.schedule, SCHEDULES)
        check_count(f"{name} iters", self.iters, minimum=1)
        for attr in ("batch_size", "samples", "eval_samples", "log_every", "max_chain"):
            check_count(f"{name} {attr}", getattr(self, attr), minimum=1)
        check_count(f"{name} augment", self.augment)
        for attr in ("round_lr", "act_lr", "p", "act_p"):
            check_number(f"{name} {attr}", getattr(self, attr), strict=True)
        check_number(f"{name} round_weight", self.round_weight)
        beta = tuple(self.beta)
        if len(beta) != 2 or not all(isinstance(b, (int, float)) for b in beta) or not beta[0] >= beta[1] > 0:
            raise UserError(f"{name} beta={self.beta!r} must be (start, end) with start >= end > 0")
        object.__setattr__(self, "beta", (float(beta[0]), float(beta[1])))
        check_number(f"{name} warmup", self.warmup, maximum=0.999999)
        for attr in ("act_lr_relative", "augment_optional", "fisher", "learn_weight_scale"):
            check_bool(f"{name} {attr}", getattr(self, attr))
        check_choice(f"{name} weight_inputs", self.weight_inputs, (*WEIGHT_PHASE_INPUTS, AUTO))

    # -------------------------------------------------------------------------------- schedules
    @classmethod
    def schedule_values(cls, schedule: str) -> dict[str, Any]:
        """Every value the schedule sets (the dataclass defaults are the fast schedule's)."""
        check_choice(f"rounding ({cls.method}) schedule", schedule, SCHEDULES)
        if schedule == "paper":
            return dict(schedule="paper", iters=20000, batch_size=32, samples=1024, round_lr=1e-3,
                        round_weight=0.01, act_lr=cls._paper_act_lr, act_lr_relative=False,
                        eval_samples=256, log_every=100)
        values: dict[str, Any] = dict(schedule=schedule, act_lr=cls._fast_act_lr)
        if schedule == "long":
            values.update(iters=1000, augment=3, augment_optional=True)
        return values

    #: the fast schedule's relative activation rate, and the papers' absolute one
    _fast_act_lr: ClassVar[float] = 5e-3
    _paper_act_lr: ClassVar[float] = 4e-5

    @classmethod
    def from_schedule(cls, schedule: str = "fast", **overrides: Any):
        """The schedule's values with ``overrides`` (an unknown field is a one-line error)."""
        return _from_schedule(cls, schedule, overrides)

    @classmethod
    def fast(cls, **overrides: Any):
        """Sized for a 2-core CPU: 300 iterations at batch 16 on 256 samples (docs/defaults.md)."""
        return cls.from_schedule("fast", **overrides)

    @classmethod
    def long(cls, **overrides: Any):
        """fast's rates with 1,000 iterations a block on each image and 3 augmented views of it."""
        return cls.from_schedule("long", **overrides)

    @classmethod
    def paper(cls, **overrides: Any):
        """The papers' schedule: 20,000 iterations, batch 32, 1,024 samples (for a GPU)."""
        return cls.from_schedule("paper", **overrides)

    # -------------------------------------------------------------------------------- resolution
    def resolved_weight_inputs(self, order: str) -> str:
        if self.weight_inputs != AUTO:
            return self.weight_inputs
        return "weights_only" if self.method == "adaround" or order == "two_pass" else "quantized"

    def resolved(self, activation_bits: int):
        """Every "auto" value replaced (see each field)."""
        return dataclasses.replace(self, weight_inputs=self.resolved_weight_inputs("interleaved"))


@dataclass(frozen=True, kw_only=True)
class AdaRound(LearnedRounding):
    """Layer-wise AdaRound: one weighted op per block, the rounding variables only."""

    method: ClassVar[str] = "adaround"


@dataclass(frozen=True, kw_only=True)
class _BlockMethod(LearnedRounding):
    """BRECQ and QDrop: block-wise, with an optional MRECG merge."""

    mrecg: MRECGMerge | None = None

    def resolved_mrecg(self) -> MRECGMerge | None:
        if self.mrecg is None or self.mrecg.iters != AUTO:
            return self.mrecg
        return dataclasses.replace(self.mrecg, iters="per_unit" if self.schedule == "paper" else "per_block")


@dataclass(frozen=True, kw_only=True)
class BRECQ(_BlockMethod):
    """BRECQ: each block's rounding, then the activation step sizes (LSQ).

    Attributes:
        act_iters: iterations of the activation step-size phase per block; 0 keeps the calibrated
            ranges. "auto": 0 on the fast and long schedules with 8-bit (or wider) activations, where
            learned 8-bit steps gained nothing; else a quarter of ``iters`` (the paper's 5,000 for 20,000).
        order: "two_pass" (the reference's: every block's rounding, then every block's steps),
            "interleaved" (each block's steps right after its rounding) or "auto" (interleaved with
            4-bit activations, where the two-pass rounding never sees the 4-bit error; else two_pass).
    """

    method: ClassVar[str] = "brecq"
    _fast_act_lr: ClassVar[float] = 1e-2
    _paper_act_lr: ClassVar[float] = 4e-4
    act_iters: int | str = AUTO
    order: str = AUTO

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.act_iters != AUTO:
            check_count("rounding (brecq) act_iters", self.act_iters)
        check_choice("rounding (brecq) order", self.order, (*BRECQ_ORDERS, AUTO))

    def resolved(self, activation_bits: int) -> BRECQ:
        act_iters = self.act_iters
        if act_iters == AUTO:
            act_iters = 0 if self.schedule != "paper" and activation_bits >= 8 else self.iters // 4
        order = self.order if self.order != AUTO else ("interleaved" if activation_bits <= 4 else "two_pass")
        return dataclasses.replace(self, act_iters=act_iters, order=order,
                                   weight_inputs=self.resolved_weight_inputs(order), mrecg=self.resolved_mrecg())


@dataclass(frozen=True, kw_only=True)
class QDrop(_BlockMethod):
    """QDrop: rounding and activation step sizes learned jointly with random activation drop.

    Attributes:
        drop_prob: probability of leaving an activation element (and block input element) in float.
    """

    method: ClassVar[str] = "qdrop"
    drop_prob: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("rounding (qdrop) drop_prob", self.drop_prob, maximum=1.0)

    def resolved(self, activation_bits: int) -> QDrop:
        return dataclasses.replace(self, weight_inputs=self.resolved_weight_inputs("interleaved"),
                                   mrecg=self.resolved_mrecg())


@dataclass(frozen=True, kw_only=True)
class AdaQuant:
    """AdaQuant: each layer's weights, bias and quantizer ranges against its float output.

    Attributes:
        mode: "sequential" (inputs from the model quantized so far) or "parallel" (float-model
            inputs, layers independent).
        schedule: "fast" (the default), "long" (the same as fast) or "paper" (the authors' code).
        iters / batch_size / samples: optimisation steps per layer, mini-batch, cached samples.
        holdout: the last ``holdout`` samples are never trained on and score the layer.
        lr_weight, lr_bias, lr_weight_range, lr_input_range: Adam rates (relative to each parameter's
            unit when ``relative``, else absolute as the paper).
        relative: relative rates. cosine: decay the rates to 0 along a cosine.
        learn_zero_point: train the input zero-point of asymmetric activation grids.
        p: exponent of the output error. eval_samples: scoring subset without a holdout.
        log_every: record the training error every this many steps.
    """

    method: ClassVar[str] = "adaquant"
    mode: str = "sequential"
    schedule: str = "fast"
    iters: int = 200
    batch_size: int = 16
    samples: int = 256
    holdout: int = 64
    lr_weight: float = 2e-3
    lr_bias: float = 1e-3
    lr_weight_range: float = 3e-3
    lr_input_range: float = 2e-2
    relative: bool = True
    cosine: bool = True
    learn_zero_point: bool = True
    p: float = 2.0
    eval_samples: int = 128
    log_every: int = 25

    def __post_init__(self) -> None:
        check_choice("rounding (adaquant) mode", self.mode, ADAQUANT_MODES)
        check_choice("rounding (adaquant) schedule", self.schedule, SCHEDULES)
        for attr in ("iters", "batch_size", "samples", "eval_samples", "log_every"):
            check_count(f"rounding (adaquant) {attr}", getattr(self, attr), minimum=1)
        check_count("rounding (adaquant) holdout", self.holdout)
        for attr in ("lr_weight", "lr_bias", "lr_weight_range", "lr_input_range"):
            check_number(f"rounding (adaquant) {attr}", getattr(self, attr))
        check_number("rounding (adaquant) p", self.p, strict=True)
        for attr in ("relative", "cosine", "learn_zero_point"):
            check_bool(f"rounding (adaquant) {attr}", getattr(self, attr))

    @classmethod
    def schedule_values(cls, schedule: str) -> dict[str, Any]:
        check_choice("rounding (adaquant) schedule", schedule, SCHEDULES)
        if schedule == "paper":
            return dict(schedule="paper", iters=100, batch_size=50, samples=1024, holdout=100, lr_weight=1e-5,
                        lr_bias=1e-3, lr_weight_range=1e-3, lr_input_range=1e-1, relative=False, cosine=False,
                        eval_samples=256)
        return dict(schedule=schedule)

    @classmethod
    def from_schedule(cls, schedule: str = "fast", **overrides: Any) -> AdaQuant:
        """The schedule's values with ``overrides`` (an unknown field is a one-line error)."""
        return _from_schedule(cls, schedule, overrides)

    @classmethod
    def fast(cls, **overrides: Any) -> AdaQuant:
        """Our CPU budget: 200 iterations at batch 16 on 256 samples (64 held out), relative rates."""
        return cls.from_schedule("fast", **overrides)

    @classmethod
    def paper(cls, **overrides: Any) -> AdaQuant:
        """The authors' code: 100 iterations at batch 50, absolute rates, 100 held-out samples."""
        return cls.from_schedule("paper", **overrides)

    def resolved(self, activation_bits: int) -> AdaQuant:
        return self


Rounding = RoundToNearest | GPTQ | AdaRound | BRECQ | QDrop | AdaQuant

#: method name -> type
ROUNDING_TYPES: dict[str, Any] = {t.method: t for t in (RoundToNearest, GPTQ, AdaRound, BRECQ, QDrop, AdaQuant)}


def method_settings(method: str) -> set[str]:
    """The settings rounding method ``method`` takes (none for rtn or an unknown name; ``schedule`` for
    the learned ones)."""
    return _field_names(ROUNDING_TYPES.get(method))


def method_name(rounding: Rounding) -> str:
    """The method as the report and the CLI call it ("mrecg" for BRECQ/QDrop with a merge)."""
    return "mrecg" if getattr(rounding, "mrecg", None) is not None else rounding.method


def rounding_from_dict(values: dict[str, Any]) -> Rounding:
    """A rounding config from ``{"method": ..., "schedule": ..., <field>: ..., "mrecg": {...}}``."""
    values = dict(values)
    method = values.pop("method", DEFAULT_ROUNDING)
    check_choice("rounding.method", method, tuple(ROUNDING_TYPES))
    kind = ROUNDING_TYPES[method]
    if kind is RoundToNearest:
        if values:
            raise UserError(f"rounding method rtn has no settings, got {', '.join(sorted(values))}: drop them "
                            "or choose a learned method")
        return RoundToNearest()
    if kind is GPTQ:
        unknown = sorted(set(values) - _field_names(GPTQ))
        if unknown:
            raise UserError(f"rounding method gptq has no setting {unknown[0]!r}: its settings are damping and "
                            "moments_mb")
        return GPTQ(**values)
    merge = values.pop("mrecg", None)
    if merge is not None:
        if kind not in (BRECQ, QDrop):
            raise UserError(f"MRECG merges blocks of brecq or qdrop, not {method}: drop [rounding.mrecg]")
        unknown = sorted(set(merge) - {f.name for f in dataclasses.fields(MRECGMerge)})
        if unknown:
            raise UserError(f"rounding.mrecg has no setting {unknown[0]!r}: known ones are k, capacity, iters")
        values["mrecg"] = MRECGMerge(**merge)
    if "beta" in values:
        values["beta"] = tuple(values["beta"])
    return kind.from_schedule(values.pop("schedule", "fast"), **values)


def rounding_to_dict(rounding: Rounding) -> dict[str, Any]:
    out: dict[str, Any] = {"method": rounding.method}
    for f in dataclasses.fields(rounding):
        value = getattr(rounding, f.name)
        if isinstance(value, MRECGMerge):
            value = dataclasses.asdict(value)
        elif isinstance(value, tuple):
            value = list(value)
        if value is not None:
            out[f.name] = value
    return out


__all__ = ["GPTQ", "AdaQuant", "AdaRound", "BRECQ", "MRECGMerge", "QDrop", "ROUNDING_TYPES", "RoundToNearest",
           "Rounding", "method_name", "rounding_from_dict", "rounding_to_dict"]
