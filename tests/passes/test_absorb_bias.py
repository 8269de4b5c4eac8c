"""AbsorbBiasPass: exactness where pre-activations >= c, the shift formulas, BN statistics, refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxq.passes.float.absorb_bias import AbsorbBiasPass
from onnxq.passes.float.equalize_weights import EqualizeWeightsPass
from onnxq.passes.float.fold_batchnorm import FoldBatchNormPass

from onnxq.config.legacy import QuantConfig
from onnxq.core.context import QuantContext
from onnxq.core.graph import to_graph, to_model
from onnxq.core.pass_infra import Pass
from onnxq.data.capture import session, with_outputs
from onnxq.errors import PassError, UserError
from tests.helpers import initializer, make_context, make_model, random_feeds, run_ort

HEAD = '<ir_version: 8, opset_import: ["" : 13]>'


def _run(model: onnx.ModelProto, passes: list[Pass],
         calib: list | None = None) -> tuple[onnx.ModelProto, QuantContext]:
    graph = to_graph(model)
    ctx = make_context(QuantConfig())
    ctx.calib = calib
    for p in passes:
        p(graph, ctx)
    out = to_model(graph, template=model)
    onnx.checker.check_model(out)
    return out, ctx


def _tensor(model: onnx.ModelProto, name: str, feeds: dict) -> np.ndarray:
    return np.asarray(session(with_outputs(model, [name])).run([name], feeds)[0])


def _bias(model: onnx.ModelProto, node_index: int) -> np.ndarray:
    return initializer(model, model.graph.node[node_index].input[2])


BN_MODEL = f"""{HEAD}
    g (float[N,3,6,6] x) => (float[N,5,6,6] y)
      <float[4,3,1,1] w1, float[4] b1, float[4] g, float[4] be, float[4] mu, float[4] var,
       float[5,4,1,1] w2> {{
        c = Conv (x, w1, b1)
        a = BatchNormalization (c, g, be, mu, var)
        r = Relu (a)
        y = Conv (r, w2)
    }}"""


def _bn_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return make_model(BN_MODEL, w1=(0.1 * rng.standard_normal((4, 3, 1, 1))).astype(np.float32),
                      g=np.array([1.0, -0.5, 2.0, 0.8], np.float32),
                      be=np.array([5.0, 4.0, 1.0, 7.0], np.float32),
                      mu=np.zeros(4, np.float32), var=np.ones(4, np.float32), seed=1)


def test_bn_source_is_exact_on_1x1_convs_when_preactivations_exceed_c():
    model = _bn_model()
    folded, ctx0 = _run(model, [FoldBatchNormPass()])
    beta, gamma = ctx0.bn_stats["a"]
    np.testing.assert_allclose(beta, [5, 4, 1, 7])
    np.testing.assert_allclose(gamma, [1, -0.5, 2, 0.8])
    out, ctx = _run(model, [FoldBatchNormPass(), AbsorbBiasPass(n_sigma=3.0)])
    c = np.maximum(beta - 3 * np.abs(gamma), 0)  # [2, 2.5, 0, 4.6]
    assert c[2] == 0 and np.all(c[[0, 1, 3]] > 0)
    np.testing.assert_allclose(_bias(out, 0), _bias(folded, 0) - c, rtol=1e-6)
    np.testing.assert_allclose(ctx.bn_stats["a"][0], beta - c)
    w2 = initializer(model, "w2")[:, :, 0, 0].astype(np.float64)
    np.testing.assert_allclose(_bias(out, 2), w2 @ c, rtol=1e-5, atol=1e-6)  # b2 = 0 + W2 . c
    rep = ctx.report["absorb_bias"]
    assert rep["pairs"] == 1 and rep["absorbed"][0]["channels"] == 3
    assert not rep["absorbed"][0]["inexact_borders"]
    feeds = random_feeds(model, seed=3, batch=4)
    assert np.all(_tensor(folded, "a", feeds) >= c[None, :, None, None])  # the premise of exactness
    np.testing.assert_allclose(run_ort(out, feeds)[0], run_ort(model, feeds)[0], rtol=1e-5, atol=1e-5)
    # the activation between the layers lost c: its range shrinks by c per channel
    np.testing.assert_allclose(_tensor(out, "r", feeds), _tensor(folded, "r", feeds) - c[None, :, None, None],
                               atol=1e-5)


def test_bn_source_needs_folded_statistics():
    model = _bn_model()
    out, ctx = _run(model, [AbsorbBiasPass()])  # no fold: no statistics
    rep = ctx.report["absorb_bias"]
    assert rep["pairs"] == 0 and rep["skipped"] == []  # the BN is still between the layers: no pair at all
    folded, _ = _run(model, [FoldBatchNormPass()])
    out, ctx = _run(folded, [AbsorbBiasPass()])  # a fresh context has no statistics
    assert "no BatchNormalization statistics" in ctx.report["absorb_bias"]["skipped"][0]["reason"]


def test_data_source_padded_depthwise_exact_inside_inexact_at_borders():
    rng = np.random.default_rng(2)
    model = make_model(f"""{HEAD}
        g (float[N,3,8,8] x) => (float[N,4,8,8] y)
          <float[4,3,1,1] w1, float[4] b1, float[4,1,3,3] wd, float[4] bd> {{
            a = Conv (x, w1, b1)
            r = Relu (a)
            y = Conv <group=4, pads=[1,1,1,1]> (r, wd, bd)
        }}""", w1=(0.2 * rng.standard_normal((4, 3, 1, 1))).astype(np.float32),
        b1=np.array([3.0, -4.0, 2.0, 5.0], np.float32), seed=2)
    calib = [random_feeds(model, seed=s, batch=2) for s in range(3)]
    out, ctx = _run(model, [AbsorbBiasPass(source="data")], calib=calib)
    c = np.maximum(np.min([_tensor(model, "a", f).min(axis=(0, 2, 3)) for f in calib], axis=0), 0)
    assert c[1] == 0 and np.all(c[[0, 2, 3]] > 1)
    np.testing.assert_allclose(_bias(out, 0), initializer(model, "b1") - c, rtol=1e-5)
    # depthwise: b2[i] += c_i sum_k W2[i, 0, k]
    wd = initializer(model, "wd").astype(np.float64)
    expected = initializer(model, "bd") + c * wd.sum(axis=(1, 2, 3))
    np.testing.assert_allclose(_bias(out, 2), expected, rtol=1e-5)
    assert ctx.report["absorb_bias"]["absorbed"][0]["inexact_borders"]
    for f in calib:
        ref, got = run_ort(model, f)[0], run_ort(out, f)[0]
        np.testing.assert_allclose(got[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], rtol=1e-5, atol=1e-5)
        assert np.max(np.abs(got[..., 0, :] - ref[..., 0, :])) > 1e-2  # zero padding now means c, not 0


@pytest.mark.parametrize("tb2", [0, 1])
def test_gemm_pair_data_source_exact(tb2):
    s2 = "3,6" if tb2 else "6,3"
    model = make_model(f"""{HEAD}
        g (float[N,4] x) => (float[N,3] y) <float[6,4] w1, float[6] b1, float[{s2}] w2, float[3] b2> {{
            h = Gemm <transB=1, beta=0.5> (x, w1, b1)
            r = Relu (h)
            y = Gemm <transB={tb2}, alpha=2.0, beta=3.0> (r, w2, b2)
        }}""", w1=(0.1 * np.random.default_rng(3).standard_normal((6, 4))).astype(np.float32),
        b1=np.array([6, 8, -2, 4, 10, 6], np.float32), seed=3)
    calib = [random_feeds(model, seed=s, batch=16) for s in range(2)]
    out, ctx = _run(model, [AbsorbBiasPass(source="data")], calib=calib)
    assert ctx.report["absorb_bias"]["absorbed"][0]["channels"] == 5
    for f in calib:
        np.testing.assert_allclose(run_ort(out, f)[0], run_ort(model, f)[0], rtol=1e-5, atol=1e-4)


def test_fold_equalize_absorb_chain_keeps_statistics_consistent():
    model = _bn_model()
    out, ctx = _run(model, [FoldBatchNormPass(), EqualizeWeightsPass(), AbsorbBiasPass()])
    beta, gamma = ctx.bn_stats["a"]
    # after CLE the BN-folded pre-activation is N(beta / s, (gamma / s)^2); absorption removed c >= 0
    assert ctx.report["equalize"]["pairs"] == 1 and ctx.report["absorb_bias"]["pairs"] == 1
    # beta - 3 |gamma| was absorbed where positive: now beta <= 3 |gamma|, with equality there
    assert np.all(beta <= 3 * np.abs(gamma) + 1e-9) and np.any(np.isclose(beta, 3 * np.abs(gamma)))
    feeds = random_feeds(model, seed=5, batch=4)
    np.testing.assert_allclose(run_ort(out, feeds)[0], run_ort(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_relu6_and_identity_pairs_are_skipped():
    model = make_model(f"""{HEAD}
        g (float[N,3,8,8] x) => (float[N,5,8,8] y) <float[6,3,1,1] w1, float[6] b1, float[6,6,1,1] w2,
                                                   float[5,6,1,1] w3> {{
            a = Conv (x, w1, b1)
            r = Clip (a, lo, hi)
            d = Conv (r, w2)
            y = Conv (d, w3)
        }}""", b1=np.full(6, 3.0, np.float32), lo=np.float32(0.0), hi=np.float32(6.0))
    calib = [random_feeds(model, seed=0)]
    out, ctx = _run(model, [AbsorbBiasPass(source="data")], calib=calib)
    reasons = [s["reason"] for s in ctx.report["absorb_bias"]["skipped"]]
    assert len(reasons) == 2
    assert any("bounded" in r for r in reasons) and any("identity" in r for r in reasons)
    np.testing.assert_array_equal(initializer(out, "b1"), initializer(model, "b1"))


def test_options_and_requirements():
    with pytest.raises(UserError):
        AbsorbBiasPass(source="stats")
    with pytest.raises(UserError):
        AbsorbBiasPass(n_sigma=-1)
    with pytest.raises(PassError):
        _run(_bn_model(), [AbsorbBiasPass(source="data")])
