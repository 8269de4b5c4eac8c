"""Typed, frozen configuration of a quantization run (no option dicts)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from onnxq.errors import UserError

WEIGHT_BITS = (8, 4, 2)  # 2: ternary {-1, 0, 1} (onnxq.ternary.operators) or 4-level INT2 (int2_grid)
INT2_GRIDS = ("ternary", "uniform")
FIRST_LAST_BITS = (8, 4)
PLAN_BITS = (8, 4, 2)  # per-layer widths of QuantConfig.bit_plan
TERNARY_STORAGES = ("auto", "int2", "int4", "int8")
ACTIVATION_DTYPES = ("uint8", "int8")
ACTIVATION_BITS = (8, 4)
SCALE_KINDS = ("float", "pow2")
CALIB_METHODS = ("minmax", "percentile", "mse", "entropy")
WEIGHT_METHODS = ("minmax", "mse")
RECON_METHODS = ("rtn", "adaround", "brecq", "qdrop", "adaquant", "mrecg")
ADAQUANT_MODES = ("parallel", "sequential")
MRECG_BASES = ("brecq", "qdrop")
MRECG_CAPACITIES = ("data", "proxy")
MRECG_ITERS = ("per_unit", "per_block")
#: How a mixed-precision sensitivity table's weights at each width are made (onnxq.mixed.sensitivity).
MP_RECONSTRUCT = ("rtn", "adaquant")
SCHEDULES = ("fast", "long", "paper")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    Attributes:
        target: target profile name (see :mod:`onnxq.targets.profiles`).
        weight_bits: 8, 4 (INT4 is stored natively, opset 21) or 2 (``int2_grid``; stored as
            ``ternary_storage`` says).
        int2_grid: the 2-bit grid (of ``weight_bits=2`` and of the 2-bit layers of ``bit_plan``):
            "ternary" (codes {-1, 0, 1} times a per-channel scale from ``ternary_method``) or "uniform"
            (the 4-level INT2 grid [-2, 1] with a per-channel zero-point, round-to-nearest from the
            weight range, as the W2 rows of BRECQ/QDrop/MRECG use; needs ``weight_symmetric=False``).
        ternary_method: the ternary operator for 2-bit weights, one of :data:`onnxq.ternary.operators.METHODS`
            (rtn, twn, tquant, mquant-a, mquant-b; "mquant" is an alias of
            :data:`onnxq.ternary.operators.MQUANT_DEFAULT`).
        ternary_storage: container of 2-bit codes (ternary or 4-level): "int2" (opset 25; read through a Cast to int8 where
            onnxruntime cannot fuse int2 kernels, :mod:`onnxq.core.int2_cast`), "int4" (opset 21), "int8", or
            "auto" (the target's narrowest container, see :func:`onnxq.ternary.export.resolve_storage`).
        learn_weight_scale: reconstruction also learns each weight's per-channel scale (LSQ-style,
            initialised from the round-to-nearest or ternary operator's scale; biases requantized).
        per_channel: one weight scale per output channel (the right axis per op) or one per tensor.
        weight_symmetric: weight zero-points 0 (default). False: asymmetric weights, each channel's
            grid fitted to its [min, max] with an integer zero-point, as BRECQ's and QDrop's reference
            quantizers do; only targets whose kernels take weight zero-points allow it (ort-cpu).
            Ternary weights stay symmetric; the 4-level INT2 grid needs it.
        activation_dtype: "uint8" (asymmetric) or "int8" (symmetric).
        activation_bits: 8, or 4 (uint4/int4 storage, opset 21; graph inputs and the last
            layer's input stay at 8 bits when first_last_bits is 8).
        scale_kind: "float" or "pow2" (every scale an exact power of two).
        calib_method: activation range method: minmax | percentile | mse | entropy.
        weight_method: weight range method: minmax | mse.
        percentile: for calib_method="percentile".
        calib_samples: use at most this many calibration samples (None: all).
        first_last_bits: bit width of the first and last weighted layers when weight_bits < 8
            (None: same as weight_bits).
        exclude: node names or op types to keep in float.
        fold_batchnorm: fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm.
        validate: run the validation after quantization.
        seed: seed of everything random.
        opset: minimum output opset (None: 13, or 21 for INT4 weights).
        method: weight rounding: rtn (round to nearest), adaround (layer-wise), brecq (block-wise,
            then activation step sizes), qdrop (block-wise, joint with random activation drop),
            adaquant (layer-wise: weights, bias and quantizer ranges; :mod:`onnxq.passes.rounding.adaquant`),
            mrecg (``mrecg_base`` on blocks with merged neighbours; :mod:`onnxq.passes.rounding.mrecg`).
        schedule: "fast" (sized for a 2-core CPU: 300 iterations a block), "long" (fast's rates with 1,000
            iterations and 3 augmented views of each calibration image, images only: ``ReconConfig.long``;
            met the W4A8 BRECQ bar on EfficientNet-Lite0 in 25 min on 2 threads, 10.2 GB peak) or "paper"
            (20k iterations, batch 32, 1024 samples). Sets AdaQuant's schedule too ("long": fast's).
        recon_iters / recon_batch_size / recon_samples: override the schedule's values.
        recon_round_weight: the AdaRound regulariser weight lambda (None: the schedule's; the papers'
            0.01 with ``schedule="paper"``, 10 with "fast", see ``onnxq.recon.ReconConfig.fast``).
        recon_round_lr: Adam learning rate of the AdaRound rounding variables (None: the schedule's;
            1e-3 with ``schedule="paper"`` as in the papers, 5e-2 with "fast").
        recon_act_iters: length of BRECQ's activation step-size phase per block; 0 keeps the calibrated
            activation ranges. None: 0 on the fast and long schedules with 8-bit activations (on
            EfficientNet-Lite0 W4A8 the learned 8-bit steps gave 82.53 % top-1, without them 84.40 % and
            82.67 % (seeds 0, 1): no gain, and the run is 300 s longer), else the schedule's (a quarter
            of the weight iterations).
        recon_augment: augmented views per calibration sample for adaround/brecq/qdrop/mrecg (a
            horizontal flip, then random resized crops; :mod:`onnxq.data.augment`); 0: none. Image models only.
            None: the schedule's (3 on "long", where a model without an image input gets none; else 0).
        fisher: weight the block output error with the diagonal Fisher (|g| + 1)^2 (BRECQ).
        drop_prob: QDrop's probability of leaving an activation element in float.
        weight_phase_inputs: block inputs of the AdaRound/BRECQ weight phase, "quantized" or
            "weights_only" (None: the method's default, see ``onnxq.recon.ReconConfig.weight_inputs``).
        recon_order: BRECQ's phase order, "interleaved" (per block: weights, then activation steps)
            or "two_pass" (the reference's: all weights, then all steps); None: "interleaved" with
            4-bit activations (on EfficientNet-Lite0 W4A4 two-pass gave 69.20 % top-1 against 76.13 %:
            its weight pass never sees the 4-bit activation error), else the default of
            ``onnxq.recon.ReconConfig.order`` (two_pass for brecq; without a step phase, see
            ``recon_act_iters``, BRECQ makes one pass whatever the order). Also MRECG's with the brecq base.
        device: "cpu" or "cuda" for the torch engine.
        max_chain: longest chain of single layers merged into one block.
        checkpoint_dir: folder where finished blocks are saved so an interrupted run resumes.
        keep_checkpoint: keep the checkpoint of a finished run (default: it is removed). A re-run with
            the same reconstruction settings then reuses every block, so options applied after
            reconstruction (bias or statistics tuning, grid biases, export) can be changed for free.
        cache_budget_mb: RAM for cached block tensors before spilling to disk.
        equalize: cross-layer equalization (DFQ) of Conv/Gemm pairs in the float phase.
        relu6: what equalization does with ReLU6 (Clip 0..6) between a pair: "skip" the pair
            (function-preserving) or "replace" it by Relu (changes the float function, as DFQ did).
        bias_absorb: high-bias absorption across Relu: None, "bn" (from folded BatchNorm
            statistics) or "data" (from calibration data).
        bias_correction: None, "data" (E[x] measured on calibration data) or "bn" (analytic).
        bit_plan: per-layer weight bit widths, ``((node name, bits), ...)`` with bits 8, 4 or 2; a
            named layer gets that width whatever ``weight_bits``/``first_last_bits`` say (a mapping
            is accepted and stored as pairs). Written by :mod:`onnxq.mixed.plan`.
        bias_tuning: after QDQ insertion, tune each quantized layer's INT32 bias so its output mean
            matches the float model's, layer by layer (:mod:`onnxq.passes.tune.tune_bias`).
        stats_tuning: after QDQ insertion, restore each quantized layer's per-channel output mean
            and std to the float model's (:mod:`onnxq.passes.tune.tune_stats`).
        adaquant_mode: AdaQuant's variant: "sequential" (inputs from the model quantized so far) or
            "parallel" (float-model inputs, layers independent).
        mrecg_base: MRECG's base reconstruction, "brecq" or "qdrop" (its schedule is ``schedule``'s).
        mrecg_k: MRECG merges the ``k`` adjacent block pairs with the largest capacity differentials.
        mrecg_capacity: "data" (block losses of a first, shorter reconstruction pass) or "proxy"
            (a data-free capacity of our own: the block's relative weight quantization noise).
        mrecg_iters: "per_unit" (every reconstruction unit, merged or not, runs ``recon_iters``: the
            paper) or "per_block" (a merged unit of n blocks runs n times them); None: per_block on
            the fast and long schedules (at 300 iterations merged units are otherwise under-trained:
            W2A4 BRECQ 18.40 % per unit, 35.47 % per block, docs/benchmarks.md session 8), per_unit on
            the paper's.
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
    calib_method: str = "minmax"
    weight_method: str = "minmax"
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
        _choice("weight_bits", self.weight_bits, WEIGHT_BITS)
        from onnxq.ternary.operators import METHODS as TERNARY_METHODS
        from onnxq.ternary.operators import canonical_method

        object.__setattr__(self, "ternary_method", canonical_method(self.ternary_method))
        _choice("ternary_method", self.ternary_method, TERNARY_METHODS)
        _choice("ternary_storage", self.ternary_storage, TERNARY_STORAGES)
        _choice("int2_grid", self.int2_grid, INT2_GRIDS)
        if self.int2_grid == "uniform" and self.weight_symmetric:
            raise UserError("the 4-level INT2 grid [-2, 1] has zero-points: set weight_symmetric=False "
                            "(--weights int2 does), or use int2_grid='ternary'")
        _choice("activation_dtype", self.activation_dtype, ACTIVATION_DTYPES)
        _choice("activation_bits", self.activation_bits, ACTIVATION_BITS)
        _choice("scale_kind", self.scale_kind, SCALE_KINDS)
        _choice("calib_method", self.calib_method, CALIB_METHODS)
        _choice("weight_method", self.weight_method, WEIGHT_METHODS)
        if self.first_last_bits is not None:
            _choice("first_last_bits", self.first_last_bits, FIRST_LAST_BITS)
        if not 50.0 < self.percentile <= 100.0:
            raise UserError(f"percentile {self.percentile} out of range: use a value in (50, 100]")
        _choice("method", self.method, RECON_METHODS)
        _choice("adaquant_mode", self.adaquant_mode, ADAQUANT_MODES)
        _choice("mrecg_base", self.mrecg_base, MRECG_BASES)
        _choice("mrecg_capacity", self.mrecg_capacity, MRECG_CAPACITIES)
        if self.mrecg_iters is not None:
            _choice("mrecg_iters", self.mrecg_iters, MRECG_ITERS)
        if not _is_count(self.mrecg_k):
            raise UserError(f"mrecg_k={self.mrecg_k!r} is not a count of block pairs: use an integer >= 0")
        _choice("schedule", self.schedule, SCHEDULES)
        for name in ("recon_iters", "recon_batch_size", "recon_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be >= 1, got {value}")
        lam = self.recon_round_weight
        if lam is not None and not (_is_finite_number(lam) and lam >= 0):
            raise UserError(f"recon_round_weight must be a finite number >= 0, got {lam!r}")
        lr = self.recon_round_lr
        if lr is not None and not (_is_finite_number(lr) and lr > 0):
            raise UserError(f"recon_round_lr must be a finite number > 0, got {lr!r}")
        act = self.recon_act_iters
        if act is not None and not _is_count(act):
            raise UserError(f"recon_act_iters must be an integer >= 0 (0: no activation phase), got {act!r}")
        aug = self.recon_augment
        if aug is not None and not _is_count(aug):
            raise UserError(f"recon_augment must be a count of views per sample >= 0, got {aug!r}")
        if aug and self.method not in ("adaround", "brecq", "qdrop", "mrecg"):
            raise UserError(f"recon_augment applies to adaround, brecq, qdrop and mrecg, not method "
                            f"{self.method!r}: "
                            "drop --augment or pick one of those methods")
        _choice("weight_phase_inputs", self.weight_phase_inputs, (None, "quantized", "weights_only"))
        _choice("recon_order", self.recon_order, (None, "interleaved", "two_pass"))
        optimiser = self.mrecg_base if self.method == "mrecg" else self.method
        if self.recon_order == "two_pass" and optimiser != "brecq":
            raise UserError(f"recon_order 'two_pass' needs method brecq (or mrecg on brecq), got {self.method!r}: "
                            "drop --recon-order")
        if act is not None and optimiser != "brecq":
            raise UserError(f"recon_act_iters sets BRECQ's activation phase; method {self.method!r} has none "
                            "(QDrop learns its steps with the rounding): "
                            "drop --act-iters or use --method brecq")
        if not 0.0 <= self.drop_prob <= 1.0:
            raise UserError(f"drop_prob {self.drop_prob} is not a probability: use a value in [0, 1]")
        _choice("relu6", self.relu6, ("skip", "replace"))
        _choice("bias_absorb", self.bias_absorb, (None, "bn", "data"))
        _choice("bias_correction", self.bias_correction, (None, "data", "bn"))
        if self.keep_checkpoint and not self.checkpoint_dir:
            raise UserError("keep_checkpoint needs a checkpoint_dir: name the folder to keep it in")
        if self.max_chain < 1:
            raise UserError("max_chain must be >= 1")
        if self.calib_samples is not None and self.calib_samples < 1:
            raise UserError("calib_samples must be >= 1")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "bit_plan", _bit_plan(self.bit_plan))

    @property
    def output_opset(self) -> int:
        plan_bits = {b for _, b in self.bit_plan}
        low = min(self.weight_bits, self.first_last_bits or 8, self.activation_bits, *plan_bits)
        need = 21 if low == 4 or 4 in (self.first_last_bits, self.activation_bits, *plan_bits) else 13
        if self.weight_bits == 2 or 2 in plan_bits:  # "auto" is resolved by Target.resolve before use
            need = max(need, {"int2": 25, "int4": 21}.get(self.ternary_storage, 13))
        return max(need, self.opset or 0)

    def recon_config(self):
        """The engine's ReconConfig for this run (imports torch)."""
        from onnxq.recon import ReconConfig

        overrides = {k: v for k, v in (("iters", self.recon_iters), ("batch_size", self.recon_batch_size),
                                       ("num_samples", self.recon_samples),
                                       ("round_weight", self.recon_round_weight),
                                       ("round_lr", self.recon_round_lr),
                                       ("act_iters", self.recon_act_iters)) if v is not None}
        method = self.mrecg_base if self.method == "mrecg" else self.method
        order = self.recon_order
        if order is None and method == "brecq" and self.activation_bits <= 4:
            order = "interleaved"  # two-pass at W4A4: 69.20 % against 76.13 % (docs/benchmarks.md)
        if self.recon_act_iters is None and method == "brecq" and self.schedule != "paper" \
                and self.activation_bits >= 8:
            overrides["act_iters"] = 0  # no gain from 8-bit steps: docs/benchmarks.md, session 6
        overrides.update(fisher=self.fisher, drop_prob=self.drop_prob, device=self.device, seed=self.seed,
                         weight_inputs=self.weight_phase_inputs, order=order)
        if self.recon_augment is not None:  # asked for: a model without an image input is refused
            overrides.update(augment=self.recon_augment, augment_optional=False)
        factories = {"fast": ReconConfig.fast, "long": ReconConfig.long, "paper": ReconConfig.paper}
        return factories[self.schedule](method, **overrides)

    def mrecg_iters_used(self) -> str:
        """``mrecg_iters``, or its schedule-dependent default (see the attribute)."""
        if self.mrecg_iters is not None:
            return self.mrecg_iters
        return "per_unit" if self.schedule == "paper" else "per_block"

    def adaquant_config(self):
        """AdaQuant's AdaQuantConfig for this run (imports torch); ``recon_*`` override the schedule."""
        from onnxq.recon.adaquant import AdaQuantConfig

        overrides = {k: v for k, v in (("iters", self.recon_iters), ("batch_size", self.recon_batch_size),
                                       ("num_samples", self.recon_samples)) if v is not None}
        overrides.update(device=self.device, seed=self.seed)
        factory = AdaQuantConfig.paper if self.schedule == "paper" else AdaQuantConfig.fast
        return factory(self.adaquant_mode, **overrides)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _bit_plan(plan: object) -> tuple[tuple[str, int], ...]:
    """``bit_plan`` as ``((name, bits), ...)``; bad widths or repeated names are a UserError."""
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


def _is_count(value: object) -> bool:
    """An integer >= 0 (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_finite_number(value: object) -> bool:
    """An int or float, neither nan nor infinite (a bool is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise UserError(f"{name}={value!r} is not supported: choose one of {', '.join(map(str, allowed))}")
