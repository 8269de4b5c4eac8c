"""The QDQ contract: names, finding a tensor's quantizers by following the graph, INT32 bias math."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

import onnxq
from onnxq.core import graph as g
from onnxq.core.qdq import (
    INT32_MAX,
    QDQNames,
    activation_qdq,
    base_of,
    bias_codes,
    bias_scale,
    constant_dq,
    dq_producing,
    fit_weight_scale,
    grid_bias,
    input_scale,
    quantized_name,
    quantized_source,
    weight_of,
)
from tests.helpers import make_model, random_feeds

TEXT = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,3,8,8] x) => (float[N,4,8,8] y) <float[4,3,3,3] w, float[4] b> {
    c = Conv <pads=[1,1,1,1]> (x, w, b)
    y = Relu (c)
}"""


def test_names_round_trip() -> None:
    n = QDQNames("conv1.weight")
    assert (n.quantized, n.dequantized, n.scale, n.zero_point) == (
        "conv1.weight_quantized", "conv1.weight_dequantized", "conv1.weight_scale", "conv1.weight_zero_point")
    assert n.node("DequantizeLinear") == "conv1.weight_DequantizeLinear"
    for role in ("quantized", "dequantized", "scale", "zero_point"):
        assert base_of(getattr(n, role), role) == "conv1.weight"
    assert base_of("conv1.weight_scale", "quantized") is None
    assert base_of("_scale", "scale") is None  # a bare suffix names no tensor
    with pytest.raises(ValueError, match="unknown QDQ role"):
        base_of("x_scale", "codes")


@pytest.fixture(scope="module")
def quantized_graph() -> gs.Graph:
    model = make_model(TEXT)
    feeds = [random_feeds(model, seed=s) for s in range(4)]
    config = onnxq.QuantConfig(activation_bits=4, first_last_bits=None, validate=False)
    return g.to_graph(onnxq.quantize(model, feeds, config).model)


def test_following_the_graph_finds_every_quantizer(quantized_graph: gs.Graph) -> None:
    conv = next(n for n in quantized_graph.nodes if n.op == "Conv")
    w_dq, b_dq, x_dq = dq_producing(conv.inputs[1]), dq_producing(conv.inputs[2]), dq_producing(conv.inputs[0])
    assert constant_dq(conv.inputs[1]) is w_dq and constant_dq(conv.inputs[0]) is None
    assert weight_of(w_dq) == "w" and weight_of(b_dq) == "b" and weight_of(x_dq) is None
    assert quantized_source(w_dq) is None
    x = quantized_source(x_dq)  # through the 4-bit grid's Clip
    assert x is not None and x.name == "x" and quantized_name(x_dq) == "x"
    found = activation_qdq(x)
    assert [n.op for n in found] == ["QuantizeLinear", "DequantizeLinear"] and found[1] is x_dq
    assert input_scale(conv) == pytest.approx(float(np.asarray(x_dq.inputs[1].values)))
    s_b = bias_scale(input_scale(conv), np.asarray(w_dq.inputs[1].values))
    np.testing.assert_array_equal(np.asarray(b_dq.inputs[1].values), s_b)


def test_bias_codes_round_half_to_even_and_saturate() -> None:
    s_b = np.array([1.0, 1.0, 0.5, 1e-9], dtype=np.float32)
    codes = bias_codes(np.array([2.5, -3.5, 0.25, 10.0]), s_b)
    assert codes.tolist() == [2, -4, 0, INT32_MAX]
    assert bias_scale(np.float32(0.1), np.array([0.3], dtype=np.float32)).dtype == np.float32


def test_bias_scale_is_the_rounded_float32_product() -> None:
    rng = np.random.default_rng(0)
    s_in, s_w = rng.uniform(1e-3, 1, 1000).astype(np.float32), rng.uniform(1e-4, 1, 1000).astype(np.float32)
    got = np.array([bias_scale(a, b) for a, b in zip(s_in, s_w, strict=True)])
    np.testing.assert_array_equal(got, s_in * s_w)  # numpy's float32 product is correctly rounded


def test_fit_weight_scale_raises_only_overflowing_channels() -> None:
    s_w = np.array([1e-3, 1e-12], dtype=np.float32)
    bias = np.array([1.0, 1.0])
    new, raised = fit_weight_scale(s_w, 1e-3, bias, pow2=False)
    assert raised.tolist() == [False, True] and new[0] == s_w[0]
    assert np.all(np.abs(bias_codes(bias, bias_scale(1e-3, new))) < INT32_MAX)
    new2, raised2 = fit_weight_scale(s_w, 1e-3, bias, pow2=True)
    assert raised2.tolist() == [False, True] and np.log2(new2[1]) == np.round(np.log2(new2[1]))
    same, none = fit_weight_scale(s_w[:1], 1e-3, bias[:1], pow2=False)
    assert not none.any() and same.tolist() == s_w[:1].tolist()
    per_tensor, raised_t = fit_weight_scale(np.float32(1e-12), 1e-3, bias, pow2=False)
    assert raised_t.shape == () and bool(raised_t) and per_tensor.shape == ()


def test_grid_bias_is_dequantized_codes() -> None:
    b = np.array([0.1234, -5.5, 3.0], dtype=np.float32)
    s_in, s_w = np.float32(0.02), np.array([0.01, 0.03, 0.5], dtype=np.float32)
    s_b = bias_scale(s_in, s_w)
    np.testing.assert_array_equal(grid_bias(b, s_in, s_w), (bias_codes(b, s_b) * s_b.astype(np.float64))
                                  .astype(np.float32))
