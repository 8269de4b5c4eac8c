"""TuneStatsPass / TuneBiasPass: emitted structure, restored statistics (sequentially), exact INT32 biases,
lower output error than plain round-to-nearest."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxq.passes.tune.tune_bias import TuneBiasPass
from onnxq.passes.tune.tune_stats import ChannelStats, TuneStatsPass

from onnxq.api import quantize
from onnxq.config.legacy import QuantConfig
from onnxq.core.graph import to_graph
from onnxq.data.capture import capture
from onnxq.errors import PassError
from tests.helpers import init_array, make_context, make_model, run_ort

HEAD = '<ir_version: 8, opset_import: ["" : 13]>'
TEXT = f"""{HEAD}
    g (float[N,4,8,8] x) => (float[N,5] y)
      <float[8,4,3,3] w1, float[8] b1, float[8,8,3,3] w2, float[8] b2, float[8,8,1,1] w3, float[5,8] wf, float[5] bf> {{
        c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
        r1 = Relu (c1)
        c2 = Conv <pads=[1,1,1,1]> (r1, w2, b2)
        r2 = Relu (c2)
        c3 = Conv (r2, w3)
        r3 = Relu (c3)
        p = GlobalAveragePool (r3)
        f = Flatten (p)
        y = Gemm <transB=1> (f, wf, bf)
    }}"""
LAYERS = ("c1", "c2", "c3")


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return make_model(TEXT, seed=0, b1=(0.5 * rng.standard_normal(8)).astype(np.float32),
                      b2=(0.5 * rng.standard_normal(8)).astype(np.float32))


def _feeds(seed: int, n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    mean = np.array([1.0, 0.5, 2.0, 1.5], dtype=np.float32).reshape(1, 4, 1, 1)
    return [{"x": (mean + rng.standard_normal((16, 4, 8, 8))).astype(np.float32)} for _ in range(n)]


def _quantize(model, **tuning):
    cfg = QuantConfig(weight_bits=4, first_last_bits=None, validate=False, **tuning)
    return quantize(model, _feeds(1, 4), cfg, validation=_feeds(9, 1))


@pytest.fixture(scope="module")
def results(model):
    return {"rtn": _quantize(model), "stats": _quantize(model, stats_tuning=True),
            "bias": _quantize(model, bias_tuning=True)}


def _stats(m: onnx.ModelProto, feeds) -> dict[str, ChannelStats]:
    stats = {n: ChannelStats(1) for n in LAYERS}
    capture(m, list(LAYERS), feeds, lambda k, v: stats[k].update(v))
    return stats


def _init(m: onnx.ModelProto, name: str) -> np.ndarray:
    return init_array(m, name)


def _dq_inputs(m: onnx.ModelProto, tensor: str) -> list[str]:
    return list(next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == tensor).input)


def _layer(m: onnx.ModelProto, out: str) -> onnx.NodeProto:
    return next(n for n in m.graph.node if n.op_type == "Conv" and n.output[0] == out)


def test_structure_and_exact_int32_bias(results):
    for kind in ("stats", "bias"):
        m = results[kind].model
        rtn = results["rtn"].model
        # one DQ more: c3 had no bias and gets an INT32 one
        assert [n.op_type for n in m.graph.node].count("DequantizeLinear") == \
               [n.op_type for n in rtn.graph.node].count("DequantizeLinear") + 1
        assert len(_layer(rtn, "c3").input) == 2 and len(_layer(m, "c3").input) == 3
        report = results[kind].report[f"{kind}_tuning"]
        assert [e["node"] for e in report["layers"]] == [f"Conv({c})" for c in LAYERS]  # unnamed: op(output)
        assert report["skipped"][0]["reason"].startswith("last weighted layer")
        for c in LAYERS:
            node = _layer(m, c)
            x_dq, w_dq, b_dq = (_dq_inputs(m, t) for t in node.input)
            s_in = _init(m, x_dq[1])
            s_w = _init(m, w_dq[1])
            codes, s_b = _init(m, b_dq[0]), _init(m, b_dq[1])
            assert codes.dtype == np.int32 and s_b.dtype == np.float32
            # the grid onnxruntime's integer kernels assume: s_b = float32(s_in * s_w), bit for bit
            assert np.array_equal(s_b, (s_w.astype(np.float64) * float(s_in)).astype(np.float32))
            w_codes = _init(m, w_dq[0])
            rtn_node = _layer(rtn, c)
            assert np.array_equal(w_codes, _init(rtn, _dq_inputs(rtn, rtn_node.input[1])[0]))  # codes kept
            rtn_scale = _init(rtn, _dq_inputs(rtn, rtn_node.input[1])[1])
            if kind == "bias":
                assert np.array_equal(s_w, rtn_scale)  # bias tuning leaves the weight scale alone
            else:
                assert not np.allclose(s_w, rtn_scale) and np.all(s_w / rtn_scale <= 4.0 + 1e-6)
        # the last layer is untouched
        fc = next(n for n in m.graph.node if n.op_type == "Gemm")
        fc_rtn = next(n for n in rtn.graph.node if n.op_type == "Gemm")
        assert np.array_equal(_init(m, _dq_inputs(m, fc.input[2])[0]), _init(rtn, _dq_inputs(rtn, fc_rtn.input[2])[0]))


def test_statistics_restored_sequentially(model, results):
    """Every tuned layer's output mean (and std for stats tuning) equals the float model's on the
    calibration data *in the final model*: each layer was tuned after the earlier ones. For bias
    tuning this is also the optimality condition: the gradient of the layer's output MSE in its
    bias, 2 E[z_q - z_f], vanishes (up to the INT32 grid), so optimiser steps could not lower it."""
    feeds = _feeds(1, 4)
    fl = _stats(model, feeds)
    for kind in ("stats", "bias"):
        m = results[kind].model
        q = _stats(m, feeds)
        for c in LAYERS:
            # exact up to the INT32 bias grid: |error| <= s_b / 2 per channel (4-bit weights: s_b ~ 1e-2)
            s_b = _init(m, _dq_inputs(m, _layer(m, c).input[2])[1]).astype(np.float64)
            assert np.all(np.abs(q[c].mean - fl[c].mean) <= 0.5 * s_b * (1 + 1e-3) + 1e-6), f"{kind} {c}"
            if kind == "stats":
                np.testing.assert_allclose(q[c].std, fl[c].std, rtol=2e-3, err_msg=c)
    rtn = _stats(results["rtn"].model, feeds)
    assert max(np.max(np.abs(rtn[c].mean - fl[c].mean) / np.maximum(fl[c].std, 1e-3)) for c in LAYERS) > 0.02


def test_tuning_lowers_the_output_error(model, results):
    held = _feeds(5, 4)
    ref = np.concatenate([run_ort(model, f)[0] for f in held])

    def mse(m):
        return float(np.mean((np.concatenate([run_ort(m, f)[0] for f in held]) - ref) ** 2))

    base = mse(results["rtn"].model)
    assert mse(results["stats"].model) < 0.8 * base
    assert mse(results["bias"].model) < 0.8 * base


def test_pass_needs_reference_and_calibration(model):
    graph = to_graph(model)
    with pytest.raises(PassError, match="ctx.calib and ctx.reference"):
        TuneBiasPass()(graph, make_context(QuantConfig()))
    assert TuneStatsPass(match_std=False).report_key == "stats_tuning" and TuneBiasPass().match_std is False


def test_channel_stats_streaming():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((10, 3, 4, 4)) * np.array([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1) + 5
    s = ChannelStats(1)
    s.update(a[:4])
    s.update(a[4:])
    flat = np.moveaxis(a, 1, 0).reshape(3, -1)
    np.testing.assert_allclose(s.mean, flat.mean(axis=1))
    np.testing.assert_allclose(s.std, flat.std(axis=1))


def test_cli_flags_reach_the_passes(tmp_path):
    import json

    from onnxq.cli import main

    out = tmp_path / "q.onnx"
    assert main(["quantize", "models/tiny_cnn.onnx", "-o", str(out), "--calib", "models/tiny_cnn_calib.npz",
                 "--batch-size", "16", "--weights", "int4", "--no-validate", "--stats-tuning", "--bias-tuning"]) == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["config"]["tuning"]["stats_tuning"] and report["config"]["tuning"]["bias_tuning"]
    passes = [p["pass"] for p in report["passes"]]
    assert passes.index("TuneStatsPass") < passes.index("TuneBiasPass") < passes.index("CleanupPass")
    assert passes[-3:] == ["CleanupPass", "ExportTwoBitPass", "WidenInt4Pass"]
    assert len(report["stats_tuning"]["layers"]) == 5 and report["int4_cast_to_int8"] == 4


RESIDUAL = f"""{HEAD}
    g (float[N,4,8,8] x) => (float[N,5] y)
      <float[8,4,3,3] w1, float[8] b1, float[8,8,3,3] w2, float[8] b2, float[8,8,1,1] w3, float[8] b3,
       float[8,8,3,3] w4, float[8] b4, float[5,8] wf, float[5] bf> {{
        c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
        r1 = Relu (c1)
        c2 = Conv <pads=[1,1,1,1]> (r1, w2, b2)
        r2 = Relu (c2)
        c3 = Conv (r2, w3, b3)
        s = Add (r1, c3)
        c4 = Conv <pads=[1,1,1,1], strides=[2,2]> (s, w4, b4)
        r4 = Relu (c4)
        p = GlobalAveragePool (r4)
        f = Flatten (p)
        y = Gemm <transB=1> (f, wf, bf)
    }}"""


@pytest.mark.parametrize("kind", ["stats_tuning", "bias_tuning"])
@pytest.mark.parametrize("text", [TEXT, RESIDUAL], ids=["chain", "residual"])
def test_segmented_forward_equals_one_run_per_layer(kind, text, monkeypatch):
    """The cached-cut sweep (onnxq.data.forward_cache) writes the very bytes of the truncated-graph sweep."""
    import onnxq.passes.tune.tune_stats as ts

    model = make_model(text, seed=4)
    calls = []
    real = ts.ForwardCache.layer_output
    monkeypatch.setattr(ts.ForwardCache, "layer_output", lambda self, *a: calls.append(a[1]) or real(self, *a))
    fast = _quantize(model, **{kind: True})
    assert len(calls) == len(fast.report[kind]["layers"]) >= 3
    monkeypatch.setattr(ts, "supports_segments", lambda m: False)
    slow = _quantize(model, **{kind: True})
    assert fast.model.SerializeToString() == slow.model.SerializeToString()
