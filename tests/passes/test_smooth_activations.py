"""SmoothActivationsPass: exact in float, folds into LayerNorm or inserts a Mul, lowers the quantized error."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxq.passes.float.smooth_activations import SmoothActivationsPass, _error, factors

from onnxq.config import Config, FloatPhase
from onnxq.core.graph import to_graph, to_model
from onnxq.errors import UserError
from tests.helpers import assert_close, initializer, make_context, make_model, op_types, run_ort

HEAD = '<ir_version: 8, opset_import: ["" : 17]>'

# LayerNorm feeding two weight MatMuls (Q/K-like) and, in the residual model, an Add as well.
LN_MODEL = f"""{HEAD}
    g (float[N,T,16] x) => (float[N,T,8] y, float[N,T,8] z)
      <float[16] gamma, float[16] beta, float[16,8] w1, float[16,8] w2> {{
        h = LayerNormalization <axis=-1> (x, gamma, beta)
        y = MatMul (h, w1)
        z = MatMul (h, w2)
    }}"""
RESIDUAL_MODEL = f"""{HEAD}
    g (float[N,16] x) => (float[N,16] r)
      <float[16] gamma, float[16] beta, float[16,16] w1, float[16,16] w3> {{
        h = LayerNormalization <axis=-1> (x, gamma, beta)
        y = MatMul (h, w1)
        e = Erf (y)
        o = Gemm <transB=1> (e, w3)
        r = Add (h, o)
    }}"""


def _outliers(model_text: str, **weights: np.ndarray) -> onnx.ModelProto:
    """LayerNorm whose gamma makes two channels 30x larger than the rest (a transformer's outliers)."""
    gamma = np.ones(16, np.float32)
    gamma[[3, 11]] = 30.0
    return make_model(model_text, gamma=gamma, beta=np.full(16, 0.1, np.float32), **weights)


def _feeds(n: int, seed: int, shape: tuple[int, ...] = (2, 5, 16)) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _smooth(model: onnx.ModelProto, pass_: SmoothActivationsPass, calib=None):
    graph = to_graph(model)
    ctx = make_context(Config())
    ctx.calib = _feeds(4, 1) if calib is None else calib
    pass_(graph, ctx)
    out = to_model(graph, template=model)
    onnx.checker.check_model(out)
    return out, ctx.report["smooth_activations"]


@pytest.mark.parametrize("alpha", [None, 0.5, 0.0, 1.0])
def test_layernorm_fold_is_exact_in_float(alpha) -> None:
    model = _outliers(LN_MODEL)
    out, report = _smooth(model, SmoothActivationsPass(alpha=alpha))
    assert report["tensors"], report
    assert report["tensors"][0]["folded_into"] and "Mul" not in op_types(out)  # into gamma/beta, no new op
    feeds = _feeds(1, 7)[0]
    assert_close(run_ort(out, feeds), run_ort(model, feeds), rtol=1e-5, atol=1e-5)
    if alpha != 0.0:  # alpha 0 only equalizes the weights' rows; otherwise the outlier channels shrink
        gamma = initializer(out, out.graph.node[0].input[1])
        assert np.max(np.abs(gamma)) / np.median(np.abs(gamma)) < 30.0


def test_residual_consumer_keeps_x_and_a_mul_feeds_the_matmul() -> None:
    model = _outliers(RESIDUAL_MODEL)
    out, report = _smooth(model, SmoothActivationsPass(alpha=0.5), calib=_feeds(4, 1, (6, 16)))
    smoothed = {t["tensor"]: t for t in report["tensors"]}
    assert smoothed["h"]["folded_into"] == "Mul"  # the residual Add still reads h
    assert "Mul" in op_types(out) and op_types(out).count("LayerNormalization") == 1
    add = next(n for n in out.graph.node if n.op_type == "Add")
    assert "h" in add.input
    feeds = _feeds(1, 3, (6, 16))[0]
    assert_close(run_ort(out, feeds), run_ort(model, feeds), rtol=1e-5, atol=1e-5)


def test_search_lowers_the_quantized_error_and_never_raises_it() -> None:
    model = _outliers(LN_MODEL)
    out, report = _smooth(model, SmoothActivationsPass())
    t = report["tensors"][0]
    assert t["alpha"] in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    assert t["error_after"] < 0.5 * t["error_before"]
    # no outliers: smoothing cannot win, the tensor is left alone
    flat = make_model(LN_MODEL, gamma=np.ones(16, np.float32), beta=np.zeros(16, np.float32))
    rows = np.random.default_rng(0).standard_normal((64, 16))
    w = [np.random.default_rng(1).standard_normal((16, 8))]
    assert _error(rows, w, np.ones(16), 8, 8) <= _error(rows, w, factors(np.abs(rows).max(0), np.abs(w[0]).max(1),
                                                                          0.5), 8, 8) * 1.5
    out_flat, report_flat = _smooth(flat, SmoothActivationsPass())
    assert len(report_flat["tensors"]) + len(report_flat["skipped"]) == 1


def test_factors_formula_and_limits() -> None:
    s = factors(np.array([4.0, 0.0, 1e12]), np.array([1.0, 2.0, 1e-12]), 0.5)
    assert s[0] == pytest.approx(2.0) and s[1] == 1.0 and s[2] == pytest.approx(1e4)


def test_bad_alpha_and_no_calibration_data() -> None:
    with pytest.raises(UserError, match="alpha"):
        SmoothActivationsPass(alpha=1.5)
    with pytest.raises(UserError, match="smooth_alpha"):
        FloatPhase(smooth_alpha=-0.1)
    model = _outliers(LN_MODEL)
    graph = to_graph(model)
    ctx = make_context(Config())
    ctx.calib = None
    assert not SmoothActivationsPass()(graph, ctx).modified


def test_end_to_end_w8a8_on_outliers_gets_closer_to_float() -> None:
    """Through the whole pipeline: --smooth lowers the quantized model's output error."""
    import onnxq

    model = _outliers(LN_MODEL)
    calib, held = _feeds(8, 1), _feeds(2, 9)
    errs = {}
    for smooth in (False, True):
        result = onnxq.quantize(model, calib, Config(float_phase=FloatPhase(smooth=smooth)), validation=held)
        q = result.model
        y, yq = run_ort(model, held[0]), run_ort(q, held[0])
        errs[smooth] = sum(float(np.sum((a - b) ** 2)) for a, b in zip(y, yq))
    assert errs[True] < 0.7 * errs[False], errs
