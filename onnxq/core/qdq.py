"""The QDQ contract: how onnxq writes a quantized tensor into a graph, and how any code finds it again.

**Names.** A tensor ``t`` quantized by onnxq becomes (:class:`QDQNames`)::

    activation:  t -> QuantizeLinear "<t>_QuantizeLinear" -> "<t>_quantized"
                   [-> Clip "<t>_Clip" (qmin "<t>_qmin", qmax "<t>_qmax") -> "<t>_clipped"]
                   -> DequantizeLinear "<t>_DequantizeLinear" -> "<t>_dequantized" -> consumers of t
    weight/bias: constant "<t>_quantized" (integer codes) -> DequantizeLinear -> "<t>_dequantized"

with the scale in ``"<t>_scale"`` and the zero-point in ``"<t>_zero_point"`` (left out of a constant
DQ when it is 0). The float weight ``t`` itself leaves the graph, so a weight DQ's constant name is
the only link back to it (:func:`weight_of`); everything else is found by following producers and
consumers (:func:`dq_producing`, :func:`quantized_source`, :func:`activation_qdq`).

**INT32 biases.** A bias ``b`` of an op with input scale ``s_in`` and weight scale ``s_w`` (per
channel or per tensor) is stored as INT32 codes on the grid ``s_b = fl32(s_in * s_w)``::

    q_b = clip(round(b / s_b), -(2^31 - 1), 2^31 - 1)

The product is formed in float64 and rounded once to float32, which is the correctly rounded product
of the two float32 scales (what onnxruntime computes when it quantizes a float bias itself). Where
``|b| / (s_in s_w)`` would pass ``2^31 - 1``, the weight scale is raised to
``|b| / (s_in (2^31 - 1)) * (1 + 1e-6)`` first (:func:`fit_weight_scale`; rounded up to a power of two
on power-of-two grids), so the code always fits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.core.spec import Granularity, QuantSpec, ScaleKind, pow2_round

#: The largest INT32 bias code (the grid is symmetric: -INT32_MAX .. INT32_MAX).
INT32_MAX = 2**31 - 1
#: Head-room of a raised weight scale over the smallest one that makes the bias fit.
_FIT_MARGIN = 1e-6

_ROLES = ("quantized", "dequantized", "scale", "zero_point")


@dataclass(frozen=True)
class QDQNames:
    """The names of the tensors and nodes that quantize tensor ``base`` (see the module docstring)."""

    base: str

    @property
    def quantized(self) -> str:
        """The QuantizeLinear output, or the integer constant of a weight or bias."""
        return f"{self.base}_quantized"

    @property
    def dequantized(self) -> str:
        return f"{self.base}_dequantized"

    @property
    def scale(self) -> str:
        return f"{self.base}_scale"

    @property
    def zero_point(self) -> str:
        return f"{self.base}_zero_point"

    @property
    def clipped(self) -> str:
        """The Clip output of a sub-8-bit grid stored in an 8-bit container."""
        return f"{self.base}_clipped"

    @property
    def qmin(self) -> str:
        return f"{self.base}_qmin"

    @property
    def qmax(self) -> str:
        return f"{self.base}_qmax"

    @property
    def float_output(self) -> str:
        """The float tensor's new name when the graph output it was keeps the user's name."""
        return f"{self.base}_float"

    def node(self, op: str) -> str:
        """The name of the ``op`` node (QuantizeLinear, Clip, DequantizeLinear) of this tensor."""
        return f"{self.base}_{op}"


def base_of(name: str, role: str) -> str | None:
    """The quantized tensor behind ``name`` when it is that tensor's ``role`` name, else None.

    ``role`` is one of "quantized", "dequantized", "scale", "zero_point".
    """
    if role not in _ROLES:
        raise ValueError(f"unknown QDQ role {role!r}: use one of {', '.join(_ROLES)}")
    suffix = f"_{role}"
    return name[: -len(suffix)] if name.endswith(suffix) and len(name) > len(suffix) else None


# ---------------------------------------------------------------------- following the graph
def dq_producing(t: gs.Tensor) -> gs.Node | None:
    """The DequantizeLinear that produces ``t``, or None."""
    if isinstance(t, gs.Constant) or len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    return node if node.op == "DequantizeLinear" else None


def scaled_dq(t: gs.Tensor) -> gs.Node | None:
    """The DequantizeLinear with a constant scale that produces ``t``, or None."""
    node = dq_producing(t)
    return node if node is not None and isinstance(node.inputs[1], gs.Constant) else None


def constant_dq(t: gs.Tensor) -> gs.Node | None:
    """The DequantizeLinear of constants (codes, scale, zero-point) that produces ``t``, or None."""
    node = dq_producing(t)
    if node is None or not all(isinstance(i, gs.Constant) for i in node.inputs if i.name):
        return None
    return node


def input_scale(node: gs.Node) -> float | None:
    """The per-tensor scale of the DequantizeLinear feeding ``node``'s first input, or None (float input)."""
    dq = scaled_dq(node.inputs[0])
    if dq is None:
        return None
    s = np.asarray(dq.inputs[1].values)
    return float(s) if s.size == 1 else None


def quantized_source(dq: gs.Node) -> gs.Tensor | None:
    """The float tensor an activation ``Q -> [Clip] -> DQ`` chain quantizes (None for a constant DQ)."""
    t = dq.inputs[0]
    while t.inputs and t.inputs[0].op == "Clip":
        t = t.inputs[0].inputs[0]
    if not t.inputs or t.inputs[0].op != "QuantizeLinear":
        return None
    return t.inputs[0].inputs[0]


def activation_qdq(t: gs.Tensor) -> list[gs.Node]:
    """The QuantizeLinear nodes reading ``t`` and the DequantizeLinear nodes they feed (through a Clip)."""
    found: list[gs.Node] = []
    for q in t.outputs:
        if q.op != "QuantizeLinear" or q.inputs[0] is not t:
            continue
        found.append(q)
        stack = list(q.outputs[0].outputs)
        while stack:
            node = stack.pop()
            if node.op == "Clip":
                stack.extend(node.outputs[0].outputs)
            elif node.op == "DequantizeLinear":
                found.append(node)
    return found


def weight_of(dq: gs.Node) -> str | None:
    """The float weight (or bias) a constant DequantizeLinear stands for, from its codes' name."""
    src = dq.inputs[0]
    if dq.op != "DequantizeLinear" or not isinstance(src, gs.Constant):
        return None
    return base_of(src.name, "quantized")


def quantized_name(dq: gs.Node) -> str:
    """The tensor a DequantizeLinear dequantizes, from its output's name (the output itself otherwise)."""
    name = dq.outputs[0].name
    return base_of(name, "dequantized") or name


# ---------------------------------------------------------------------- INT32 biases
def bias_scale(s_in: float | np.ndarray, s_w: np.ndarray) -> np.ndarray:
    """``s_b = fl32(s_in * s_w)`` (one value per weight scale)."""
    return (np.asarray(s_w).astype(np.float64) * float(s_in)).astype(np.float32)


def bias_spec(per_channel: bool, scale_kind: ScaleKind = ScaleKind.FLOAT) -> QuantSpec:
    """The INT32 grid of a bias (one scale per output channel on axis 0, or one in all)."""
    return QuantSpec(bits=32, signed=True, symmetric=True, axis=0 if per_channel else None,
                     granularity=Granularity.CHANNEL if per_channel else Granularity.TENSOR,
                     scale_kind=scale_kind)


def bias_codes(bias: np.ndarray, s_b: np.ndarray) -> np.ndarray:
    """``clip(round(b / s_b), -INT32_MAX, INT32_MAX)`` as int64 (round half to even)."""
    codes = np.rint(np.asarray(bias).astype(np.float64) / np.asarray(s_b).astype(np.float64))
    return np.clip(codes, -INT32_MAX, INT32_MAX).astype(np.int64)


def bias_overflows(bias: np.ndarray, s_b: np.ndarray) -> np.ndarray:
    """Where ``|b / s_b|`` passes ``INT32_MAX`` (before clipping)."""
    return np.abs(np.asarray(bias, dtype=np.float64)) > INT32_MAX * np.asarray(s_b, dtype=np.float64)


def fit_weight_scale(s_w: np.ndarray, s_in: float | np.ndarray, bias: np.ndarray, *, pow2: bool
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The weight scale raised where the bias code would overflow INT32, and the mask of raised entries.

    ``need = |b| / (s_in INT32_MAX) (1 + 1e-6)`` per channel (its maximum for a per-tensor scale);
    ``s_w' = max(s_w, need)``, rounded up to a power of two when ``pow2``. Returns ``s_w`` itself
    (float32) and an all-False mask when nothing overflows.
    """
    need = np.abs(np.asarray(bias).astype(np.float64)) / (float(s_in) * INT32_MAX) * (1 + _FIT_MARGIN)
    scale = np.asarray(s_w).astype(np.float64)
    if scale.ndim == 0:
        need = need.max(initial=0.0)
    low = scale < need
    if not np.any(low):
        return np.asarray(s_w, dtype=np.float32), np.zeros(scale.shape, dtype=bool)
    new = np.maximum(scale, need)
    if pow2:
        new = pow2_round(new, "ceil")
    return new.astype(np.float32), np.asarray(low)


def grid_bias(bias: np.ndarray, s_in: float | np.ndarray, s_w: np.ndarray) -> np.ndarray:
    """A float ``bias`` moved onto its INT32 grid: ``fl32(q_b * s_b)`` (what a runtime that quantizes the
    float bias itself computes)."""
    s_b = bias_scale(s_in, s_w)
    return (bias_codes(bias, s_b).astype(np.float64) * s_b.astype(np.float64)).astype(np.float32)
