"""Small QDQ models that onnxruntime fuses into its 8-bit kernels, and their outputs emulated in numpy.

Each case is ``DQ(Q(x)) -> op(., DQ(codes)) -> Q -> DQ`` with random activation codes (a third of them
255) and weight codes with many large same-sign pairs, so the saturating kernels do saturate. The
emulation computes the fused op from the codes with :func:`onnxq.targets.ort_kernels.emulate_accumulation`
for a CPU family, the weight read in :class:`~onnxq.core.gemm_layout.Layout`'s K order and the
activations in an im2col written out here loop by loop, then requantizes the output.

Run as a script (``python -m tests.targets.kernel_cases FAMILY``) it prints, per case, the largest
output-code difference between onnxruntime (ORT_ENABLE_ALL and ORT_DISABLE_ALL) and the emulation for
FAMILY and for exact int32 accumulation, as JSON; ``python -m tests.targets.kernel_cases levels FEEDS
MODEL...`` prints each model's largest output difference between the two levels. The tests run both
here and under ``qemu -cpu Haswell`` (an AVX2 CPU without VNNI).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxq.core.gemm_layout import gemm_layout
from onnxq.targets.ort_kernels import emulate_accumulation, layout_of


@dataclass(frozen=True)
class Case:
    name: str
    op: str
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    attrs: dict = field(default_factory=dict)
    signed_activations: bool = False


CASES = (
    Case("conv3x3", "Conv", (2, 4, 5, 5), (6, 4, 3, 3), {"pads": [1, 1, 1, 1]}),
    Case("conv3x3_odd_channels", "Conv", (2, 3, 6, 6), (5, 3, 3, 3), {"strides": [2, 2]}),
    Case("conv1x1", "Conv", (2, 6, 4, 4), (5, 6, 1, 1)),
    Case("conv_grouped", "Conv", (1, 8, 5, 5), (6, 4, 3, 3), {"group": 2, "pads": [1, 1, 1, 1]}),
    Case("conv_depthwise", "Conv", (1, 4, 5, 5), (4, 1, 3, 3), {"group": 4}),
    Case("conv_depthwise_multiplier", "Conv", (1, 2, 5, 5), (4, 1, 3, 3), {"group": 2}),
    Case("gemm_transb", "Gemm", (3, 10), (4, 10), {"transB": 1}),
    Case("gemm", "Gemm", (3, 10), (10, 4)),
    Case("matmul", "MatMul", (3, 10), (10, 4)),
    Case("conv_int8_activations", "Conv", (2, 4, 5, 5), (6, 4, 3, 3), {"pads": [1, 1, 1, 1]}, True),
)

_X_SCALE, _W_SCALE = 0.02, 0.01


def case_model(case: Case, codes: np.ndarray, out_scale: float) -> onnx.ModelProto:
    act = np.int8 if case.signed_activations else np.uint8
    inits = [numpy_helper.from_array(np.array(_X_SCALE, np.float32), "xs"),
             numpy_helper.from_array(np.array(0, act), "xz"),
             numpy_helper.from_array(codes.astype(np.int8), "wq"),
             numpy_helper.from_array(np.array(_W_SCALE, np.float32), "ws"),
             numpy_helper.from_array(np.array(0, np.int8), "wz"),  # QGemm fuses only with a weight zero-point
             numpy_helper.from_array(np.array(out_scale, np.float32), "ys"),
             numpy_helper.from_array(np.array(0, act), "yz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"]),
             helper.make_node(case.op, ["xd", "wd"], ["c"], **case.attrs),
             helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    graph = helper.make_graph(nodes, case.name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, case.x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def im2col(case: Case, a: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """Per group, rows (n, oh, ow) of K = (kh, kw, c) (channels innermost), written out loop by loop;
    returns (groups, rows, K) and the output's (n, oh, ow)."""
    n, c, h, w = a.shape
    m, cg, kh, kw = case.w_shape
    group = int(case.attrs.get("group", 1))
    pad = case.attrs.get("pads", [0, 0, 0, 0])
    stride = case.attrs.get("strides", [1, 1])
    padded = np.pad(a, ((0, 0), (0, 0), (pad[0], pad[2]), (pad[1], pad[3])), constant_values=-1)
    oh = (h + pad[0] + pad[2] - kh) // stride[0] + 1
    ow = (w + pad[1] + pad[3] - kw) // stride[1] + 1
    out = np.zeros((group, n * oh * ow, kh * kw * cg), dtype=np.int64)
    for g in range(group):
        for b in range(n):
            for i in range(oh):
                for j in range(ow):
                    row = []
                    for di in range(kh):
                        for dj in range(kw):
                            for ch in range(cg):
                                row.append(padded[b, g * cg + ch, i * stride[0] + di, j * stride[1] + dj])
                    out[g, (b * oh + i) * ow + j] = row
    return out, (n, oh, ow)


def emulate(case: Case, a_codes: np.ndarray, codes: np.ndarray, family: str, out_scale: float) -> np.ndarray:
    """The fused op's output codes: activation codes shifted to uint8 (int8 ones by +128, as onnxruntime's
    QDQ transform does), the accumulation of ``family``, the zero-point correction, requantization."""
    shift = 128 if case.signed_activations else 0
    u8 = a_codes.astype(np.int64) + shift
    layout = gemm_layout(case.op, case.attrs, case.w_shape)
    q = layout.to_matrix(codes.astype(np.int64))  # (M, K)
    if layout_of(case.op, case.attrs, case.w_shape, case.x_shape[1]) is None:
        family = "int32"  # the depthwise kernel
    if case.op == "Conv":
        padded_zero = shift  # padding is the zero point: real 0
        rows, (n, oh, ow) = im2col(case, u8)
        rows = np.where(rows < 0, padded_zero, rows)
        group = rows.shape[0]
        per = q.shape[0] // group
        acc = np.concatenate([emulate_accumulation(rows[g], q[g * per:(g + 1) * per], family)
                              - shift * q[g * per:(g + 1) * per].sum(axis=1)[None] for g in range(group)], axis=1)
        acc = acc.reshape(n, oh, ow, -1).transpose(0, 3, 1, 2)
    else:
        x = u8.T if case.op == "Gemm" and case.attrs.get("transA") else u8
        acc = emulate_accumulation(x, q, family) - shift * q.sum(axis=1)[None]
    y = acc * (_X_SCALE * _W_SCALE)
    low, high = (-128, 127) if case.signed_activations else (0, 255)
    return np.clip(np.rint(y / out_scale), low, high)


def run_case(case: Case, family: str, seed: int = 0) -> dict[str, int]:
    """Largest output-code differences of onnxruntime at both levels against ``family`` and int32."""
    rng = np.random.default_rng(seed)
    low, high = (-128, 127) if case.signed_activations else (0, 255)
    a_codes = rng.integers(low, high + 1, size=case.x_shape)
    a_codes[rng.random(case.x_shape) < 0.34] = high
    codes = rng.integers(-127, 128, size=case.w_shape)
    big = rng.random(case.w_shape) < 0.5
    codes[big] = 120 * np.where(rng.random(case.w_shape)[big] < 0.8, 1, -1)
    exact_peak = np.abs(emulate(case, a_codes, codes, "int32", 1.0)).max()
    out_scale = float(max(exact_peak, 1.0) / (120 if case.signed_activations else 250))
    x = (a_codes * _X_SCALE).astype(np.float32)
    model = case_model(case, codes, out_scale)
    out: dict[str, int] = {}
    for level, opt in (("all", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
                       ("disable", ort.GraphOptimizationLevel.ORT_DISABLE_ALL)):
        options = ort.SessionOptions()
        options.graph_optimization_level = opt
        options.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        got = np.rint(session.run(None, {"x": x})[0] / out_scale)
        for name, fam in (("family", family), ("int32", "int32")):
            out[f"{level}_vs_{name}"] = int(np.abs(got - emulate(case, a_codes, codes, fam, out_scale)).max())
    return out


def run_all(family: str) -> dict[str, dict[str, int]]:
    return {case.name: run_case(case, family) for case in CASES}


def level_gap(path: str, feeds: str) -> float:
    """The largest ``|ORT_ENABLE_ALL - ORT_DISABLE_ALL|`` of a model's first output on the arrays saved in
    ``feeds`` (an .npz of input name -> array)."""
    inputs = dict(np.load(feeds))
    outs = []
    for opt in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = opt
        options.log_severity_level = 3
        outs.append(ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]).run(None, inputs)[0])
    return float(np.abs(outs[0] - outs[1]).max())


if __name__ == "__main__":
    if sys.argv[1] == "levels":  # levels FEEDS MODEL...: each model's level gap
        json.dump({p: level_gap(p, sys.argv[2]) for p in sys.argv[3:]}, sys.stdout)
    else:
        json.dump(run_all(sys.argv[1]), sys.stdout)
