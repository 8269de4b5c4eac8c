"""GridBiasPass: float biases of the tensorrt profile sit on their INT32 grid, so onnxruntime (which
quantizes float biases itself) and exact float runtimes compute one function."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import onnx
import pytest
from onnxq.passes.quant.grid_bias import GridBiasPass, grid_sites

import onnxq
from onnxq.config.legacy import QuantConfig
from onnxq.core.graph import to_graph
from onnxq.core.qdq import grid_bias
from onnxq.core.spec import is_power_of_two
from onnxq.targets.profiles import TARGETS, get_target, resolve_config
from onnxq.targets.rules import check_target
from tests.helpers import make_context, make_model, run_ort

# Conv -> Relu -> depthwise Conv -> Clip: the first conv has a dead channel (weights ~1e-9, bias 0.75:
# its INT32 code overflows), the depthwise one large weights (a coarse bias grid s_in * s_w).
NET = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
  <float[4,3,3,3] w1, float[4] b1, float[4,1,3,3] w2, float[4] b2, float lo, float hi> {
    c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
    r1 = Relu (c1)
    c2 = Conv <pads=[1,1,1,1], group=4> (r1, w2, b2)
    y = Clip (c2, lo, hi)
}"""


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3
    w1[0] = rng.standard_normal((3, 3, 3)).astype(np.float32) * 1e-9  # dead channel
    b1 = np.array([0.75, 0.1, -0.2, 0.3], np.float32)
    w2 = (rng.standard_normal((4, 1, 3, 3)) * 3.0).astype(np.float32)
    b2 = rng.uniform(-1, 1, 4).astype(np.float32)
    return onnx.shape_inference.infer_shapes(make_model(
        NET, w1=w1, b1=b1, w2=w2, b2=b2, lo=np.array(-6, np.float32), hi=np.array(6, np.float32)))


def _feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(-1, 1, (4, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def _quantize(bias_grid: bool = True, **kw) -> onnx.ModelProto:
    # pow2 scales too: the pass keeps them powers of two for any profile that combines the two.
    target = dataclasses.replace(get_target("tensorrt"), bias_grid=bias_grid, scale_kinds=("float", "pow2"))
    config = QuantConfig(target="tensorrt", validate=False, **kw)
    with pytest.MonkeyPatch.context() as mp:  # the same profile without the pass, for the contrast
        mp.setitem(TARGETS, "tensorrt", target)
        return onnxq.quantize(_model(), _feeds(4, 0), config).model


def _float_biases(model: onnx.ModelProto) -> list[tuple[np.ndarray, float, np.ndarray]]:
    """(bias, s_in, s_w) of every op whose float bias onnxruntime would quantize."""
    out = []
    for node, dq_x, dq_w, b_idx in grid_sites(to_graph(model)):
        out.append((np.asarray(node.inputs[b_idx].values), float(np.asarray(dq_x.inputs[1].values)),
                    np.asarray(dq_w.inputs[1].values)))
    return out


def test_only_tensorrt_asks_for_grid_biases():
    assert {name for name, t in TARGETS.items() if t.bias_grid} == {"tensorrt"}


def test_grid_bias_round_trips_through_float32_division():
    rng = np.random.default_rng(1)
    b = rng.standard_normal(1000).astype(np.float32) * 10
    s_w = rng.uniform(1e-4, 1, 1000).astype(np.float32)
    s_in = np.float32(0.047)
    new = grid_bias(b, s_in, s_w)
    s_b = np.float32(s_in) * s_w  # onnxruntime: Mul in float32, Div in float32, Round
    k = np.round(new / s_b)
    assert np.array_equal((k.astype(np.float64) * s_b.astype(np.float64)).astype(np.float32), new)
    assert np.all(np.abs(new.astype(np.float64) - b) <= s_b.astype(np.float64) / 2 * (1 + 1e-6))
    assert np.any(new != b)


def test_tensorrt_output_means_the_same_in_every_onnxruntime_level():
    model = _quantize()
    assert check_target(model, "tensorrt") == []
    sites = _float_biases(model)
    assert len(sites) == 2
    for b, s_in, s_w in sites:
        assert np.array_equal(grid_bias(b, s_in, s_w), b)  # on the grid
        assert np.all(np.abs(b.astype(np.float64) / (np.float32(s_in) * s_w)) <= 2**31 - 1)
    feeds = _feeds(1, 7)[0]
    exact = run_ort(model, feeds, "disable")[0]  # float bias added as written
    fused = run_ort(model, feeds, "all")[0]  # bias quantized by onnxruntime itself
    np.testing.assert_allclose(fused, exact, rtol=0, atol=1e-5)
    # the dead channel keeps its bias: relu(0.75) through the depthwise conv is not lost
    assert np.abs(exact).max() > 0.1


def test_without_the_pass_onnxruntime_changes_the_bias():
    model = _quantize(bias_grid=False)
    feeds = _feeds(1, 7)[0]
    diff = np.abs(run_ort(model, feeds, "all")[0] - run_ort(model, feeds, "disable")[0])
    assert diff.max() > 0.05  # the overflowing channel wraps to -2^31 * s_b, the others round


def test_raised_scales_stay_powers_of_two():
    model = _quantize(scale_kind="pow2")
    for b, s_in, s_w in _float_biases(model):
        assert np.all(is_power_of_two(s_w))
        assert np.array_equal(grid_bias(b, s_in, s_w), b)


def test_pass_is_a_no_op_for_other_targets():
    graph = to_graph(_quantize(bias_grid=False))
    before = [np.asarray(t.values).copy() for t in graph.tensors().values() if hasattr(t, "values")]
    ctx = make_context(config=resolve_config(QuantConfig(target="ort-cpu")), target=get_target("ort-cpu"))
    assert not GridBiasPass()(graph, ctx).modified
    after = [np.asarray(t.values) for t in graph.tensors().values() if hasattr(t, "values")]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed")
def test_openvino_and_onnxruntime_agree_on_the_grid_biases():
    from onnxq.targets.openvino_check import run_openvino

    model = _quantize()
    feeds = _feeds(1, 7)[0]
    y_ov = run_openvino(model, feeds)[0]
    y_ort = run_ort(model, feeds, "all")[0]
    np.testing.assert_allclose(y_ov, y_ort, rtol=0, atol=2e-2)  # at most a rare one-step flip
    assert np.mean(np.abs(y_ov - y_ort) < 1e-4) > 0.99
