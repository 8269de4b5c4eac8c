"""A weight's integer codes (onnxq.targets.weight_codes): nearest or GPTQ, fitted to the CPU kernels."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

import onnxq
from onnxq.core.context import QuantContext
from onnxq.core.gemm_layout import gemm_layout
from onnxq.core.observers import weight_qparams
from onnxq.core.spec import (
    INT8_WEIGHT_PC,
    Granularity,
    QParams,
    QuantSpec,
    ScaleKind,
    is_power_of_two,
    quantize,
)
from onnxq.targets.ort_kernels import pair_violations
from onnxq.targets.profiles import resolve_config
from onnxq.targets.weight_codes import RoundingStats, rounded_weight

PER_CHANNEL = INT8_WEIGHT_PC.with_axis(0)


def _conv(w: np.ndarray, group: int = 1) -> gs.Node:
    x = gs.Variable("x", dtype=np.float32, shape=(1, w.shape[1] * group, 6, 6))
    return gs.Node("Conv", name="conv", attrs={"group": group}, inputs=[x, gs.Constant("w", w)],
                   outputs=[gs.Variable("y", dtype=np.float32)])


def _ctx(kernels: str = "portable", rounding=None, hessian: np.ndarray | None = None) -> QuantContext:
    cfg = resolve_config(onnxq.Config(kernels=kernels, rounding=rounding or onnxq.RoundToNearest()))
    ctx = QuantContext(config=cfg)
    ctx.qparams["x"] = QParams(np.float32(0.02), np.uint8(0), QuantSpec(bits=8, signed=False))
    if hessian is not None:
        ctx.layer_hessians["y"] = hessian
    return ctx


def _heavy(shape=(8, 6, 3, 3), seed=0) -> np.ndarray:
    """Channels with many large weights of one sign: nearest 8-bit codes break the pair limit."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.5, 1.0, shape) * np.where(rng.random(shape) < 0.8, 1, -1)).astype(np.float32)


def _matrix(node: gs.Node, codes: np.ndarray) -> np.ndarray:
    return gemm_layout("Conv", node.attrs, codes.shape).to_matrix(codes.astype(np.int64))


def test_exact_kernels_and_nearest_rounding_keep_the_nearest_codes() -> None:
    w = _heavy()
    qp = weight_qparams(w, PER_CHANNEL, "minmax")
    new_qp, codes = rounded_weight(_conv(w), w, qp, _ctx("int32"))
    assert new_qp is qp and np.array_equal(codes, quantize(w, qp))


def test_portable_codes_keep_the_limit_and_only_coarsen_scales() -> None:
    w = _heavy()
    node = _conv(w)
    qp = weight_qparams(w, PER_CHANNEL, "minmax")
    assert pair_violations(_matrix(node, quantize(w, qp))).any()
    stats = RoundingStats()
    new_qp, codes = rounded_weight(node, w, qp, _ctx(), stats=stats)
    assert not pair_violations(_matrix(node, codes)).any()
    ratio = new_qp.scale / qp.scale
    assert np.all(ratio >= 1 - 1e-6) and np.all(ratio <= 2 + 1e-6) and np.any(ratio > 1)
    assert codes.min() >= -127 and codes.max() <= 127
    report = stats.to_dict()
    assert report["layers_fitted_to_kernels"] == 1 and report["pairs_over_limit_nearest"] > 0
    assert report["weight_error_vs_nearest"] >= 1.0 and report["channels_rescaled"] == int(np.sum(ratio > 1))


def test_per_tensor_power_of_two_and_asymmetric_grids_stay_what_they_are() -> None:
    w = _heavy(seed=1)
    node = _conv(w)
    pow2 = QuantSpec(bits=8, signed=True, symmetric=True, granularity=Granularity.TENSOR, narrow=True,
                     scale_kind=ScaleKind.POW2)
    qp = weight_qparams(w, pow2, "minmax")
    new_qp, codes = rounded_weight(node, w, qp, _ctx())
    assert np.asarray(new_qp.scale).size == 1 and is_power_of_two(np.asarray(new_qp.scale)).all()
    assert not pair_violations(_matrix(node, codes)).any()
    asym = QuantSpec(bits=8, signed=True, symmetric=False, granularity=Granularity.CHANNEL, axis=0)
    qa = weight_qparams(w, asym, "minmax")
    new_qa, codes_a = rounded_weight(node, w, qa, _ctx())
    assert not pair_violations(_matrix(node, codes_a)).any()
    err = np.abs((codes_a - new_qa.zero_point.reshape(-1, 1, 1, 1)) * new_qa.scale.reshape(-1, 1, 1, 1) - w)
    assert err.max() <= 2 * new_qa.scale.max()  # the zero-point moved with the scale: the grid still covers w


def test_narrow_grids_and_depthwise_convs_need_no_fitting() -> None:
    w = _heavy()
    int2 = QuantSpec(bits=2, signed=True, symmetric=False, granularity=Granularity.CHANNEL, axis=0)
    qp = weight_qparams(w, int2, "minmax")
    assert np.array_equal(rounded_weight(_conv(w), w, qp, _ctx())[1], quantize(w, qp))
    dw = _heavy((6, 1, 3, 3))
    qd = weight_qparams(dw, PER_CHANNEL, "minmax")
    assert np.array_equal(rounded_weight(_conv(dw, group=6), dw, qd, _ctx())[1], quantize(dw, qd))


def _output_error(w: np.ndarray, qp: QParams, codes: np.ndarray, hessian: np.ndarray) -> float:
    layout = gemm_layout("Conv", {}, w.shape)
    scale = np.asarray(qp.scale, np.float64).reshape(-1, 1)
    d = layout.to_matrix(codes.astype(np.float64)) * scale - layout.to_matrix(w.astype(np.float64))
    return float(np.sum((d @ hessian[0]) * d))


@pytest.mark.parametrize("kernels", ["int32", "portable"])
def test_gptq_lowers_the_output_error_of_nearest_rounding(kernels) -> None:
    rng = np.random.default_rng(2)
    w = _heavy()
    k = 6 * 9
    x = rng.normal(size=(5000, k)) @ rng.normal(size=(k, k)) / np.sqrt(k)  # correlated receptive fields
    hessian = (x.T @ x / len(x))[None]
    spec = QuantSpec(bits=4, signed=True, symmetric=True, granularity=Granularity.CHANNEL, axis=0) \
        if kernels == "int32" else PER_CHANNEL
    qp = weight_qparams(w, spec, "minmax")
    stats = RoundingStats()
    gptq_qp, gptq = rounded_weight(_conv(w), w, qp, _ctx(kernels, onnxq.GPTQ(), hessian), stats=stats)
    near_qp, near = rounded_weight(_conv(w), w, qp, _ctx(kernels, onnxq.RoundToNearest()))
    assert _output_error(w, gptq_qp, gptq, hessian) < 0.8 * _output_error(w, near_qp, near, hessian)
    if kernels == "portable":  # both within the limit; GPTQ spreads the trims over correlated inputs
        assert not pair_violations(_matrix(_conv(w), gptq)).any()
    else:
        assert stats.to_dict()["output_error_vs_nearest"] < 0.8
