"""CorrectBiasPass: the clipped-normal mean, removal of the mean output shift of 4-bit weights, plumbing."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxq.passes.export.cleanup import CleanupPass
from onnxq.passes.float.fold_batchnorm import FoldBatchNormPass
from onnxq.passes.quant.assign_specs import AssignSpecsPass
from onnxq.passes.quant.calibrate import CalibratePass
from onnxq.passes.quant.correct_bias import CorrectBiasPass, clipped_normal_mean
from onnxq.passes.quant.insert_qdq import InsertQDQPass

from onnxq.config.legacy import QuantConfig
from onnxq.core.context import QuantContext
from onnxq.core.graph import infer_shapes, to_graph, to_model
from onnxq.core.pass_infra import Pass
from onnxq.core.spec import INT32_BIAS
from onnxq.errors import PassError, UserError
from onnxq.targets.profiles import get_target
from tests.helpers import make_context, make_model, run_ort

HEAD = '<ir_version: 10, opset_import: ["" : 21]>'
W4 = QuantConfig(weight_bits=4, first_last_bits=None, per_channel=False, validate=False)


@pytest.mark.parametrize("lo,hi", [(0.0, np.inf), (0.0, 6.0), (-np.inf, np.inf), (-1.0, 2.0), (-np.inf, 0.5)])
def test_clipped_normal_mean_matches_monte_carlo(lo, hi):
    rng = np.random.default_rng(0)
    mu = np.array([-2.0, 0.0, 1.0, 5.5, 3.0])
    sigma = np.array([1.0, 2.0, 0.5, 1.5, -2.0])  # the sign of gamma is ignored
    samples = mu[:, None] + np.abs(sigma)[:, None] * rng.standard_normal((5, 400_000))
    expected = np.clip(samples, lo, hi).mean(axis=1)
    np.testing.assert_allclose(clipped_normal_mean(mu, sigma, lo, hi), expected, atol=0.01)
    # Relu closed form: sigma phi(mu / sigma) + mu Phi(mu / sigma); sigma = 0 gives clip(mu)
    np.testing.assert_allclose(clipped_normal_mean(np.array([1.0, -1.0]), np.zeros(2), lo, hi),
                               np.clip([1.0, -1.0], lo, hi))


def initializer_of(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def _quantize(model: onnx.ModelProto, config: QuantConfig, calib: list, correct: str | None,
              fold: bool = False) -> tuple[onnx.ModelProto, QuantContext]:
    """The quantization pipeline of onnxq.api, with CorrectBiasPass between calibration and QDQ."""
    graph = to_graph(infer_shapes(model))
    ctx = make_context(config, target=get_target(config.target))
    ctx.calib = calib
    passes: list[Pass] = [FoldBatchNormPass()] if fold else []
    passes += [AssignSpecsPass(), CalibratePass()]
    passes += [CorrectBiasPass(source=correct)] if correct else []
    passes += [InsertQDQPass(), CleanupPass()]
    for p in passes:
        p(graph, ctx)
    out = to_model(graph, template=model)
    onnx.checker.check_model(out)
    return out, ctx


def _mean_shift(model: onnx.ModelProto, quantized: onnx.ModelProto, feeds: list) -> np.ndarray:
    """Per output channel: mean over the data of quantized - float output."""
    diffs = [(run_ort(quantized, f)[0] - run_ort(model, f)[0]).astype(np.float64) for f in feeds]
    return np.mean([d.mean(axis=(0, 2, 3)) for d in diffs], axis=0)


def _positive_feeds(seed: int, n: int, shape: tuple[int, ...]) -> list[dict[str, np.ndarray]]:
    """Inputs with clearly non-zero per-channel means (like post-ReLU activations)."""
    rng = np.random.default_rng(seed)
    means = np.array([2.0, 0.5, 3.0, 1.0, 1.5, 2.5, 0.8, 1.2])[: shape[1]].reshape(1, -1, 1, 1)
    return [{"x": (means + 0.5 * rng.standard_normal(shape)).astype(np.float32)} for _ in range(n)]


def test_data_source_removes_mean_output_shift_of_4bit_weights():
    rng = np.random.default_rng(1)
    model = make_model(f"""{HEAD}
        g (float[N,8,6,6] x) => (float[N,16,6,6] y) <float[16,8,1,1] w> {{
            y = Conv (x, w)
        }}""", w=rng.standard_normal((16, 8, 1, 1)).astype(np.float32))
    calib = _positive_feeds(2, 6, (4, 8, 6, 6))
    plain, _ = _quantize(model, W4, calib, None)
    corrected, ctx = _quantize(model, W4, calib, "data")
    before, after = _mean_shift(model, plain, calib), _mean_shift(model, corrected, calib)
    assert np.max(np.abs(before)) > 0.2
    assert np.max(np.abs(after)) < 0.1 * np.max(np.abs(before)), (before, after)
    # a layer without a bias got one, planned and stored as INT32 behind a DequantizeLinear
    rep = ctx.report["bias_correction"]
    assert rep["source"] == "data" and len(rep["layers"]) == 1 and rep["layers"][0]["max_abs_shift"] > 0.2
    conv = next(n for n in corrected.graph.node if n.op_type == "Conv")
    new_bias = [k for k in ctx.specs if k.endswith("biascorr")]
    assert len(conv.input) == 3 and len(new_bias) == 1 and ctx.specs[new_bias[0]] is INT32_BIAS
    bias_dq = next(n for n in corrected.graph.node if n.output[0] == conv.input[2])
    assert bias_dq.op_type == "DequantizeLinear"
    bias_codes = next(i for i in corrected.graph.initializer if i.name == bias_dq.input[0])
    assert bias_codes.data_type == onnx.TensorProto.INT32
    # InsertQDQPass quantized the weight with the QParams the correction was computed for
    w_dq = next(n for n in corrected.graph.node if n.output[0] == conv.input[1])
    scale = initializer_of(corrected, w_dq.input[1])
    np.testing.assert_array_equal(scale, ctx.qparams["w"].scale)


def test_second_run_does_not_correct_twice():
    model = make_model(f"""{HEAD}
        g (float[N,8,6,6] x) => (float[N,4,6,6] y) <float[4,8,1,1] w, float[4] b> {{
            y = Conv (x, w, b)
        }}""", seed=4)
    graph = to_graph(infer_shapes(model))
    ctx = make_context(W4, target=get_target(W4.target))
    ctx.calib = _positive_feeds(1, 2, (2, 8, 6, 6))
    for p in (AssignSpecsPass(), CalibratePass(), CorrectBiasPass()):
        p(graph, ctx)
    bias = np.asarray(graph.nodes[0].inputs[2].values).copy()
    CorrectBiasPass()(graph, ctx)
    np.testing.assert_array_equal(np.asarray(graph.nodes[0].inputs[2].values), bias)
    assert len(ctx.report["bias_correction"]["layers"]) == 1 and not ctx.report["passes"][-1]["modified"]


def test_existing_bias_spec_moves_to_the_corrected_bias():
    rng = np.random.default_rng(3)
    model = make_model(f"""{HEAD}
        g (float[N,4,6,6] x) => (float[N,6,4,4] y) <float[6,4,3,3] w, float[6] b> {{
            y = Conv (x, w, b)
        }}""", w=rng.standard_normal((6, 4, 3, 3)).astype(np.float32), seed=3)
    calib = _positive_feeds(4, 4, (2, 4, 6, 6))
    plain, _ = _quantize(model, W4, calib, None)
    corrected, ctx = _quantize(model, W4, calib, "data")
    assert "b" not in ctx.specs and sum(spec is INT32_BIAS for spec in ctx.specs.values()) == 1
    before, after = _mean_shift(model, plain, calib), _mean_shift(model, corrected, calib)
    assert np.max(np.abs(after)) < 0.2 * np.max(np.abs(before)), (before, after)


def test_bn_source_analytic_mean_through_relu():
    # x ~ N(0, 1) per pixel; 1x1 conv1 gives channel o ~ N(0, |W1_o|^2); the BN normalizes it exactly,
    # so the BN output is N(beta, gamma^2) as the data-free correction assumes.
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((8, 3, 1, 1)).astype(np.float32)
    var = (np.sum(w1.astype(np.float64) ** 2, axis=(1, 2, 3)) - 1e-5).astype(np.float32)
    model = make_model(f"""{HEAD}
        g (float[N,3,6,6] x) => (float[N,10,6,6] y)
          <float[8,3,1,1] w1, float[8] g, float[8] be, float[8] mu, float[8] var, float[10,8,1,1] w2> {{
            c = Conv (x, w1)
            a = BatchNormalization (c, g, be, mu, var)
            r = Relu (a)
            y = Conv (r, w2)
        }}""", w1=w1, var=var, mu=np.zeros(8, np.float32), g=rng.uniform(0.5, 2, 8).astype(np.float32),
        be=rng.uniform(-1, 2, 8).astype(np.float32), w2=rng.standard_normal((10, 8, 1, 1)).astype(np.float32))
    model.graph.node[0].name = "conv1"
    config = QuantConfig(weight_bits=4, first_last_bits=None, per_channel=False, validate=False,
                         exclude=("conv1",))
    feeds = [{"x": rng.standard_normal((8, 3, 6, 6)).astype(np.float32)} for _ in range(4)]
    plain, _ = _quantize(model, config, feeds, None, fold=True)
    corrected, ctx = _quantize(model, config, feeds, "bn", fold=True)
    rep = ctx.report["bias_correction"]
    assert [layer["node"] for layer in rep["layers"]] != [] and rep["skipped"] == []
    beta, gamma = ctx.bn_stats["a"]
    np.testing.assert_allclose(beta, initializer_of(model, "be"), rtol=1e-6)
    before, after = _mean_shift(model, plain, feeds), _mean_shift(model, corrected, feeds)
    assert np.max(np.abs(before)) > 0.1
    assert np.max(np.abs(after)) < 0.25 * np.max(np.abs(before)), (before, after)


def test_bn_source_skips_layers_without_statistics_and_gemm_is_corrected():
    rng = np.random.default_rng(6)
    model = make_model(f"""{HEAD}
        g (float[N,6] x) => (float[N,3] y) <float[5,6] w1, float[5] b1, float[3,5] w2, float[1,3] b2> {{
            h = Gemm <transB=1> (x, w1, b1)
            r = Relu (h)
            y = Gemm <transB=1, alpha=0.5, beta=2.0> (r, w2, b2)
        }}""", w1=rng.standard_normal((5, 6)).astype(np.float32), seed=6)
    feeds = [{"x": (1.0 + rng.standard_normal((16, 6))).astype(np.float32)} for _ in range(3)]
    _, ctx = _quantize(model, W4, feeds, "bn")
    rep = ctx.report["bias_correction"]
    assert len(rep["skipped"]) == 2 and rep["layers"] == []
    plain, _ = _quantize(model, W4, feeds, None)
    corrected, ctx = _quantize(model, W4, feeds, "data")
    assert len(ctx.report["bias_correction"]["layers"]) == 2
    gemm = [n for n in corrected.graph.node if n.op_type == "Gemm"][1]
    assert next(a.f for a in gemm.attribute if a.name == "beta") == 1.0  # beta * C baked into the new bias
    def shift(q: onnx.ModelProto) -> np.ndarray:
        return np.mean([(run_ort(q, f)[0] - run_ort(model, f)[0]).mean(axis=0) for f in feeds], axis=0)

    assert np.max(np.abs(shift(corrected))) < 0.5 * np.max(np.abs(shift(plain)))


def test_requirements_and_options():
    with pytest.raises(UserError):
        CorrectBiasPass(source="analytic")
    model = make_model(f"""{HEAD}
        g (float[N,4,6,6] x) => (float[N,6,6,6] y) <float[6,4,1,1] w> {{
            y = Conv (x, w)
        }}""")
    graph = to_graph(infer_shapes(model))
    ctx = make_context(W4, target=get_target(W4.target))
    with pytest.raises(PassError):
        CorrectBiasPass()(graph, ctx)  # no specs yet
    AssignSpecsPass()(graph, ctx)
    with pytest.raises(PassError):
        CorrectBiasPass(source="data")(graph, ctx)  # no calibration data
