"""Target profiles as plain data: which ops get quantized, with which grids, and how QDQ is placed.

A :class:`Target` is a frozen record; the passes read it (AssignSpecsPass: placement and grids,
AlignScalesPass: shared scales, InsertQDQPass: bias) and :func:`onnxq.targets.rules.check_target` checks any
QDQ file against it. Profiles:

``ort-cpu``
    onnxruntime's QDQ conventions, so that its graph optimizer fuses the result into integer
    kernels (QLinearConv, QGemm, QLinearMatMul / MatMulIntegerToFloat, QLinearAdd, QLinearMul,
    QLinearConcat, QLinearGlobalAveragePool, QLinearAveragePool, QLinearSigmoid, QLinearLeakyRelu,
    QLinearSoftmax) and drops Q/DQ pairs around data-movement ops that run on integers directly
    (MaxPool, Reshape, Transpose, Resize, ...). uint8 asymmetric activations (int8 allowed), int8
    symmetric per-channel weights (int4, and int2 for ternary weights, allowed), INT32 biases;
    ``com.microsoft`` ops accepted by the checker.
``tensorrt``
    int8 symmetric everywhere (every zero-point 0), float biases (TensorRT fuses them into the
    convolution) put on their INT32 grid s_in * s_w (``bias_grid``), so that onnxruntime, which
    quantizes a float bias itself, computes the same function as OpenVINO and TensorRT. Placement
    follows NVIDIA's recommendations for explicit quantization: Q/DQ on the
    *inputs* of quantizable ops (weighted ops, pooling, Concat, Add), never on a weighted op's own
    output (TensorRT fuses Conv + BN + Relu and the next input's Q into one kernel, so Relu/Clip
    stay float nodes); a residual Add gets Q/DQ on its residual input while the input coming
    straight from a convolution stays float, which lets TensorRT fuse the Add into that
    convolution's epilogue. Concat inputs share one scale.
``openvino``
    the "mixed" preset of OpenVINO's NNCF: uint8 asymmetric activations (zero-point 0 after a
    ReLU, since the range starts at 0), int8 symmetric per-channel weights; Q/DQ after the
    activation that follows a weighted op, Concat inputs share one scale.
``qnn`` / ``qnn-a16``
    Qualcomm QNN HTP: uint8 (``qnn``) or uint16 (``qnn-a16``, opset 21) asymmetric activations,
    int8 symmetric per-channel weights, INT32 biases; an AIMET-style ``.encodings`` JSON is written
    next to the model (:mod:`onnxq.targets.encodings`). Graph outputs stay float (quantizing them is a
    Target field, but the reconstruction engine does not support it yet).
``npu-pow2``
    Vitis AI / Ryzen AI / NXP style NPUs: int8 symmetric activations and weights, every scale an
    exact power of two (so requantization is a shift), Concat inputs and element-wise Add inputs
    share one scale.

Ternary weights (``weights.bits = 2``) are allowed by every target: their codes {-1, 0, 1} live in the
narrowest container the target allows (int2, int4 or int8 in ``weight_bits``) and onnxruntime runs
(:func:`onnxq.ternary.export.resolve_storage`), unless ``weights.storage`` names one.

Config vs target: :meth:`Target.resolve` decides what the run's :class:`~onnxq.config.Config` leaves
to the target (an unset activation type, activation width or scale kind takes the target's first
choice; "auto" 2-bit storage the narrowest container it allows) and refuses, with a one-line
:class:`UserError`, any value the target does not allow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from onnxq.config import Activations, Config, QuantConfig, as_config
from onnxq.config.choices import ADD_INPUT_MODES, RANGE_METHODS_BY_SCALE, UNTRAINED_ROUNDING
from onnxq.core.layers import WEIGHT_INPUTS
from onnxq.core.spec import Granularity, QuantSpec, ScaleKind
from onnxq.errors import UserError
from onnxq.ternary.export import STORAGE_BITS, resolve_storage

log = logging.getLogger(__name__)

#: Values of ``Target.weighted_output``.
WEIGHTED_OUTPUT_MODES = ("after_activation", "none")

_PASSTHROUGH = frozenset({
    "MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Resize", "Slice",
    "Gather", "Split", "Expand", "Tile", "DepthToSpace", "SpaceToDepth",
})
_ORT_ACTIVATION_OPS = frozenset({
    "Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool", "Sigmoid", "LeakyRelu", "Softmax",
})


@dataclass(frozen=True)
class Target:
    """A deployment target's quantization rules (plain data).

    Attributes:
        name: profile name.
        description: one line for ``onnxq inspect``.
        weight_ops: ops whose constant weight is quantized (see WEIGHT_INPUTS).
        activation_ops: ops with an integer kernel: all float inputs (and the output, see
            ``activation_op_outputs``) get Q/DQ.
        passthrough_ops: ops that move data without changing values' scale: when their input is
            quantized their output reuses the input's scale and zero-point, so the runtime drops
            the Q/DQ pair and runs them on integers.
        fusable_activations: activations that may sit between a weighted op and its output Q
            (Relu, Clip with constant bounds): the Q goes after them (see ``weighted_output``).
        quantize_graph_outputs: whether graph outputs get Q/DQ (off: outputs stay float).
        activation_dtypes: allowed ``Config.activations.dtype`` values, the target's choice
            first. "uint8" means unsigned asymmetric, "int8" signed symmetric (zero-point 0); the
            storage width comes from the activation bits.
        activation_bits: allowed activation bit widths, the target's choice first (16: uint16
            storage at opset 21; 4: QCDQ in 8-bit containers).
        weight_bits: allowed weight storage widths (int8 narrow [-127, 127], native int4, native
            int2 for ternary codes); ternary weights use the narrowest allowed container.
        weight_granularity: allowed weight granularities ("channel", "tensor"), choice first.
        scale_kinds: allowed scale kinds ("float", "pow2"), choice first.
        activation_zero_points: the zero-points an activation Q/DQ may use (None: any).
        weight_zero_points: the zero-points a weight DQ may use (None: any, which also allows
            ``Config.weights.symmetric = False``).
        weighted_output: where a weighted op's output is quantized: "after_activation" (after
            the single-consumer chain of fusable activations, which stay nodes; for onnxruntime the
            export moves an activation it cannot drop onto the codes,
            :mod:`onnxq.passes.export.clip_on_codes`) or "none" (never: the consumers' inputs decide,
            as TensorRT fuses them).
        float_isolated_ops: an activation op none of whose quantized inputs comes from an integer op stays
            float (:func:`onnxq.targets.placement.float_isolated_ops`): right where the runtime runs float
            ops beside integer kernels anyway (onnxruntime CPU); an NPU toolchain wants every op quantized.
        float_matmul_outputs: a weight MatMul whose output only float ops read keeps that output
            float (no Q): onnxruntime runs it as MatMulIntegerToFloat, integer products with a float
            result, so the output takes no rounding (:func:`onnxq.targets.placement.float_output_matmuls`).
        activation_op_outputs: whether the outputs of activation ops are quantized (False:
            only their inputs, TensorRT style).
        add_inputs: allowed ``Config.activations.add_inputs``, the target's choice first: "all" float
            inputs of an Add get Q/DQ, or "residual": the input that comes straight from a weighted op
            (its only consumer being the Add) stays float so the runtime fuses the Add into that op.
        align_concat: Concat inputs and output share one scale and zero-point.
        align_eltwise: the quantized inputs of an element-wise Add share one scale and zero-point.
        quantize_bias: biases of quantized weighted ops become INT32 (s_b = s_in * s_w); off:
            they stay float.
        bias_grid: float biases of quantized weighted ops are rounded onto their INT32 grid
            (weight scales raised where the code would overflow INT32), because onnxruntime
            quantizes such a bias itself (:mod:`onnxq.passes.quant.grid_bias`).
        allowed_domains: op domains a checked model may use ("" is the standard ONNX domain).
        min_opset: lowest default-domain opset of the output.
        exporters: extra files written next to the model ("aimet_encodings": ``<stem>.encodings``).
        kernels: the default of ``Config.kernels``: "portable" where the runtime is onnxruntime on CPU,
            whose x86 kernels without VNNI saturate pairs of 8-bit products; "int32" for runtimes that
            accumulate in int32.
        runtime: what runs the output (:data:`onnxq.config.choices.RUNTIMES`): "ort-cpu" (onnxruntime's
            fused CPU kernels, which validation judges) or "qdq" (a runtime that executes the QDQ graph).
    """

    name: str
    description: str
    weight_ops: frozenset[str]
    activation_ops: frozenset[str]
    passthrough_ops: frozenset[str]
    fusable_activations: frozenset[str]
    quantize_graph_outputs: bool = False
    activation_dtypes: tuple[str, ...] = ("uint8", "int8")
    activation_bits: tuple[int, ...] = (8, 4)
    weight_bits: tuple[int, ...] = (8, 4)
    weight_granularity: tuple[str, ...] = ("channel", "tensor")
    scale_kinds: tuple[str, ...] = ("float", "pow2")
    activation_zero_points: frozenset[int] | None = None
    weight_zero_points: frozenset[int] | None = frozenset({0})
    weighted_output: str = "after_activation"
    float_isolated_ops: bool = False
    float_matmul_outputs: bool = False
    activation_op_outputs: bool = True
    add_inputs: tuple[str, ...] = ("all",)
    align_concat: bool = False
    align_eltwise: bool = False
    quantize_bias: bool = True
    bias_grid: bool = False
    allowed_domains: frozenset[str] = frozenset({"", "ai.onnx"})
    min_opset: int = 13
    exporters: tuple[str, ...] = ()
    kernels: str = "int32"
    runtime: str = "qdq"

    def __post_init__(self) -> None:
        if self.weighted_output not in WEIGHTED_OUTPUT_MODES:
            raise ValueError(f"weighted_output {self.weighted_output!r} not in {WEIGHTED_OUTPUT_MODES}")
        if not self.add_inputs or not set(self.add_inputs) <= set(ADD_INPUT_MODES):
            raise ValueError(f"add_inputs {self.add_inputs!r} not within {ADD_INPUT_MODES}")

    @property
    def pow2(self) -> bool:
        """Every scale must be an exact power of two."""
        return self.scale_kinds == ("pow2",)

    def weight_spec(self, config: Config, bits: int) -> QuantSpec:
        """The weight grid of a layer at ``bits`` under the resolved ``config``; a 2-bit grid (ternary
        [-1, 1] or, with ``int2_grid="uniform"``, the 4-level [-2, 1]) is stored in the resolved container."""
        w = config.weights
        storage = None
        if bits == 2:
            storage = STORAGE_BITS[resolve_storage(self.name, self.weight_bits, w.storage)]
        ternary = bits == 2 and w.int2_grid == "ternary"
        symmetric = w.symmetric or ternary  # ternary codes are symmetric by definition
        return QuantSpec(
            bits=bits, signed=True, symmetric=symmetric,
            granularity=Granularity.CHANNEL if w.per_channel else Granularity.TENSOR,
            scale_kind=ScaleKind(config.scale), narrow=(symmetric and bits == 8) or ternary,
            storage_bits=storage,
        )

    def activation_spec(self, config: Config, bits: int | None = None) -> QuantSpec:
        """The activation grid under the resolved ``config`` (``bits``: another width than the run's)."""
        signed = config.activations.dtype == "int8"
        return QuantSpec(bits=bits or config.activations.bits, signed=signed, symmetric=signed,
                         granularity=Granularity.TENSOR, scale_kind=ScaleKind(config.scale))

    def resolve(self, config: Config) -> Config:
        """``config`` with every target-dependent value decided (see the module docstring).

        Raises:
            UserError: a value the target does not allow.
        """
        if config.target != self.name:
            raise ValueError(f"config is for target {config.target!r}, not {self.name!r}")
        w, a = config.weights, config.activations
        dtype = self._pick("activations.dtype", a.dtype, self.activation_dtypes)
        bits = self._pick("activations.bits", a.bits, self.activation_bits)
        add_inputs = self._pick("activations.add_inputs", a.add_inputs, self.add_inputs)
        scale = self._pick("scale", config.scale, self.scale_kinds)
        if w.bits != 2:
            self._pick("weights.bits", w.bits, self.weight_bits)
        if "tensor" not in self.weight_granularity and not w.per_channel:
            raise UserError(f"target {self.name} does not allow per-tensor weights: drop --per-tensor")
        if not w.symmetric and self.weight_zero_points is not None:
            fix = ("the 4-level INT2 grid has zero-points: use --weights ternary (int2_grid='ternary') or "
                   "target ort-cpu" if w.int2_grid == "uniform" else "drop --weight-asymmetric")
            raise UserError(f"target {self.name} needs symmetric weights (zero-points "
                            f"{sorted(self.weight_zero_points)}): {fix}")
        if w.first_last_bits is not None and w.first_last_bits not in self.weight_bits:
            raise UserError(f"target {self.name} does not allow weights.first_last_bits={w.first_last_bits}: "
                            f"use {' or '.join(map(str, self.weight_bits))}")
        weight_range, calib_method = RANGE_METHODS_BY_SCALE[str(scale)]
        weights = replace(w, range_method=w.range_method or weight_range)
        calibration = replace(config.calibration, method=config.calibration.method or calib_method)
        if w.uses_two_bits:
            weights = replace(weights, storage=resolve_storage(self.name, self.weight_bits, w.storage))
        if a.dynamic and (self.runtime != "ort-cpu" or dtype != "uint8" or bits != 8 or scale != "float"):
            raise UserError(f"dynamic MatMul activations are onnxruntime CPU's uint8 kernels: target {self.name} "
                            f"with {dtype} {bits}-bit {scale} activations cannot run them; drop --dynamic or use "
                            "--target ort-cpu with 8-bit uint8 float-scale activations")
        resolved = replace(config, scale=scale, weights=weights, calibration=calibration,
                           activations=Activations(dtype=dtype, bits=bits, dynamic=a.dynamic,
                                                   add_inputs=add_inputs),
                           kernels=config.kernels or self.kernels)
        need = max(self.min_opset, resolved.output_opset)
        resolved = replace(resolved, opset=need).with_rounding_resolved()
        _warn_unused_engine(resolved)
        return resolved

    def _pick(self, name: str, value: object, allowed: tuple) -> object:
        """``value`` when the target allows it, the target's choice when it is unset, else a UserError."""
        if value is None:
            return allowed[0]
        if value not in allowed:
            raise UserError(f"target {self.name} does not allow {name}={value!r}: use "
                            f"{' or '.join(map(repr, allowed))} (or leave it unset for the target's choice)")
        return value


def _warn_unused_engine(config: Config) -> None:
    """A warning for torch-engine settings that nothing in this run uses (an untrained rounding method
    and no AdaQuant sensitivity table)."""
    if config.method not in UNTRAINED_ROUNDING or config.mixed_precision.enabled:
        return
    engine = config.engine
    if engine.device != "cpu":
        log.warning("engine.device=%r does nothing: rounding method %s runs no torch engine", engine.device,
                    config.method)
    if engine.checkpoint_dir:
        log.warning("engine.checkpoint_dir does nothing: rounding method %s has no blocks to checkpoint",
                    config.method)


ORT_CPU = Target(
    name="ort-cpu",
    description="onnxruntime CPU: uint8 asymmetric activations, int8 symmetric per-channel weights",
    weight_ops=frozenset(WEIGHT_INPUTS),
    # QLinearConv/QLinearMatMul take per-channel weight zero-points (measured, onnxruntime 1.31):
    # asymmetric weights are allowed, on request.
    weight_zero_points=None,
    activation_ops=_ORT_ACTIVATION_OPS,
    passthrough_ops=_PASSTHROUGH,
    fusable_activations=frozenset({"Relu", "Clip"}),
    weight_bits=(8, 4, 2),
    add_inputs=("all", "residual"),
    float_isolated_ops=True,
    float_matmul_outputs=True,
    allowed_domains=frozenset({"", "ai.onnx", "com.microsoft"}),
    kernels="portable",
    runtime="ort-cpu",
)

TENSORRT = Target(
    name="tensorrt",
    description="TensorRT explicit quantization: int8 symmetric (zero-point 0) everywhere, Q/DQ on op inputs",
    weight_ops=frozenset(WEIGHT_INPUTS),
    activation_ops=frozenset({"Add", "Concat", "GlobalAveragePool", "AveragePool"}),
    passthrough_ops=_PASSTHROUGH,
    fusable_activations=frozenset({"Relu", "Clip"}),
    activation_dtypes=("int8",),
    activation_bits=(8,),
    weight_bits=(8,),
    # TensorRT folds any float scale into its kernels: power-of-two scales would only cost accuracy
    # (they belong to the npu-pow2 profile).
    scale_kinds=("float",),
    activation_zero_points=frozenset({0}),
    weighted_output="none",
    activation_op_outputs=False,
    add_inputs=("residual", "all"),
    align_concat=True,
    quantize_bias=False,
    bias_grid=True,
)

OPENVINO = Target(
    name="openvino",
    description="OpenVINO CPU (NNCF mixed preset): uint8 asymmetric activations, int8 symmetric "
                "per-channel weights",
    weight_ops=frozenset(WEIGHT_INPUTS),
    activation_ops=_ORT_ACTIVATION_OPS - {"Softmax"},
    passthrough_ops=_PASSTHROUGH,
    fusable_activations=frozenset({"Relu", "Clip"}),
    activation_dtypes=("uint8",),
    activation_bits=(8,),
    weight_bits=(8,),
    weighted_output="after_activation",
    align_concat=True,
)

_QNN = dict(
    weight_ops=frozenset(WEIGHT_INPUTS),
    activation_ops=_ORT_ACTIVATION_OPS,
    passthrough_ops=_PASSTHROUGH,
    fusable_activations=frozenset({"Relu", "Clip"}),
    activation_dtypes=("uint8",),
    weight_bits=(8,),
    weighted_output="after_activation",
    exporters=("aimet_encodings",),
)
QNN = Target(name="qnn", description="Qualcomm QNN HTP A8W8: uint8 asymmetric activations, int8 symmetric "
             "per-channel weights, AIMET-style encodings JSON", activation_bits=(8,), **_QNN)
QNN_A16 = Target(name="qnn-a16", description="Qualcomm QNN HTP A16W8: uint16 asymmetric activations "
                 "(opset 21), int8 symmetric per-channel weights, AIMET-style encodings JSON",
                 activation_bits=(16,), min_opset=21, **_QNN)

NPU_POW2 = Target(
    name="npu-pow2",
    description="NPU (Vitis AI / Ryzen AI / NXP style): int8 symmetric, power-of-two scales, "
                "aligned Concat/Add",
    weight_ops=frozenset(WEIGHT_INPUTS),
    activation_ops=_ORT_ACTIVATION_OPS - {"Softmax"},
    passthrough_ops=_PASSTHROUGH,
    fusable_activations=frozenset({"Relu", "Clip"}),
    activation_dtypes=("int8",),
    activation_bits=(8,),
    weight_bits=(8,),
    scale_kinds=("pow2",),
    activation_zero_points=frozenset({0}),
    weighted_output="after_activation",
    align_concat=True,
    align_eltwise=True,
)

TARGETS: dict[str, Target] = {t.name: t for t in (ORT_CPU, TENSORRT, OPENVINO, QNN, QNN_A16, NPU_POW2)}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise UserError(f"unknown target {name!r}: choose one of {', '.join(sorted(TARGETS))}") from None


def resolve_config(config: Config | QuantConfig) -> Config:
    """``config`` resolved once against its target and its other settings: every None or "auto" value
    decided (:meth:`Target.resolve`, then the rounding method's own, e.g. BRECQ's ``act_iters``).
    Resolving a resolved config changes nothing. A deprecated QuantConfig is converted first."""
    config = as_config(config)
    return get_target(config.target).resolve(config)
