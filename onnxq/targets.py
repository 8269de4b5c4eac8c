"""Target profiles as plain data: which ops get quantized and how QDQ is placed.

The ``ort-cpu`` profile follows onnxruntime's QDQ conventions so that its graph optimizer fuses the
result into integer kernels (QLinearConv, QGemm, QLinearMatMul / MatMulIntegerToFloat, QLinearAdd,
QLinearMul, QLinearConcat, QLinearGlobalAveragePool, QLinearAveragePool, QLinearSigmoid,
QLinearLeakyRelu, QLinearSoftmax) and drops Q/DQ pairs around data-movement ops that run on
integers directly (MaxPool, Reshape, Transpose, Resize, ...). Everything else stays float.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxq.config import QuantConfig
from onnxq.errors import UserError
from onnxq.spec import Granularity, QuantSpec, ScaleKind

#: Ops with a constant weight input that gets a weight DQ: op -> (weight input index, bias input index or None).
WEIGHT_INPUTS: dict[str, tuple[int, int | None]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (1, 2),
    "MatMul": (1, None),
}


@dataclass(frozen=True)
class Target:
    """A deployment target's quantization rules.

    Attributes:
        name: profile name.
        description: one line for ``onnxq inspect``.
        weight_ops: ops whose constant weight is quantized (see WEIGHT_INPUTS).
        activation_ops: ops with an integer kernel: all float inputs and the output get Q/DQ.
        passthrough_ops: ops that move data without changing values' scale: when their input is
            quantized their output reuses the input's scale and zero-point, so the runtime drops
            the Q/DQ pair and runs them on integers.
        fusable_activations: activations absorbed into the preceding weighted op's output Q
            (their output is quantized instead of the weighted op's).
        quantize_graph_outputs: whether graph outputs get Q/DQ (off: outputs stay float).
    """

    name: str
    description: str
    weight_ops: frozenset[str]
    activation_ops: frozenset[str]
    passthrough_ops: frozenset[str]
    fusable_activations: frozenset[str]
    quantize_graph_outputs: bool = False

    def weight_spec(self, config: QuantConfig, bits: int) -> QuantSpec:
        return QuantSpec(
            bits=bits, signed=True, symmetric=True,
            granularity=Granularity.CHANNEL if config.per_channel else Granularity.TENSOR,
            scale_kind=ScaleKind(config.scale_kind), narrow=bits == 8,
        )

    def activation_spec(self, config: QuantConfig, bits: int | None = None) -> QuantSpec:
        signed = config.activation_dtype == "int8"
        return QuantSpec(bits=bits or config.activation_bits, signed=signed, symmetric=signed,
                         granularity=Granularity.TENSOR,
                         scale_kind=ScaleKind(config.scale_kind))


ORT_CPU = Target(
    name="ort-cpu",
    description="onnxruntime CPU: uint8 asymmetric activations, int8 symmetric per-channel weights",
    weight_ops=frozenset(WEIGHT_INPUTS),
    activation_ops=frozenset({
        "Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool", "Sigmoid", "LeakyRelu", "Softmax",
    }),
    passthrough_ops=frozenset({
        "MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Resize", "Slice",
        "Gather", "Split", "Expand", "Tile", "DepthToSpace", "SpaceToDepth",
    }),
    fusable_activations=frozenset({"Relu", "Clip"}),
)

TARGETS: dict[str, Target] = {t.name: t for t in (ORT_CPU,)}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise UserError(f"unknown target {name!r}: choose one of {', '.join(sorted(TARGETS))}") from None
