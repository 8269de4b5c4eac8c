"""Ternary weights end to end: onnxq.quantize with 2-bit weights, containers, the validator, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

import onnxq
from onnxq.cli import main
from onnxq.data.capture import with_outputs
from onnxq.errors import UserError
from onnxq.report.validate import validate
from onnxq.targets.profiles import resolve_config
from onnxq.targets.rules import check_target
from onnxq.ternary import export as ternary_export
from onnxq.ternary.check import METADATA_KEY, check_ternary, mark_two_bit_codes
from onnxq.ternary.operators import METHODS, MQUANT_DEFAULT, ternarize
from tests.helpers import NO_FLOOR_FLAGS, make_model, run_ort, without_floors

# Conv (axis 0), Conv with bias, Gemm transB=0 (axis 1), MatMul (last axis); Gemm and MatMul are the tail.
TEXT = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,3,8,8] x) => (float[N,5] y) <float[8,3,3,3] w1, float[12,8,3,3] w2, float[12] b2, float[12,10] w3,
                                         float[10] b3, float[10,5] w4> {
    c1 = Conv <pads=[1,1,1,1]> (x, w1)
    r1 = Relu (c1)
    c2 = Conv <pads=[1,1,1,1], strides=[2,2]> (r1, w2, b2)
    r2 = Relu (c2)
    p = GlobalAveragePool (r2)
    f = Flatten (p)
    h = Gemm (f, w3, b3)
    r3 = Relu (h)
    y = MatMul (r3, w4)
}"""
AXES = {"w1": 0, "w2": 0, "w3": 1, "w4": 1}


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return make_model(TEXT, seed=3)


@pytest.fixture(scope="module")
def calib() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((4, 3, 8, 8)).astype(np.float32)} for _ in range(6)]


def _inits(m: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in m.graph.initializer}


def _config(**kw) -> onnxq.Config:
    base = dict(weight_bits=2, first_last_bits=None, ternary_storage="int8")
    base.update(kw)
    return without_floors(onnxq.QuantConfig(**base))


def _dq_outputs(m: onnx.ModelProto, names: list[str], feed) -> dict[str, np.ndarray]:
    """Run the quantized model in onnxruntime with the weight DQ outputs as extra graph outputs."""
    outs = [n + "_dequantized" for n in names]
    values = run_ort(with_outputs(m, outs), feed, level="disable")
    return dict(zip([o.name for o in m.graph.output] + outs, values))


@pytest.mark.parametrize("method", METHODS)
def test_each_method_exports_the_operators_codes(model, calib, method):
    res = onnxq.quantize(model, calib, _config(ternary_method=method))
    q, inits = res.model, _inits(res.model)
    feed = calib[0]
    dq = _dq_outputs(q, list(AXES), feed)
    for w, axis in AXES.items():
        ref = ternarize(numpy_helper.to_array(_inits(model)[w]), method, axis=axis)
        codes = numpy_helper.to_array(inits[w + "_quantized"])
        assert inits[w + "_quantized"].data_type == TensorProto.INT8
        assert set(np.unique(codes).tolist()) <= {-1, 0, 1}
        np.testing.assert_array_equal(codes, ref.codes)  # exported as they are, never re-quantized
        scale = numpy_helper.to_array(inits[w + "_scale"])
        np.testing.assert_array_equal(scale, ref.scale)
        shape = [1] * codes.ndim
        shape[axis] = -1
        np.testing.assert_array_equal(dq[w + "_dequantized"], codes.astype(np.float32) * scale.reshape(shape))
    # INT32 biases use the final weight scale (the rule checker verifies s_b = s_in * s_w).
    assert check_target(q, "ort-cpu") == []
    assert res.validation.ok and res.validation.runs_enable_all
    t = res.report["ternary"]
    assert t["ok"] and t["method"] == method and t["storage"] == "int8" and t["total"]["layers"] == 4
    zeros = sum(int(np.sum(numpy_helper.to_array(inits[w + "_quantized"]) == 0)) for w in AXES)
    assert t["total"]["sparsity"] == pytest.approx(zeros / sum(numpy_helper.to_array(inits[w + "_quantized"]).size
                                                               for w in AXES), abs=1e-6)
    y_all = run_ort(q, feed)[0]
    np.testing.assert_allclose(y_all, run_ort(q, feed, level="disable")[0], atol=1e-4)


def test_first_last_stay_8bit_and_per_tensor(model, calib):
    res = onnxq.quantize(model, calib, _config(first_last_bits=8, ternary_method="tquant", per_channel=False))
    inits = _inits(res.model)
    assert sorted(res.report["ternary"]["total"]["containers"]) == ["int8"]
    assert {x["weight"] for x in res.report["ternary"]["layers"]} == {"w2", "w3"}
    codes_w1 = numpy_helper.to_array(inits["w1_quantized"])
    assert np.abs(codes_w1).max() > 1  # 8-bit first layer
    ref = ternarize(numpy_helper.to_array(_inits(model)["w2"]), "tquant", axis=None)
    np.testing.assert_array_equal(numpy_helper.to_array(inits["w2_quantized"]), ref.codes)
    assert numpy_helper.to_array(inits["w2_scale"]).shape == ()


@pytest.mark.parametrize("storage, dtype, opset", [("int4", TensorProto.INT4, 21), ("int8", TensorProto.INT8, 13)])
def test_containers(model, calib, storage, dtype, opset):
    res = onnxq.quantize(model, calib, _config(ternary_method="twn", ternary_storage=storage))
    inits = _inits(res.model)
    assert all(inits[w + "_quantized"].data_type == dtype for w in AXES)
    assert res.report["opset"] == opset and res.validation.ok
    t = res.report["ternary"]["total"]
    n = sum(int(np.prod(inits[w + "_quantized"].dims)) for w in AXES)
    scales = sum(int(np.prod(inits[w + "_scale"].dims)) for w in AXES)
    assert t["file_bytes"] == sum(-(-int(np.prod(inits[w + "_quantized"].dims)) * (4 if storage == "int4" else 8)
                                     // 8) for w in AXES) + 4 * scales
    assert t["fp32_bytes"] == 4 * n and t["effective_bytes"] == sum(
        -(-2 * int(np.prod(inits[w + "_quantized"].dims)) // 8) for w in AXES) + 4 * scales


def test_int2_container_validates_and_runs_at_every_level(model, calib):
    """int2 in the file; where onnxruntime cannot fuse int2 kernels each constant is read through a
    Cast to int8, and the model validates and computes what an int8 container computes."""
    res = onnxq.quantize(model, calib, _config(ternary_method="mquant-b", ternary_storage="int2"))
    q, inits = res.model, _inits(res.model)
    assert res.report["opset"] == 25 and all(inits[w + "_quantized"].data_type == TensorProto.INT2 for w in AXES)
    assert res.validation.ok
    onnx.checker.check_model(q, full_check=True)
    assert check_target(q, "ort-cpu") == []
    t = res.report["ternary"]
    assert t["ok"] and t["storage"] == "int2"
    assert t["total"]["file_bytes"] == t["total"]["effective_bytes"]  # 2 bits a weight + the scales
    assert all(layer["container"] == "int2" for layer in t["layers"]) and len(t["layers"]) == len(AXES)
    ok, why = ternary_export.int2_support()
    casts = [n for n in q.graph.node if n.op_type == "Cast"]
    if ok:
        assert not casts and "int2_cast_to_int8" not in t
    else:
        assert "int2" in why and "ORT_ENABLE_ALL" in why
        codes = {w + "_quantized" for w in AXES}
        assert {c.input[0] for c in casts} >= codes and t["int2_cast_to_int8"] == len(AXES)
        assert all(c.input[0] in codes or not numpy_helper.to_array(_inits(q)[c.input[0]]).any() for c in casts)
    int8 = onnxq.quantize(model, calib, _config(ternary_method="mquant-b", ternary_storage="int8", validate=False))
    feed = calib[1]
    for level in ("disable", "all"):
        np.testing.assert_allclose(run_ort(q, feed, level=level)[0], run_ort(int8.model, feed, level=level)[0],
                                   rtol=0, atol=0, err_msg=level)


def test_widen_weights_is_exact_and_idempotent_on_other_models(model, calib):
    from onnxq.core.weight_cast import widen_weights

    res = onnxq.quantize(model, calib, _config(ternary_storage="int2", validate=False))
    plain = onnx.ModelProto()
    plain.CopyFrom(res.model)
    for node in [n for n in plain.graph.node if n.op_type == "Cast"]:  # back to DQ(int2) directly
        for other in plain.graph.node:
            other.input[:] = [node.input[0] if i == node.output[0] else i for i in other.input]
        plain.graph.node.remove(node)
    wrapped = onnx.ModelProto()
    wrapped.CopyFrom(plain)
    assert widen_weights(wrapped) == len(AXES)
    onnx.checker.check_model(wrapped, full_check=True)
    feed = calib[2]
    np.testing.assert_array_equal(run_ort(plain, feed, level="disable")[0], run_ort(wrapped, feed, level="disable")[0])
    int8 = onnxq.quantize(model, calib, _config(ternary_storage="int8", validate=False)).model
    np.testing.assert_array_equal(run_ort(int8, feed, level="all")[0], run_ort(wrapped, feed, level="all")[0])
    before = int8.SerializeToString()
    assert widen_weights(int8) == 0 and int8.SerializeToString() == before


def test_auto_storage_follows_the_target_and_onnxruntime(monkeypatch):
    auto = resolve_config(onnxq.QuantConfig(weight_bits=2))
    assert auto.weights.storage == "int2" and auto.output_opset == 25
    assert resolve_config(onnxq.QuantConfig(weight_bits=2, target="tensorrt")).weights.storage == "int8"
    with pytest.raises(UserError, match="does not allow ternary storage int4"):
        resolve_config(onnxq.QuantConfig(weight_bits=2, target="tensorrt", ternary_storage="int4"))
    monkeypatch.setattr(ternary_export, "int2_support", lambda: (True, ""))
    assert resolve_config(onnxq.QuantConfig(weight_bits=2)).weights.storage == "int2"
    monkeypatch.setattr(ternary_export, "int2_support", lambda: (False, "no int2 kernels"))
    assert ternary_export.int2_needs_cast()
    assert resolve_config(onnxq.QuantConfig(weight_bits=2)).weights.storage == "int2"  # read through a Cast
    assert resolve_config(onnxq.QuantConfig(weight_bits=2, ternary_storage="int4")).output_opset == 21


def test_config_validation():
    assert onnxq.QuantConfig(ternary_method="mquant").ternary_method == MQUANT_DEFAULT
    with pytest.raises(UserError, match="ternary_method"):
        onnxq.QuantConfig(weight_bits=2, ternary_method="ternary")
    with pytest.raises(UserError, match="storage"):
        onnxq.QuantConfig(weight_bits=2, ternary_storage="int3")
    with pytest.raises(UserError, match="first_last_bits"):
        onnxq.QuantConfig(weight_bits=2, first_last_bits=2)


def _corrupt(m: onnx.ModelProto, name: str, value: int) -> onnx.ModelProto:
    bad = onnx.ModelProto()
    bad.CopyFrom(m)
    for i, t in enumerate(bad.graph.initializer):
        if t.name == name:
            a = numpy_helper.to_array(t).copy()
            a.flat[0] = value
            bad.graph.initializer[i].CopyFrom(numpy_helper.from_array(a, name))
    return bad


def test_validator_catches_a_code_outside_ternary(model, calib):
    res = onnxq.quantize(model, calib, _config(ternary_method="rtn", ternary_storage="int4"))
    assert json.loads(next(p.value for p in res.model.metadata_props if p.key == METADATA_KEY))["w2_quantized"] == "w2"
    bad = _corrupt(res.model, "w2_quantized", 2)  # a 2 fits an int4 container but is not ternary
    report = check_ternary(bad)
    assert report is not None and not report.ok
    assert any("w2" in v and "int4" in v and "[2]" in v for v in report.violations)
    val = validate(model, bad, calib[:1])
    assert not val.ok and any("outside {-1, 0, 1}" in e for e in val.errors)
    assert val.ternary is not None and not val.ternary["ok"]
    # int2 tensors are checked even without the metadata entry (-2 is an int2 value).
    res2 = onnxq.quantize(model, calib, _config(ternary_storage="int2", validate=False))
    bad2 = _corrupt(res2.model, "w3_quantized", -2)
    mark_two_bit_codes(bad2, {})
    assert not any(p.key == METADATA_KEY for p in bad2.metadata_props)
    report2 = check_ternary(bad2)
    assert report2 is not None and len(report2.violations) == 1 and "w3_quantized" in report2.violations[0]
    # A listed tensor that is missing is a violation too; a model without ternary tensors has no report.
    mark_two_bit_codes(bad2, {"gone_quantized": "gone"})
    assert any("missing" in v for v in check_ternary(bad2).violations)
    assert check_ternary(model) is None


def test_cli_ternary_flags(tmp_path: Path, model, capsys):
    onnx.save(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((12, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "m.t.onnx"
    code = main(["quantize", str(tmp_path / "m.onnx"), "-o", str(out), "--calib", str(tmp_path / "calib.npz"),
                 "--batch-size", "4", "--weights", "ternary", "--ternary-method", "mquant", "--ternary-storage",
                 "int8", "--first-last", "same", *NO_FLOOR_FLAGS])
    text, _ = capsys.readouterr()
    assert code == 0 and "ternary weights: 4 tensors (int8)" in text
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["config"]["weights"]["ternary_method"] == MQUANT_DEFAULT and report["ternary"]["ok"]
    assert report["config"]["weights"]["bits"] == 2
    code = main(["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "x.onnx"), "--calib",
                 str(tmp_path / "calib.npz"), "--weights", "ternary", "--ternary-method", "ternary"])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("onnxq: error: argument --ternary-method: invalid choice: 'ternary'")
    assert not (tmp_path / "x.onnx").exists()
    code = main(["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "x.onnx"), "--calib",
                 str(tmp_path / "calib.npz"), "--weights", "ternary", "--ternary-storage", "int4", "--target",
                 "tensorrt"])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "ternary storage int4" in err
    code = main(["inspect", str(tmp_path / "m.onnx"), "--weights", "ternary", "--json"])
    plan = json.loads(capsys.readouterr()[0])
    assert code == 0 and plan["quantized_weights"] == ["w1", "w2", "w3", "w4"]


def test_bias_overflow_raises_a_ternary_scale_and_rounds_that_channel(calib):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    w[0] *= 1e-9  # a near-dead channel: its operator scale is ~1e-9 and round(b / (s_in s_w)) overflows int32
    b = np.full(6, 0.5, np.float32)
    m = make_model("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3,8,8] x) => (float[N,6,8,8] y) <float[6,3,3,3] w, float[6] b> {
            c = Conv <pads=[1,1,1,1]> (x, w, b)
            y = Relu (c)
        }""", w=w, b=b)
    res = onnxq.quantize(m, calib, _config(ternary_method="twn"))
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    ref = ternarize(w, "twn", axis=0)
    scale, codes = inits["w_scale"], inits["w_quantized"]
    assert scale[0] > 2 * ref.scale[0]  # raised so that the bias fits
    np.testing.assert_array_equal(scale[1:], ref.scale[1:])
    np.testing.assert_array_equal(codes[1:], ref.codes[1:])  # the other channels keep the operator's codes
    np.testing.assert_array_equal(codes[0], np.clip(np.rint(w[0] / scale[0]), -1, 1))
    assert res.report["ternary"]["ok"] and check_target(res.model, "ort-cpu") == []
