"""``QuantConfig``: the flat configuration of onnxq 0.1, kept so existing code keeps working.

Deprecated: build a :class:`onnxq.config.Config` instead. A ``QuantConfig`` is converted once
(:meth:`QuantConfig.to_config`); every function that takes a configuration accepts either
(:func:`as_config`). The conversion reproduces 0.1's behaviour exactly: its default activation type,
activation width and scale kind meant "the target's choice", its ``recon_*`` fields override the
schedule's values, and ``method="mrecg"`` is its ``mrecg_base`` method with an MRECG merge.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import Any

from onnxq.config.choices import canonical_ternary_method
from onnxq.config.rounding import BRECQ, AdaQuant, AdaRound, MRECGMerge, QDrop, RoundToNearest
from onnxq.config.run import Config
from onnxq.config.sections import (
    Activations,
    Calibration,
    Engine,
    FloatPhase,
    Tuning,
    Validation,
    Weights,
    bit_plan_pairs,
)
from onnxq.errors import UserError

_LEARNED: dict[str, Any] = {"adaround": AdaRound, "brecq": BRECQ, "qdrop": QDrop}
_METHODS = ("rtn", "adaround", "brecq", "qdrop", "adaquant", "mrecg")


@dataclass(frozen=True)
class QuantConfig:
    """Deprecated flat configuration; see :class:`onnxq.config.Config` for what each setting means.

    Field -> new place: weight_bits, int2_grid, ternary_method, ternary_storage (weights.storage),
    per_channel, weight_symmetric (weights.symmetric), weight_method (weights.range_method),
    first_last_bits, bit_plan -> ``weights``; activation_dtype, activation_bits -> ``activations``;
    scale_kind -> ``scale``; calib_method, percentile, calib_samples -> ``calibration``;
    fold_batchnorm, equalize, relu6, bias_absorb -> ``float_phase``; bias_correction, bias_tuning,
    stats_tuning -> ``tuning``; device, checkpoint_dir, keep_checkpoint, cache_budget_mb -> ``engine``;
    validate -> ``validation.enabled``; method, schedule, recon_*, fisher, drop_prob,
    weight_phase_inputs, recon_order, max_chain, learn_weight_scale, adaquant_mode, mrecg_* ->
    ``rounding``.
    """

    target: str = "ort-cpu"
    weight_bits: int = 8
    int2_grid: str = "ternary"
    ternary_method: str = "rtn"
    ternary_storage: str = "auto"
    learn_weight_scale: bool = False
    per_channel: bool = True
    weight_symmetric: bool = True
    activation_dtype: str = "uint8"
    activation_bits: int = 8
    scale_kind: str = "float"
    calib_method: str | None = None
    weight_method: str | None = None
    percentile: float = 99.999
    calib_samples: int | None = None
    first_last_bits: int | None = 8
    exclude: tuple[str, ...] = field(default_factory=tuple)
    fold_batchnorm: bool = True
    validate: bool = True
    seed: int = 0
    opset: int | None = None
    method: str = "rtn"
    schedule: str = "fast"
    recon_iters: int | None = None
    recon_batch_size: int | None = None
    recon_samples: int | None = None
    recon_round_weight: float | None = None
    recon_round_lr: float | None = None
    recon_act_iters: int | None = None
    recon_augment: int | None = None
    fisher: bool = False
    drop_prob: float = 0.5
    weight_phase_inputs: str | None = None
    recon_order: str | None = None
    device: str = "cpu"
    max_chain: int = 3
    checkpoint_dir: str | None = None
    keep_checkpoint: bool = False
    cache_budget_mb: int = 2048
    equalize: bool = False
    relu6: str = "skip"
    bias_absorb: str | None = None
    bias_correction: str | None = None
    bit_plan: tuple[tuple[str, int], ...] = ()
    bias_tuning: bool = False
    stats_tuning: bool = False
    adaquant_mode: str = "sequential"
    mrecg_base: str = "brecq"
    mrecg_k: int = 4
    mrecg_capacity: str = "data"
    mrecg_iters: str | None = None

    def __post_init__(self) -> None:
        warnings.warn("onnxq.QuantConfig is deprecated: use onnxq.Config (nested sections, presets, TOML files)",
                      DeprecationWarning, stacklevel=3)
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "ternary_method", canonical_ternary_method(self.ternary_method))
        object.__setattr__(self, "bit_plan", bit_plan_pairs(self.bit_plan))
        object.__setattr__(self, "_config", self._convert())

    def to_config(self) -> Config:
        """The equivalent :class:`Config`."""
        return self._config  # type: ignore[attr-defined]

    @property
    def output_opset(self) -> int:
        return self.to_config().output_opset

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # ---------------------------------------------------------------------------- conversion
    def _convert(self) -> Config:
        # 0.1's defaults "uint8", 8 bits and "float" meant the target's choice where it differs.
        dtype = None if self.activation_dtype == "uint8" else self.activation_dtype
        act_bits = None if self.activation_bits == 8 else self.activation_bits
        scale = None if self.scale_kind == "float" else self.scale_kind
        return Config(
            target=self.target, scale=scale, seed=self.seed, opset=self.opset, exclude=self.exclude,
            weights=Weights(bits=self.weight_bits, int2_grid=self.int2_grid, ternary_method=self.ternary_method,
                            storage=self.ternary_storage, per_channel=self.per_channel,
                            symmetric=self.weight_symmetric, range_method=self.weight_method,
                            first_last_bits=self.first_last_bits, bit_plan=self.bit_plan),
            activations=Activations(dtype=dtype, bits=act_bits),
            calibration=Calibration(method=self.calib_method, percentile=self.percentile,
                                    samples=self.calib_samples),
            float_phase=FloatPhase(fold_batchnorm=self.fold_batchnorm, equalize=self.equalize, relu6=self.relu6,
                                   bias_absorb=self.bias_absorb),
            rounding=self._rounding(),
            tuning=Tuning(bias_correction=self.bias_correction, bias_tuning=self.bias_tuning,
                          stats_tuning=self.stats_tuning),
            engine=Engine(device=self.device, checkpoint_dir=self.checkpoint_dir,
                          keep_checkpoint=self.keep_checkpoint, cache_budget_mb=self.cache_budget_mb),
            validation=Validation(enabled=self.validate),
        )

    def _rounding(self) -> Any:
        if self.method not in _METHODS:
            raise UserError(f"method={self.method!r} is not supported: choose one of {', '.join(_METHODS)}")
        base = self.mrecg_base if self.method == "mrecg" else self.method
        if self.method == "mrecg" and base not in ("brecq", "qdrop"):
            raise UserError(f"mrecg_base={base!r} is not supported: choose one of brecq, qdrop")
        self._check_method_options(base)
        sizes = {k: v for k, v in (("iters", self.recon_iters), ("batch_size", self.recon_batch_size),
                                   ("samples", self.recon_samples)) if v is not None}
        if base == "rtn":
            return RoundToNearest()
        if base == "adaquant":
            return AdaQuant.from_schedule("paper" if self.schedule == "paper" else "fast", mode=self.adaquant_mode,
                                          **sizes)
        options: dict[str, Any] = {**sizes, "fisher": self.fisher, "learn_weight_scale": self.learn_weight_scale,
                                   "max_chain": self.max_chain, "weight_inputs": self.weight_phase_inputs or "auto"}
        for key, value in (("round_weight", self.recon_round_weight), ("round_lr", self.recon_round_lr)):
            if value is not None:
                options[key] = value
        if self.recon_augment is not None:  # asked for: a model without an image input is refused
            options.update(augment=self.recon_augment, augment_optional=False)
        if base == "brecq":
            options.update(order=self.recon_order or "auto",
                           act_iters="auto" if self.recon_act_iters is None else self.recon_act_iters)
        if base == "qdrop":
            options["drop_prob"] = self.drop_prob
        if self.method == "mrecg":
            options["mrecg"] = MRECGMerge(k=self.mrecg_k, capacity=self.mrecg_capacity,
                                          iters=self.mrecg_iters or "auto")
        return _LEARNED[base].from_schedule(self.schedule, **options)

    def _check_method_options(self, base: str) -> None:
        """0.1's refusals of options that the chosen method does not have."""
        if self.recon_augment and base not in ("adaround", "brecq", "qdrop"):
            raise UserError(f"recon_augment applies to adaround, brecq, qdrop and mrecg, not method {self.method!r}: "
                            "drop --augment or pick one of those methods")
        if self.recon_order == "two_pass" and base != "brecq":
            raise UserError(f"recon_order 'two_pass' needs method brecq (or mrecg on brecq), got {self.method!r}: "
                            "drop --recon-order")
        if self.recon_act_iters is not None and base != "brecq":
            raise UserError(f"recon_act_iters sets BRECQ's activation phase; method {self.method!r} has none "
                            "(QDrop learns its steps with the rounding): drop --act-iters or use --method brecq")
        if not 0.0 <= self.drop_prob <= 1.0:
            raise UserError(f"drop_prob {self.drop_prob} is not a probability: use a value in [0, 1]")


def as_config(config: Config | QuantConfig | None) -> Config:
    """``config`` as a :class:`Config` (None: the defaults)."""
    if config is None:
        return Config()
    if isinstance(config, QuantConfig):
        return config.to_config()
    if not isinstance(config, Config):
        raise UserError(f"config must be an onnxq.Config, got {type(config).__name__}")
    return config
