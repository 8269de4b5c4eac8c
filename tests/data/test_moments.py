"""Input second moments (onnxq.data.moments): the rows they average are the rows the op multiplies."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.core.gemm_layout import gemm_layout
from onnxq.data import moments as M
from onnxq.data.moments import InputMoments

CONVS = [
    ({"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]}, (8, 4, 3, 3), (2, 4, 9, 9)),
    ({"kernel_shape": [1, 1]}, (8, 4, 1, 1), (2, 4, 5, 5)),
    ({"kernel_shape": [1, 1], "strides": [2, 2]}, (8, 4, 1, 1), (2, 4, 5, 5)),
    ({"kernel_shape": [3, 3], "group": 2, "dilations": [2, 2], "pads": [2, 1, 2, 1]}, (6, 2, 3, 3), (1, 4, 9, 9)),
    ({"kernel_shape": [3, 3], "group": 4}, (8, 1, 3, 3), (1, 4, 7, 7)),
    ({"kernel_shape": [3, 2], "auto_pad": "SAME_UPPER", "strides": [2, 1]}, (3, 4, 3, 2), (1, 4, 8, 7)),
    ({"kernel_shape": [3, 2], "auto_pad": "SAME_LOWER", "strides": [2, 2]}, (3, 4, 3, 2), (1, 4, 7, 7)),
    ({"kernel_shape": [3], "pads": [1, 1]}, (3, 4, 3), (2, 4, 10)),
]


def _run(op: str, attrs: dict, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    node = helper.make_node(op, ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize(("attrs", "w_shape", "x_shape"), CONVS)
def test_conv_rows_times_the_weight_matrix_are_the_conv_output(attrs, w_shape, x_shape) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=x_shape).astype(np.float32)
    w = rng.normal(size=w_shape).astype(np.float32)
    y = _run("Conv", attrs, x, w)
    layout = gemm_layout("Conv", attrs, w_shape)
    rows = InputMoments("Conv", attrs, layout)._rows(x.astype(np.float64))  # (G, R, K_g): every position here
    mat = layout.to_matrix(w.astype(np.float64))
    per = mat.shape[0] // rows.shape[0]
    out = np.concatenate([rows[g] @ mat[g * per:(g + 1) * per].T for g in range(rows.shape[0])], axis=1)
    expect = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    assert np.allclose(out, expect, atol=1e-4)


@pytest.mark.parametrize(("op", "attrs", "x_shape", "w_shape"), [
    ("Gemm", {"transB": 1}, (5, 6), (3, 6)), ("Gemm", {}, (5, 6), (6, 3)), ("MatMul", {}, (2, 5, 6), (6, 3))])
def test_gemm_and_matmul_moments_are_the_mean_outer_product(op, attrs, x_shape, w_shape) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=x_shape)
    m = InputMoments(op, attrs, gemm_layout(op, attrs, w_shape))
    m.update(x[:1])
    m.update(x[1:])
    flat = x.reshape(-1, x.shape[-1])
    assert np.allclose(m.hessian()[0], flat.T @ flat / len(flat))


def test_large_maps_are_subsampled_and_huge_layers_skipped(monkeypatch) -> None:
    monkeypatch.setattr(M, "ROWS_PER_BATCH", 10)
    layout = gemm_layout("Conv", {}, (2, 3, 1, 1))
    m = InputMoments("Conv", {}, layout)
    m.update(np.ones((2, 3, 8, 8)))
    assert m.count <= 10 and np.allclose(m.hessian()[0], 1.0)
    monkeypatch.setattr(M, "MAX_K", 2)
    big = InputMoments("Conv", {}, layout)
    big.update(np.ones((1, 3, 2, 2)))
    assert not big.kept and big.hessian() is None
