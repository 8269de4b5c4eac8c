"""Rule checker: does a QDQ ONNX model (ours or any other tool's) obey a target profile?

:func:`check_target` reads the top-level graph of a QDQ model and returns one :class:`Violation`
per broken rule and node. It needs no calibration data and runs no inference. Rules (names as in
``Violation.rule``):

``opset``       default-domain opset >= ``target.min_opset`` and high enough for every Q/DQ storage
                type (int4/uint4/int16/uint16: 21; int2/uint2: 25).
``domain``      every node's domain is in ``target.allowed_domains``.
``const``       Q/DQ scales and zero-points are constants (initializers or Constant nodes).
``dtype``       activation storage types follow ``target.activation_dtypes`` x ``activation_bits``
                (sub-8-bit grids live in 8-bit containers); weight types follow ``weight_bits``;
                int32 only for biases.
``zero_point``  activation zero-points in ``target.activation_zero_points`` (e.g. all 0 for
                tensorrt and npu-pow2), weight zero-points in ``target.weight_zero_points``.
``pow2``        with a power-of-two target, every scale (biases included) is exactly 2^k.
``granularity`` activations per tensor; weights per channel / per tensor as the target allows.
``qdq_pair``    a DQ fed by a Q (directly or through the QCDQ Clip) uses the Q's scale and zero-point.
``wrapped``     a quantized compute op (Conv, ConvTranspose, Gemm, MatMul whose weight comes from a
                DQ) has a DQ on its activation input and, unless ``target.weighted_output`` is
                "none" or the output is an unquantized graph output, a Q on its output (directly or
                after a single-consumer chain of the target's fusable activations); a MatMul may
                have a float output where ``target.float_matmul_outputs``, and the op's output may be
                the float input of an Add (its only consumer, whose other inputs are dequantized and
                whose output is quantized) where ``target.add_inputs`` allows "residual".
``bias``        a DQ'd bias is int32 with zero-point 0, |codes| <= 2^31 - 1 and scale s_in * s_w
                (relative error <= 1e-6). A float bias is not a violation.
``concat``      with ``target.align_concat``: the DQ'd inputs of a Concat and its output Q share one
                scale and zero-point.
``eltwise``     with ``target.align_eltwise``: the DQ'd inputs of an Add share one scale and zero-point.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from onnxq.core import mapped
from onnxq.core.layers import WEIGHT_INPUTS
from onnxq.core.qdq import INT32_MAX
from onnxq.core.spec import is_power_of_two
from onnxq.core.weight_cast import folded_constants
from onnxq.targets.profiles import Target, get_target

log = logging.getLogger(__name__)

_BIAS_RTOL = 1e-6
_MIN_OPSET = {TensorProto.INT4: 21, TensorProto.UINT4: 21, TensorProto.INT16: 21, TensorProto.UINT16: 21,
              TensorProto.INT2: 25, TensorProto.UINT2: 25}
_NAMES = {v: k.lower() for k, v in TensorProto.DataType.items()}


@dataclass(frozen=True)
class Violation:
    """One broken rule: the rule's name, the node (name, else ``op(first output)``) and why."""

    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.node}: {self.message}"


def activation_dtypes(target: Target) -> set[int]:
    """ONNX storage types an activation Q/DQ may use under ``target``."""
    out = set()
    for dtype in target.activation_dtypes:
        signed = dtype == "int8"
        for bits in target.activation_bits:
            if bits == 16:
                out.add(TensorProto.INT16 if signed else TensorProto.UINT16)
            else:  # 8-bit, and sub-8-bit grids in 8-bit containers (QCDQ)
                out.add(TensorProto.INT8 if signed else TensorProto.UINT8)
    return out


def weight_dtypes(target: Target) -> set[int]:
    """ONNX storage types a weight DQ may use under ``target``."""
    table = {8: TensorProto.INT8, 4: TensorProto.INT4, 2: TensorProto.INT2, 16: TensorProto.INT16}
    return {table[b] for b in target.weight_bits if b in table}


class QDQGraph:
    """Indexes of a model's top-level graph (constants, producers, consumers) and Q/DQ readers."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.consts: dict[str, np.ndarray] = {}
        self.const_types: dict[str, int] = {}
        for init in g.initializer:
            self.consts[init.name] = mapped.values(init)
            self.const_types[init.name] = init.data_type
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in g.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value":
                        self.consts[node.output[0]] = mapped.values(attr.t)
                        self.const_types[node.output[0]] = attr.t.data_type
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(node)
        # Cast(int2/int4 constant) [-> Sub zero-point] -> DequantizeLinear (onnxq.core.weight_cast) reads as
        # the constant it folds to.
        for out, (values, kind) in folded_constants(g).items():
            self.consts[out] = values
            self.const_types[out] = kind
        self.outputs = {o.name for o in g.output}
        self.nodes = list(g.node)

    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name) if name else None

    def made_by(self, tensor: str, op: str) -> onnx.NodeProto | None:
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == op else None

    def qparams(self, node: onnx.NodeProto) -> tuple[np.ndarray | None, np.ndarray | None, int | None]:
        """(scale, zero-point, storage type) of a Q/DQ node; None where not constant/known."""
        g = self
        scale = g.const(node.input[1]) if len(node.input) > 1 else None
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zp = g.const(zp_name)
        dtype = g.const_types.get(zp_name) if zp_name else None
        if dtype is None and node.op_type == "DequantizeLinear":
            dtype = g.const_types.get(node.input[0])
        if dtype is None and node.op_type == "QuantizeLinear":
            dtype = _attr(node, "output_dtype", 0) or TensorProto.UINT8
        if dtype is None and node.op_type == "DequantizeLinear":
            q = self.source_q(node)
            dtype = self.qparams(q)[2] if q is not None else None
        if zp is None and not zp_name and scale is not None:
            zp = np.zeros(np.shape(scale), dtype=np.int64)
        return scale, zp, dtype

    def source_q(self, dq: onnx.NodeProto) -> onnx.NodeProto | None:
        node = self.producer.get(dq.input[0])
        if node is not None and node.op_type == "Clip":  # QCDQ
            node = self.producer.get(node.input[0])
        return node if node is not None and node.op_type == "QuantizeLinear" else None

    def role(self, node: onnx.NodeProto) -> str:
        if node.op_type == "QuantizeLinear" or node.input[0] not in self.consts:
            return "activation"
        if self.const_types.get(node.input[0]) == TensorProto.INT32:
            return "bias"  # int32 is the bias storage type (also BatchNormalization's, in ORT's output)
        for c in self.consumers.get(node.output[0], []):
            if c.op_type in WEIGHT_INPUTS and len(c.input) > 2 and c.input[2] == node.output[0]:
                return "bias"
        return "weight"


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return a.i
    return default


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _uniform(values: np.ndarray | None) -> bool:
    """One value, possibly repeated (a per-channel DQ that reads every channel alike)."""
    flat = np.ravel(values) if values is not None else np.zeros(1)
    return flat.size <= 1 or bool(np.all(flat == flat[0]))


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Equal Q/DQ parameters, a scalar matching a uniform vector (``None``: absent, i.e. zero)."""
    fa, fb = (np.ravel(x) if x is not None else np.zeros(1) for x in (a, b))
    if fa.size == fb.size:
        return bool(np.array_equal(fa, fb))
    return fa.size > 0 and fb.size > 0 and _uniform(fa) and _uniform(fb) and bool(fa[0] == fb[0])


class _Checker:
    def __init__(self, model: onnx.ModelProto, target: Target) -> None:
        self.model, self.target, self.g = model, target, QDQGraph(model)
        self.out: list[Violation] = []

    def flag(self, rule: str, node: onnx.NodeProto | str, message: str) -> None:
        self.out.append(Violation(rule, node if isinstance(node, str) else _label(node), message))

    # -- per Q/DQ node -------------------------------------------------------------------------
    def check_qdq(self, node: onnx.NodeProto) -> None:
        t, name = self.target, node.op_type
        scale, zp, dtype = self.g.qparams(node)
        if scale is None or (len(node.input) > 2 and node.input[2] and zp is None):
            self.flag("const", node, f"{name} scale/zero-point must be constants")
            return
        role = self.g.role(node)
        if dtype is not None and _default_opset(self.model) < _MIN_OPSET.get(dtype, 13):
            self.flag("opset", node, f"{_NAMES.get(dtype, dtype)} Q/DQ needs opset >= {_MIN_OPSET[dtype]}")
        if role == "activation":
            if dtype not in activation_dtypes(t):
                self.flag("dtype", node, f"activation type {_NAMES.get(dtype, dtype)} not allowed "
                          f"(allowed: {', '.join(sorted(_NAMES[d] for d in activation_dtypes(t)))})")
            if not _uniform(scale) or not _uniform(zp):  # one value read per channel is still per tensor
                self.flag("granularity", node, "activation scale is not per tensor")
            zps = set(np.ravel(zp).tolist())
            if t.activation_zero_points is not None and not zps <= t.activation_zero_points:
                self.flag("zero_point", node, f"activation zero-point {np.ravel(zp)[:4].tolist()} not in "
                          f"{sorted(t.activation_zero_points)}")
        elif role == "weight":
            if dtype not in weight_dtypes(t):
                self.flag("dtype", node, f"weight type {_NAMES.get(dtype, dtype)} not allowed "
                          f"(allowed: {', '.join(sorted(_NAMES[d] for d in weight_dtypes(t)))})")
            gran = "channel" if np.ndim(scale) >= 1 and np.size(scale) > 1 else "tensor"
            if gran not in t.weight_granularity:
                self.flag("granularity", node, f"per-{gran} weight scales not allowed")
            if t.weight_zero_points is not None and not set(np.ravel(zp).tolist()) <= t.weight_zero_points:
                self.flag("zero_point", node, f"weight zero-point {sorted(set(np.ravel(zp).tolist()))[:4]} "
                          f"not in {sorted(t.weight_zero_points)}")
        if not np.all(np.asarray(scale) > 0):
            self.flag("const", node, "scale must be positive")
        if t.pow2 and not np.all(is_power_of_two(np.asarray(scale, dtype=np.float64))):
            self.flag("pow2", node, f"{role} scale {np.ravel(scale)[:3].tolist()} is not a power of two")
        if name == "DequantizeLinear" and role == "activation":
            q = self.g.source_q(node)
            if q is not None:
                qs, qz, _ = self.g.qparams(q)
                if qs is not None and not (_same(qs, scale) and _same(qz, zp)):
                    self.flag("qdq_pair", node, f"uses other parameters than its QuantizeLinear {_label(q)}")

    # -- per compute op ------------------------------------------------------------------------
    def dq_of(self, tensor: str) -> onnx.NodeProto | None:
        return self.g.made_by(tensor, "DequantizeLinear")

    def check_compute(self, node: onnx.NodeProto) -> None:
        w_idx, b_idx = WEIGHT_INPUTS[node.op_type]
        if len(node.input) <= w_idx:
            return
        w_dq = self.dq_of(node.input[w_idx])
        if w_dq is None or self.g.role(w_dq) != "weight":
            return  # a float op (a MatMul of two activations, e.g. attention's, reads DQs but has no weight)
        x_dq = self.dq_of(node.input[0])
        if x_dq is None:
            self.flag("wrapped", node, "weight is dequantized but the activation input has no "
                      "DequantizeLinear")
        float_out = node.op_type == "MatMul" and self.target.float_matmul_outputs
        if (self.target.weighted_output != "none" and not float_out and not self.output_quantized(node)
                and not self.residual_fused(node)):
            self.flag("wrapped", node, "output has no QuantizeLinear (directly or after Relu/Clip)")
        if b_idx is None or len(node.input) <= b_idx or not node.input[b_idx]:
            return
        bias = node.input[b_idx]
        b_dq = self.dq_of(bias)
        if b_dq is not None:  # a float bias is allowed (TensorRT wants it; onnxruntime then runs float)
            self.check_bias(node, b_dq, x_dq, w_dq)

    def output_quantized(self, node: onnx.NodeProto) -> bool:
        g, t = self.g, self.target
        out = node.output[0]
        while True:
            users = g.consumers.get(out, [])
            if any(u.op_type == "QuantizeLinear" for u in users):
                return True
            if out in g.outputs:
                return not t.quantize_graph_outputs
            if len(users) != 1 or users[0].op_type not in t.fusable_activations or users[0].input[0] != out:
                return False
            out = users[0].output[0]

    def residual_fused(self, node: onnx.NodeProto) -> bool:
        """The op's output (after a single-consumer chain of fusable activations) is read only by an Add
        whose other inputs are dequantized and whose output is quantized, on a target allowing that."""
        g, t = self.g, self.target
        if "residual" not in t.add_inputs:
            return False
        out = node.output[0]
        while True:
            users = g.consumers.get(out, [])
            if len(users) != 1 or out in g.outputs:
                return False
            user = users[0]
            if user.op_type == "Add":
                others = [i for i in user.input if i != out]
                return (len(others) == len(user.input) - 1 and all(self.dq_of(i) is not None for i in others)
                        and any(u.op_type == "QuantizeLinear" for u in g.consumers.get(user.output[0], [])))
            if user.op_type not in t.fusable_activations or user.input[0] != out:
                return False
            out = user.output[0]

    def check_bias(self, node: onnx.NodeProto, b_dq: onnx.NodeProto, x_dq: onnx.NodeProto | None,
                   w_dq: onnx.NodeProto) -> None:
        g = self.g
        codes = g.const(b_dq.input[0])
        s_b, z_b, dtype = self.g.qparams(b_dq)
        if codes is None or s_b is None:
            self.flag("bias", node, "bias DequantizeLinear input is not a constant")
            return
        if dtype != TensorProto.INT32:
            self.flag("bias", node, f"bias stored as {_NAMES.get(dtype, dtype)}, not int32")
        if z_b is not None and np.any(np.asarray(z_b) != 0):
            self.flag("bias", node, "bias zero-point is not 0")
        if codes.size and float(np.max(np.abs(codes.astype(np.int64)))) > INT32_MAX:
            self.flag("bias", node, "bias codes outside [-(2^31 - 1), 2^31 - 1]")
        s_x = self.g.qparams(x_dq)[0] if x_dq is not None else None
        s_w = self.g.qparams(w_dq)[0]
        if s_x is None or s_w is None:
            return
        expected = np.asarray(s_x, np.float64).reshape(()) * np.asarray(s_w, np.float64).ravel()
        got = np.broadcast_to(np.asarray(s_b, np.float64).ravel(), expected.shape)
        rel = np.max(np.abs(got - expected) / expected) if expected.size else 0.0
        if rel > _BIAS_RTOL:
            self.flag("bias", node, f"bias scale differs from s_in * s_w (relative error {rel:.2e})")

    # -- alignment -----------------------------------------------------------------------------
    def check_aligned(self, node: onnx.NodeProto, rule: str, with_output: bool) -> None:
        params = []
        for name in node.input:
            dq = self.dq_of(name) if name and name not in self.g.consts else None
            if dq is not None:
                params.append((name, self.g.qparams(dq)))
        if with_output:
            for user in self.g.consumers.get(node.output[0], []):
                if user.op_type == "QuantizeLinear":
                    params.append((node.output[0], self.g.qparams(user)))
        params = [(n, p) for n, p in params if p[0] is not None]
        if len(params) < 2:
            return
        s0, z0, _ = params[0][1]
        odd = [n for n, (s, z, _) in params[1:] if not (np.array_equal(s, s0) and np.array_equal(z, z0))]
        if odd:
            self.flag(rule, node, f"inputs/output do not share one scale and zero-point ({params[0][0]} vs "
                      f"{', '.join(odd[:3])})")

    def run(self) -> list[Violation]:
        t = self.target
        opset = _default_opset(self.model)
        if opset < t.min_opset:
            self.flag("opset", "<model>", f"default opset {opset} < {t.min_opset} required by target "
                      f"{t.name}")
        for node in self.g.nodes:
            if node.domain not in t.allowed_domains:
                self.flag("domain", node, f"op domain {node.domain!r} not allowed by target {t.name}")
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.domain in ("", "ai.onnx",
                                                                                          "com.microsoft"):
                self.check_qdq(node)
            elif node.op_type in WEIGHT_INPUTS and node.domain in ("", "ai.onnx"):
                self.check_compute(node)
            if node.op_type == "Concat" and t.align_concat:
                self.check_aligned(node, "concat", with_output=True)
            if node.op_type == "Add" and t.align_eltwise:
                self.check_aligned(node, "eltwise", with_output=False)
        return self.out


def check_target(model: onnx.ModelProto, target: Target | str) -> list[Violation]:
    """Every violation of ``target``'s rules in the QDQ ``model`` (empty list: compliant).

    Args:
        model: any QDQ ONNX model (only the top-level graph is inspected).
        target: a Target or a profile name.
    """
    target = get_target(target) if isinstance(target, str) else target
    violations = _Checker(model, target).run()
    log.debug("%s: %d violation(s)", target.name, len(violations))
    return violations


def format_violations(violations: list[Violation]) -> str:
    """One line per violation."""
    return "\n".join(str(v) for v in violations)
