"""EqualizeWeightsPass: float equivalence in onnxruntime, balanced ranges, refusals, ReLU6 handling."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnxq.passes.float.equalize_weights import EqualizeWeightsPass, in_ranges, out_ranges

from onnxq.core.graph import to_graph, to_model
from onnxq.core.spec import QuantSpec, fake_quantize, qparams_from_range
from onnxq.errors import UserError
from tests.helpers import initializer, make_context, make_model, op_types, random_feeds, run_ort, run_pass

HEAD = '<ir_version: 8, opset_import: ["" : 13]>'


def _unbalanced(shape: tuple[int, ...], seed: int, axis: int = 0, spread: float = 2.0) -> np.ndarray:
    """Random weights whose slices along ``axis`` have ranges spread over 10^-spread .. 10^spread."""
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-spread, spread, size=shape[axis])
    view = [1] * len(shape)
    view[axis] = -1
    return (rng.standard_normal(shape) * scales.reshape(view)).astype(np.float32)


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b)) / np.max(np.abs(a)))


def _check_same_function(model: onnx.ModelProto, out: onnx.ModelProto, batch: int = 2) -> None:
    feeds = random_feeds(model, seed=1, batch=batch)
    for a, b in zip(run_ort(model, feeds, "disable"), run_ort(out, feeds, "disable")):
        assert _rel_err(a, b) < 1e-4


def _equalize(model: onnx.ModelProto, **kwargs) -> tuple[onnx.ModelProto, dict]:
    out, ctx = run_pass(model, EqualizeWeightsPass(**kwargs))
    return out, ctx.report["equalize"]


def _weight(model: onnx.ModelProto, node_index: int) -> np.ndarray:
    return initializer(model, model.graph.node[node_index].input[1])


def _node_ranges(model: onnx.ModelProto, first: int, second: int) -> tuple[np.ndarray, np.ndarray]:
    g = to_graph(model)
    n1, n2 = g.nodes[first], g.nodes[second]
    return out_ranges(n1, np.asarray(n1.inputs[1].values)), in_ranges(n2, np.asarray(n2.inputs[1].values))


CONV_PAIR = f"""{HEAD}
    g (float[N,3,8,8] x) => (float[N,5,8,8] y)
      <float[6,3,3,3] w1, float[6] b1, float[5,6,3,3] w2, float[5] b2> {{
        a = Conv <pads=[1,1,1,1]> (x, w1, b1)
        r = Relu (a)
        y = Conv <pads=[1,1,1,1]> (r, w2, b2)
    }}"""


def test_conv_relu_conv_preserves_function_and_balances_ranges():
    model = make_model(CONV_PAIR, w1=_unbalanced((6, 3, 3, 3), 1), w2=_unbalanced((5, 6, 3, 3), 2, axis=1),
                       seed=1)
    r1, r2 = _node_ranges(model, 0, 2)
    out, rep = _equalize(model)
    assert rep["pairs"] == 1 and rep["converged"] and rep["skipped"] == []
    assert rep["iterations"] == 2  # one sweep equalizes a lone pair, the second finds s == 1
    new1, new2 = _node_ranges(out, 0, 2)
    np.testing.assert_allclose(new1, np.sqrt(r1 * r2), rtol=1e-5)
    np.testing.assert_allclose(new2, np.sqrt(r1 * r2), rtol=1e-5)
    assert not np.allclose(r1, r2, rtol=0.1)  # the test model really was unbalanced
    assert out.graph.node[0].input[1] != "w1" and out.graph.node[0].input[2] != "b1"  # fresh names
    _check_same_function(model, out)
    again, ctx = run_pass(out, EqualizeWeightsPass())  # already equalized: nothing to do
    assert not ctx.report["passes"][-1]["modified"]
    assert [i.name for i in again.graph.initializer] == [i.name for i in out.graph.initializer]


def test_pw_dw_pw_chain_converges_and_preserves_function():
    model = make_model(f"""{HEAD}
        g (float[N,4,8,8] x) => (float[N,5,8,8] y)
          <float[8,4,1,1] w1, float[8] b1, float[8,1,3,3] wd, float[8] bd, float[5,8,1,1] w2, float[5] b2> {{
            a = Conv (x, w1, b1)
            r = Relu (a)
            d = Conv <group=8, pads=[1,1,1,1]> (r, wd, bd)
            r2 = Relu (d)
            y = Conv (r2, w2, b2)
        }}""", w1=_unbalanced((8, 4, 1, 1), 3), wd=_unbalanced((8, 1, 3, 3), 4),
        w2=_unbalanced((5, 8, 1, 1), 5, axis=1))
    out, rep = _equalize(model, max_iters=200, tol=1e-9)
    assert rep["pairs"] == 2 and rep["converged"] and rep["iterations"] > 2
    for first, second in ((0, 2), (2, 4)):
        r1, r2 = _node_ranges(out, first, second)
        np.testing.assert_allclose(r1, r2, rtol=1e-5)
    _check_same_function(model, out)
    # max_iters bounds the sweeps and says it did not converge
    _, rep = _equalize(model, max_iters=2, tol=1e-9)
    assert rep["iterations"] == 2 and not rep["converged"]


@pytest.mark.parametrize("tb1,tb2", [(0, 0), (1, 1), (0, 1), (1, 0)])
def test_gemm_relu_gemm(tb1, tb2):
    s1 = "6,4" if tb1 else "4,6"
    s2 = "3,6" if tb2 else "6,3"
    w1 = _unbalanced((6, 4) if tb1 else (4, 6), 6, axis=0 if tb1 else 1)
    model = make_model(f"""{HEAD}
        g (float[N,4] x) => (float[N,3] y) <float[{s1}] w1, float[1,6] b1, float[{s2}] w2, float[3] b2> {{
            h = Gemm <transB={tb1}, alpha=0.5, beta=2.0> (x, w1, b1)
            r = Relu (h)
            y = Gemm <transB={tb2}, alpha=1.5> (r, w2, b2)
        }}""", w1=w1, seed=7)
    out, rep = _equalize(model)
    assert rep["pairs"] == 1 and rep["converged"]
    r1, r2 = _node_ranges(out, 0, 2)
    np.testing.assert_allclose(r1, r2, rtol=1e-5)
    assert initializer(out, out.graph.node[0].input[2]).shape == (6,)  # beta * C baked, beta = 1
    _check_same_function(model, out, batch=5)


def test_conv_without_bias_and_identity_pair():
    model = make_model(f"""{HEAD}
        g (float[N,3,8,8] x) => (float[N,5,6,6] y) <float[6,3,1,1] w1, float[5,6,3,3] w2> {{
            a = Conv (x, w1)
            y = Conv (a, w2)
        }}""", w1=_unbalanced((6, 3, 1, 1), 8))
    out, rep = _equalize(model)
    assert rep["pairs"] == 1 and op_types(out) == ["Conv", "Conv"]
    assert len(out.graph.node[0].input) == 2  # no bias appears
    _check_same_function(model, out)


def test_leaky_relu_and_grouped_conv():
    model = make_model(f"""{HEAD}
        g (float[N,4,8,8] x) => (float[N,6,8,8] y) <float[8,4,3,3] w1, float[8] b1, float[6,4,3,3] w2> {{
            a = Conv <pads=[1,1,1,1]> (x, w1, b1)
            r = LeakyRelu <alpha=0.1> (a)
            y = Conv <group=2, pads=[1,1,1,1]> (r, w2)
        }}""", w1=_unbalanced((8, 4, 3, 3), 9))
    out, rep = _equalize(model)
    assert rep["pairs"] == 1
    r1, r2 = _node_ranges(out, 0, 2)
    np.testing.assert_allclose(r1, r2, rtol=1e-5)
    _check_same_function(model, out)


def _assert_untouched(model: onnx.ModelProto, out: onnx.ModelProto) -> None:
    for init in model.graph.initializer:
        np.testing.assert_array_equal(initializer(out, init.name), onnx.numpy_helper.to_array(init))


def test_refusals_leave_weights_unchanged():
    shared = make_model(f"""{HEAD}
        g (float[N,3,8,8] x) => (float[N,5,8,8] y, float[N,6,8,8] z) <float[6,3,1,1] w1, float[5,6,1,1] w2> {{
            a = Conv (x, w1)
            r = Relu (a)
            y = Conv (r, w2)
            z = Conv (x, w1)
        }}""")
    branching = make_model(f"""{HEAD}
        g (float[N,3,8,8] x) => (float[N,5,8,8] y, float[N,6,8,8] z) <float[6,3,1,1] w1, float[5,6,1,1] w2> {{
            a = Conv (x, w1)
            z = Relu (a)
            y = Conv (z, w2)
        }}""")
    relu6 = make_model(f"""{HEAD}
        g (float[N,3,8,8] x) => (float[N,5,8,8] y) <float[6,3,1,1] w1, float[5,6,1,1] w2> {{
            a = Conv (x, w1)
            r = Clip (a, lo, hi)
            y = Conv (r, w2)
        }}""", lo=np.float32(0.0), hi=np.float32(6.0))
    for model, needle in ((shared, "shared"), (branching, "graph output"), (relu6, "bounded")):
        out, rep = _equalize(model)
        assert rep["pairs"] == 0 and len(rep["skipped"]) == 1, rep
        assert needle in rep["skipped"][0]["reason"]
        _assert_untouched(model, out)
        assert sorted(op_types(out)) == sorted(op_types(model))


def test_two_consumers_is_refused():
    model = make_model(f"""{HEAD}
        g (float[N,3,8,8] x) => (float[N,5,8,8] y, float[N,5,8,8] z) <float[6,3,1,1] w1, float[5,6,1,1] w2> {{
            a = Conv (x, w1)
            r = Relu (a)
            y = Conv (r, w2)
            z = Conv (r, w2)
        }}""")
    out, rep = _equalize(model)
    assert rep["pairs"] == 0 and "2 consumers" in rep["skipped"][0]["reason"]
    _assert_untouched(model, out)


def test_relu6_replace_changes_graph_then_preserves_new_function(caplog):
    text = f"""{HEAD}
        g (float[N,3,8,8] x) => (float[N,5,8,8] y) <float[6,3,1,1] w1, float[6] b1, float[5,6,1,1] w2> {{
            a = Conv (x, w1, b1)
            r = Clip (a, lo, hi)
            y = Conv (r, w2)
        }}"""
    w1 = _unbalanced((6, 3, 1, 1), 10, spread=1.0)
    model = make_model(text, w1=w1, lo=np.float32(0.0), hi=np.float32(6.0))
    as_relu = make_model(text.replace("Clip (a, lo, hi)", "Relu (a)"), w1=w1)
    with caplog.at_level(logging.WARNING):
        out, rep = _equalize(model, relu6="replace")
    assert rep["replaced_relu6"] == 1 and rep["pairs"] == 1
    assert op_types(out) == ["Conv", "Relu", "Conv"]
    assert any("replaced by Relu" in r.message for r in caplog.records)
    _check_same_function(as_relu, out)
    feeds = random_feeds(model, seed=1)
    feeds["x"] *= 20  # drive the activation above 6: the original function is really different
    assert _rel_err(run_ort(model, feeds)[0], run_ort(out, feeds)[0]) > 1e-3


def test_bn_stats_follow_the_scales():
    model = make_model(CONV_PAIR, w1=_unbalanced((6, 3, 3, 3), 11))
    graph = to_graph(model)
    from onnxq.config.legacy import QuantConfig

    ctx = make_context(QuantConfig())
    beta, gamma = np.linspace(-1, 1, 6), np.linspace(0.5, 2, 6)
    ctx.bn_stats["a"] = (beta, gamma)
    r1 = out_ranges(graph.nodes[0], np.asarray(graph.nodes[0].inputs[1].values, dtype=np.float64))
    EqualizeWeightsPass()(graph, ctx)
    new_r1 = out_ranges(graph.nodes[0], np.asarray(graph.nodes[0].inputs[1].values, dtype=np.float64))
    s = r1 / new_r1  # W1[i] / s_i
    np.testing.assert_allclose(ctx.bn_stats["a"][0], beta / s, rtol=1e-5)
    np.testing.assert_allclose(ctx.bn_stats["a"][1], gamma / s, rtol=1e-5)
    onnx.checker.check_model(to_model(graph))


def _per_tensor_int8_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every Conv weight replaced by its per-tensor symmetric int8 fake-quantized value."""
    spec = QuantSpec(bits=8, signed=True, symmetric=True, narrow=True)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    weights = {n.input[1] for n in out.graph.node if n.op_type == "Conv"}
    for init in out.graph.initializer:
        if init.name in weights:
            w = onnx.numpy_helper.to_array(init)
            qw = fake_quantize(w, qparams_from_range(w.min(), w.max(), spec))
            init.CopyFrom(onnx.numpy_helper.from_array(qw.astype(np.float32), init.name))
    return out


def _sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    ref, test = ref.astype(np.float64), test.astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - test) ** 2)))


def test_equalization_helps_per_tensor_int8_weights():
    # A balanced network rescaled per channel (W1[i] * k_i, W2[:, i] / k_i): the function is that of
    # the balanced one, but per-tensor int8 grids wipe out the channels with small k_i.
    rng = np.random.default_rng(12)
    k = 10.0 ** rng.uniform(-2, 2, size=16)
    w1 = (rng.standard_normal((16, 4, 1, 1)) * k[:, None, None, None]).astype(np.float32)
    b1 = (np.abs(rng.standard_normal(16)) * k).astype(np.float32)
    w2 = (rng.standard_normal((5, 16, 1, 1)) / k[None, :, None, None]).astype(np.float32)
    model = make_model(f"""{HEAD}
        g (float[N,4,8,8] x) => (float[N,5,8,8] y)
          <float[16,4,1,1] w1, float[16] b1, float[16,1,3,3] wd, float[16] bd, float[5,16,1,1] w2> {{
            a = Conv (x, w1, b1)
            r = Relu (a)
            d = Conv <group=16, pads=[1,1,1,1]> (r, wd, bd)
            r2 = Relu (d)
            y = Conv (r2, w2)
        }}""", w1=w1, b1=b1, w2=w2, seed=12)
    out, _ = _equalize(model, max_iters=50)
    feeds = random_feeds(model, seed=2, batch=4)
    ref = run_ort(model, feeds)[0]
    before = _sqnr_db(ref, run_ort(_per_tensor_int8_weights(model), feeds)[0])
    after = _sqnr_db(ref, run_ort(_per_tensor_int8_weights(out), feeds)[0])
    assert after > before + 20, (before, after)  # measured: 10.6 dB -> 48.4 dB


def test_bad_options():
    with pytest.raises(UserError):
        EqualizeWeightsPass(relu6="clip")
    with pytest.raises(UserError):
        EqualizeWeightsPass(max_iters=0)
