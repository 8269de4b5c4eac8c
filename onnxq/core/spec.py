"""Quantization specifications and parameters.

A :class:`QuantSpec` describes the integer grid a tensor is mapped to; :class:`QParams` holds the
scale and zero-point chosen for one tensor. The numerics follow ONNX ``QuantizeLinear`` /
``DequantizeLinear`` exactly:

    q = saturate(round_half_even(x / s) + z, qmin, qmax)        x_hat = (q - z) * s

Signed symmetric grids use ``z = 0``; ``narrow`` drops the lowest code so the grid is symmetric
around 0 (int8 -> [-127, 127]; 2-bit -> [-1, 1], i.e. ternary). A 2-bit grid that is not narrow is
the uniform 4-level INT2 grid [-2, 1] (with a zero-point: the papers' W2 quantizer). Power-of-two
scales are exact powers of two (checked in :class:`QParams`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx

from onnxq.errors import UserError


class Granularity(enum.Enum):
    TENSOR = "tensor"
    CHANNEL = "channel"


class ScaleKind(enum.Enum):
    FLOAT = "float"
    POW2 = "pow2"


# Minimum ONNX opset at which QuantizeLinear/DequantizeLinear accept each storage type.
_MIN_OPSET = {8: 13, 4: 21, 2: 25, 16: 21, 32: 13}


@dataclass(frozen=True)
class QuantSpec:
    """The integer grid of one tensor.

    Attributes:
        bits: 2, 4, 8 or 16 (32 for biases).
        signed: int vs uint storage.
        symmetric: zero-point fixed at 0 (signed) or at the grid middle (unsigned, e.g. 128).
        granularity: one scale per tensor or one per slice along ``axis``.
        axis: channel axis for CHANNEL granularity (None until resolved for a concrete op).
        scale_kind: FLOAT or POW2 (scale = 2**k, k integer).
        narrow: drop the lowest code (int8 -> [-127, 127], 2-bit -> [-1, 1]: ternary; a 2-bit grid
            that is not narrow is the 4-level INT2 grid [-2, 1]).
        storage_bits: width of the stored integer type when it differs from the grid (None: ``bits``).
            2-bit weights (ternary or 4-level) may live in int4 or int8 containers; the codes, dtype
            and opset follow the container, the grid (qmin, qmax) stays the 2-bit one.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    granularity: Granularity = Granularity.TENSOR
    axis: int | None = None
    scale_kind: ScaleKind = ScaleKind.FLOAT
    narrow: bool = False
    storage_bits: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8, 16, 32):
            raise UserError(f"unsupported bit width {self.bits}: use 2, 4, 8 or 16")
        if self.storage_bits is not None and (self.storage_bits not in (2, 4, 8, 16)
                                              or self.storage_bits < self.bits or not self.signed):
            raise UserError(f"storage_bits={self.storage_bits} cannot hold a {self.bits}-bit grid: use a signed "
                            "container at least as wide (2, 4, 8 or 16)")
        if self.bits == 2 and not self.signed:
            raise UserError("2-bit weights are signed: ternary [-1, 1] (narrow) or 4-level INT2 [-2, 1]")
        if self.bits == 2 and self.narrow and not self.symmetric:
            raise UserError("ternary weights ([-1, 1]) are symmetric: use the 4-level INT2 grid for zero-points")
        if self.narrow and not self.signed:
            raise UserError("a narrow range needs a signed grid")

    @property
    def qmin(self) -> int:
        lo = -(2 ** (self.bits - 1)) if self.signed else 0
        return lo + 1 if self.narrow else lo

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def pow2(self) -> bool:
        return self.scale_kind is ScaleKind.POW2

    @property
    def ternary(self) -> bool:
        """The ternary grid [-1, 1] (codes from an :mod:`onnxq.ternary.operators` operator, not round(W / s))."""
        return self.bits == 2 and self.narrow

    @property
    def store_bits(self) -> int:
        """Width of the stored integer type (the container)."""
        return self.storage_bits or self.bits

    @property
    def min_opset(self) -> int:
        return _MIN_OPSET[self.store_bits]

    @property
    def numpy_dtype(self) -> np.dtype:
        table = {
            (8, True): np.int8, (8, False): np.uint8,
            (4, True): ml_dtypes.int4, (4, False): ml_dtypes.uint4,
            (2, True): ml_dtypes.int2, (2, False): ml_dtypes.uint2,
            (16, True): np.int16, (16, False): np.uint16,
            (32, True): np.int32,
        }
        return np.dtype(table[(self.store_bits, self.signed)])

    @property
    def onnx_dtype(self) -> int:
        table = {
            (8, True): onnx.TensorProto.INT8, (8, False): onnx.TensorProto.UINT8,
            (4, True): onnx.TensorProto.INT4, (4, False): onnx.TensorProto.UINT4,
            (2, True): onnx.TensorProto.INT2, (2, False): onnx.TensorProto.UINT2,
            (16, True): onnx.TensorProto.INT16, (16, False): onnx.TensorProto.UINT16,
            (32, True): onnx.TensorProto.INT32,
        }
        return table[(self.store_bits, self.signed)]

    def with_axis(self, axis: int | None) -> QuantSpec:
        from dataclasses import replace

        return replace(self, axis=axis if self.granularity is Granularity.CHANNEL else None)

    def describe(self) -> str:
        kind = ("int" if self.signed else "uint") + str(self.bits)
        sym = "sym" if self.symmetric else "asym"
        gran = "per-channel" if self.granularity is Granularity.CHANNEL else "per-tensor"
        text = f"{kind} {sym} {gran} {self.scale_kind.value}" + (" narrow" if self.narrow else "")
        return text + (f" in int{self.storage_bits}" if self.storage_bits not in (None, self.bits) else "")


@dataclass(frozen=True, eq=False)
class QParams:
    """Scale and zero-point of one tensor (scalars, or 1-D along ``spec.axis``)."""

    scale: np.ndarray
    zero_point: np.ndarray
    spec: QuantSpec

    def __post_init__(self) -> None:
        s = np.asarray(self.scale, dtype=np.float32)
        z = np.asarray(self.zero_point).astype(np.int64)
        object.__setattr__(self, "scale", s)
        object.__setattr__(self, "zero_point", z)
        if not np.all(np.isfinite(s)) or np.any(s <= 0):
            raise ValueError(f"scales must be positive and finite, got {s.ravel()[:4]}")
        if np.any(z < self.spec.qmin) or np.any(z > self.spec.qmax):
            raise ValueError(f"zero-point outside [{self.spec.qmin}, {self.spec.qmax}]")
        if self.spec.pow2 and not np.all(is_power_of_two(s)):
            raise ValueError("power-of-two spec with a scale that is not an exact power of two")


def is_power_of_two(a: np.ndarray) -> np.ndarray:
    """True where ``a`` is exactly 2**k for an integer k (float32 mantissa check)."""
    mantissa, _ = np.frexp(np.asarray(a, dtype=np.float64))
    return mantissa == 0.5


def pow2_round(scale: np.ndarray, mode: str = "ceil") -> np.ndarray:
    """Round scales to powers of two: ``2**ceil(log2 s)`` (never clips more) or ``2**round(log2 s)``."""
    s = np.asarray(scale, dtype=np.float64)
    k = np.log2(s)
    k = np.ceil(k - 1e-9) if mode == "ceil" else np.round(k)
    return np.exp2(k).astype(np.float32)


def qparams_from_range(lo: np.ndarray | float, hi: np.ndarray | float, spec: QuantSpec, *,
                       pow2_mode: str = "ceil") -> QParams:
    """Scale and zero-point covering [lo, hi] (which is widened to contain 0).

    Symmetric: z = 0 for signed grids (the grid middle, e.g. 128, for unsigned ones) and
    s = max(|lo|, |hi|) / (qmax - z), so +max maps exactly to qmax.
    Asymmetric: s = (hi - lo) / (qmax - qmin), z = round(qmin - lo / s),
    clipped to the grid. A zero range gets s = 1 (any scale represents it exactly).
    """
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    qmin, qmax = spec.qmin, spec.qmax
    if spec.symmetric:
        amax = np.maximum(-lo, hi)
        center = 0 if spec.signed else (qmax + qmin + 1) // 2
        scale = amax / float(qmax - center)
        zp = np.full_like(scale, center)
    else:
        scale = (hi - lo) / float(qmax - qmin)
        zp = None
    scale = np.where(scale > 0, scale, 1.0)
    # Smallest normal float32 guard: tiny ranges would give denormal scales.
    scale = np.maximum(scale, np.finfo(np.float32).tiny * 1e6)
    if spec.pow2:
        scale = pow2_round(scale, pow2_mode).astype(np.float64)
    if zp is None:
        zp = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    return QParams(scale.astype(np.float32), zp.astype(np.int64), spec)


def _broadcast(p: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if p.ndim == 0 or axis is None:
        return p
    shape = [1] * ndim
    shape[axis] = -1
    return p.reshape(shape)


def quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """Reference QuantizeLinear: saturate(round_half_even(x / s) + z) as int64 codes."""
    s = _broadcast(qp.scale, x.ndim, qp.spec.axis)
    z = _broadcast(qp.zero_point, x.ndim, qp.spec.axis)
    q = np.rint(x.astype(np.float32) / s) + z
    return np.clip(q, qp.spec.qmin, qp.spec.qmax).astype(np.int64)


def real_codes(x: np.ndarray, qp: QParams) -> np.ndarray:
    """The unrounded codes ``x / s + z`` (float64), what :func:`quantize` rounds."""
    s = _broadcast(qp.scale, x.ndim, qp.spec.axis)
    z = _broadcast(qp.zero_point, x.ndim, qp.spec.axis)
    return (x.astype(np.float32) / s).astype(np.float64) + z


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    """Reference DequantizeLinear: (q - z) * s in float32."""
    s = _broadcast(qp.scale, q.ndim, qp.spec.axis)
    z = _broadcast(qp.zero_point, q.ndim, qp.spec.axis)
    return ((q - z).astype(np.float32) * s).astype(np.float32)


def fake_quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    return dequantize(quantize(x, qp), qp)


# Presets.
# int8 weights use the narrow range [-127, 127] (onnxruntime and TensorRT convention).
INT8_WEIGHT_PC = QuantSpec(bits=8, signed=True, symmetric=True, granularity=Granularity.CHANNEL, narrow=True)
INT4_WEIGHT_PC = QuantSpec(bits=4, signed=True, symmetric=True, granularity=Granularity.CHANNEL)
UINT8_ACT = QuantSpec(bits=8, signed=False, symmetric=False)
INT8_ACT = QuantSpec(bits=8, signed=True, symmetric=True)
TERNARY_WEIGHT = QuantSpec(bits=2, signed=True, symmetric=True, granularity=Granularity.CHANNEL, narrow=True)
INT32_BIAS = QuantSpec(bits=32, signed=True, symmetric=True)


