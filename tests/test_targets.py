"""Target profiles: plain data, config resolution, placement per target, end-to-end outputs, extra files."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnxq.passes.quant.assign_specs import AssignSpecsPass

import onnxq
from onnxq.cli import main
from onnxq.config.legacy import QuantConfig
from onnxq.core.context import QuantContext
from onnxq.core.graph import to_graph
from onnxq.core.spec import INT32_BIAS
from onnxq.errors import UserError
from onnxq.targets.profiles import TARGETS, get_target, resolve_config
from onnxq.targets.rules import check_target
from tests.helpers import initializer, make_context, make_model, random_feeds, run_ort

# Conv -> Relu -> Conv -> residual Add -> GAP -> Gemm, plus a Concat of two branches.
NET = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,3,8,8] x) => (float[N,5] y)
  <float[8,3,3,3] w1, float[8] b1, float[8,8,1,1] w2, float[8] b2, float[4,8,1,1] w3, float[4,8,1,1] w4,
   float[8,5] wf, float[5] bf> {
    c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
    r1 = Relu (c1)
    c2 = Conv (r1, w2, b2)
    a = Add (c2, r1)
    c3 = Conv (a, w3)
    c4 = Conv (a, w4)
    k = Concat <axis=1> (c3, c4)
    g1 = GlobalAveragePool (k)
    f = Flatten (g1)
    y = Gemm (f, wf, bf)
}"""


def _plan(target: str, text: str = NET) -> QuantContext:
    model = onnx.shape_inference.infer_shapes(make_model(text))
    config = resolve_config(QuantConfig(target=target))
    ctx = make_context(config=config, target=get_target(target))
    AssignSpecsPass()(to_graph(model), ctx)
    return ctx


def _calib(model: onnx.ModelProto, n: int = 6) -> list[dict[str, np.ndarray]]:
    return [random_feeds(model, seed=i, batch=4) for i in range(n)]


def test_profiles_are_frozen_plain_data():
    assert set(TARGETS) == {"ort-cpu", "tensorrt", "openvino", "qnn", "qnn-a16", "npu-pow2"}
    trt = get_target("tensorrt")
    with pytest.raises(dataclasses.FrozenInstanceError):
        trt.name = "x"  # type: ignore[misc]
    assert trt.activation_zero_points == {0} and trt.activation_dtypes == ("int8",)
    assert trt.weighted_output == "none" and trt.add_inputs == ("residual", "all") and not trt.quantize_bias
    pow2 = get_target("npu-pow2")
    assert pow2.pow2 and pow2.align_concat and pow2.align_eltwise and pow2.activation_zero_points == {0}
    assert not get_target("ort-cpu").pow2 and "com.microsoft" in get_target("ort-cpu").allowed_domains
    assert get_target("qnn").exporters == ("aimet_encodings",) and get_target("qnn-a16").min_opset == 21
    with pytest.raises(UserError, match="unknown target"):
        get_target("gpu")


def test_resolve_keeps_ort_cpu_and_applies_target_choices_over_defaults():
    cfg = resolve_config(QuantConfig())
    assert resolve_config(cfg) == cfg  # resolving twice changes nothing
    assert (cfg.activations.dtype, cfg.activations.bits, cfg.scale) == ("uint8", 8, "float")
    assert resolve_config(QuantConfig(activation_dtype="int8")).activations.dtype == "int8"
    trt = resolve_config(QuantConfig(target="tensorrt"))
    assert trt.activations.dtype == "int8" and trt.scale == "float"
    npu = resolve_config(QuantConfig(target="npu-pow2"))
    assert npu.activations.dtype == "int8" and npu.scale == "pow2"
    a16 = resolve_config(QuantConfig(target="qnn-a16"))
    assert a16.output_opset == 21 and a16.activations.bits == 16
    # A value the target allows is kept.
    assert resolve_config(QuantConfig(target="qnn", scale_kind="pow2")).scale == "pow2"


@pytest.mark.parametrize("target, kwargs", [
    ("tensorrt", {"weight_bits": 4}),
    ("tensorrt", {"activation_bits": 4}),
    ("qnn", {"activation_dtype": "int8"}),
    ("tensorrt", {"scale_kind": "pow2"}),  # TensorRT folds float scales; pow2 is the npu-pow2 profile's
    ("openvino", {"activation_dtype": "int8"}),  # the NNCF mixed preset: uint8 activations
    ("openvino", {"activation_bits": 4}),
    ("npu-pow2", {"first_last_bits": 4, "weight_bits": 4}),
])
def test_resolve_rejects_explicit_choices_the_target_forbids(target, kwargs):
    with pytest.raises(UserError, match=f"target {target} does not allow"):
        resolve_config(QuantConfig(target=target, **kwargs))


def test_tensorrt_places_qdq_on_op_inputs_and_the_residual_input():
    ctx = _plan("tensorrt")
    specs = ctx.specs
    assert "x" in specs and "r1" in specs  # inputs of weighted ops
    assert "c1" not in specs  # Conv -> Relu fused by TensorRT: no Q between them, none after the Conv
    assert "c2" not in specs  # the Add input coming straight from a Conv stays float (epilogue fusion)
    assert "a" in specs  # the Add output is an input of the next convolutions
    assert "c3" in specs and "c4" in specs  # Concat inputs
    assert "g1" not in specs and "f" in specs  # pooling output not quantized, the Gemm input is
    assert "b1" not in specs and "bf" not in specs  # biases stay float
    acts = [s for n, s in specs.items() if not n.startswith(("w", "b"))]
    assert acts and all(s.signed and s.symmetric and s.bits == 8 for s in acts)


def _residual(target: str = "ort-cpu", add_inputs: str | None = "residual") -> onnxq.Config:
    config = QuantConfig(target=target).to_config()
    return config.replace(activations=dataclasses.replace(config.activations, add_inputs=add_inputs))


def test_add_inputs_resolve_to_the_target_choice_and_refuse_what_it_forbids():
    assert resolve_config(QuantConfig()).activations.add_inputs == "all"
    assert resolve_config(QuantConfig(target="tensorrt")).activations.add_inputs == "residual"
    assert resolve_config(_residual()).activations.add_inputs == "residual"
    assert resolve_config(_residual("tensorrt", "all")).activations.add_inputs == "all"
    for target in ("qnn", "npu-pow2", "openvino"):  # NPU toolchains want every Add input quantized
        with pytest.raises(UserError, match=f"target {target} does not allow activations.add_inputs='residual'"):
            resolve_config(_residual(target))
    with pytest.raises(UserError, match="activations.add_inputs"):
        onnxq.Activations(add_inputs="some")


def test_ort_cpu_residual_add_inputs_leave_the_convolution_output_float():
    model = onnx.shape_inference.infer_shapes(make_model(NET))
    ctx = make_context(config=_residual(), target=get_target("ort-cpu"))
    AssignSpecsPass()(to_graph(model), ctx)
    assert "c2" not in ctx.specs  # the Conv feeding the residual Add: no output Q
    assert {"w2", "b2", "r1", "a"} <= set(ctx.specs)  # its weights and input, the skip input, the Add output
    assert "c2" in _plan("ort-cpu").specs  # the default quantizes every Add input
    result = onnxq.quantize(model, _calib(model), _residual())
    assert result.report["target_check"]["ok"] and result.validation.ok
    assert result.report["plan"]["residual_float_inputs"] == ["c2"]  # the report says which and why
    conv = next(n for n in result.model.graph.node if n.op_type == "Conv" and n.output[0] == "c2")
    readers = [n.op_type for n in result.model.graph.node if conv.output[0] in n.input]
    assert readers == ["Add"]  # no QuantizeLinear between the Conv and the Add
    feeds = random_feeds(model, seed=42, batch=3)
    fused, qdq = run_ort(result.model, feeds, "all")[0], run_ort(result.model, feeds, "disable")[0]
    np.testing.assert_allclose(fused, qdq, rtol=1e-4, atol=1e-4 * float(np.abs(qdq).max()))
    # the rule checker allows it only where the target does
    assert check_target(result.model, "ort-cpu") == []
    assert [v.rule for v in check_target(result.model, "qnn") if "c2" in v.node or "Conv" in v.node] == ["wrapped"]


def test_after_activation_profiles_put_q_after_relu_even_for_int8():
    for name in ("npu-pow2", "openvino"):
        ctx = _plan(name)
        assert "r1" in ctx.specs and "c1" not in ctx.specs, name
        assert "c2" in ctx.specs and "a" in ctx.specs, name  # both Add inputs and the output
        assert ctx.specs["b1"] is INT32_BIAS
    assert all(s.pow2 for s in _plan("npu-pow2").specs.values() if s is not INT32_BIAS)
    # ort-cpu with int8 activations too (the export quantizes before the Relu as well, which
    # onnxruntime needs to fuse: passes/export/clip_on_codes.py).
    model = onnx.shape_inference.infer_shapes(make_model(NET))
    ctx = make_context(config=QuantConfig(activation_dtype="int8"), target=get_target("ort-cpu"))
    AssignSpecsPass()(to_graph(model), ctx)
    assert "r1" in ctx.specs and "c1" not in ctx.specs


def test_graph_outputs_stay_float_unless_the_target_says_otherwise():
    assert "y" not in _plan("qnn").specs and "y" not in _plan("ort-cpu").specs
    assert _plan("qnn-a16").specs["f"].bits == 16
    model = onnx.shape_inference.infer_shapes(make_model(NET))
    target = dataclasses.replace(get_target("qnn"), quantize_graph_outputs=True)
    ctx = make_context(config=QuantConfig(target="qnn"), target=target)
    AssignSpecsPass()(to_graph(model), ctx)
    assert "y" in ctx.specs


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_profile_quantizes_runs_and_passes_its_checker(target):
    model = make_model(NET)
    result = onnxq.quantize(model, _calib(model), QuantConfig(target=target))
    assert result.report["target_check"] == {"target": target, "ok": True, "violations": [],
                                             "activation_bits": 16 if target == "qnn-a16" else 8}
    assert result.validation is not None and result.validation.ok
    feeds = random_feeds(model, seed=42, batch=3)
    ref, got = run_ort(model, feeds)[0], run_ort(result.model, feeds)[0]
    sqnr = 10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2))
    assert sqnr > 15, sqnr
    zps = [initializer(result.model, n.input[2]) for n in result.model.graph.node
           if n.op_type == "QuantizeLinear"]
    if target in ("tensorrt", "npu-pow2"):
        assert zps and all(np.all(z == 0) and z.dtype == np.int8 for z in zps)
    if target == "qnn-a16":
        assert zps and all(z.dtype == np.uint16 for z in zps)


def test_qnn_save_writes_aimet_encodings(tmp_path):
    model = make_model(NET)
    result = onnxq.quantize(model, _calib(model), QuantConfig(target="qnn", validate=False))
    path = result.save(tmp_path / "m.qnn.onnx")
    enc = json.loads(path.with_suffix(".encodings").read_text())
    assert enc["version"] == "0.6.1" and set(enc) >= {"activation_encodings", "param_encodings"}
    x = enc["activation_encodings"]["x"][0]
    zp = int(initializer(result.model, "x_zero_point"))
    scale = float(initializer(result.model, "x_scale"))
    assert x["bitwidth"] == 8 and x["dtype"] == "int" and x["is_symmetric"] == "False"
    assert x["offset"] == -zp and x["scale"] == pytest.approx(scale)
    assert x["min"] == pytest.approx(-zp * scale) and x["max"] == pytest.approx((255 - zp) * scale)
    assert "y" not in enc["activation_encodings"]  # graph outputs stay float
    w1 = enc["param_encodings"]["w1"]
    assert len(w1) == 8 and all(e["offset"] == -128 and e["is_symmetric"] == "True" for e in w1)
    assert "b1" not in enc["param_encodings"]
    assert not (tmp_path / "m.qnn.encodings").with_name("other").exists()
    # Other targets write no encodings file.
    other = onnxq.quantize(model, _calib(model), QuantConfig(validate=False)).save(tmp_path / "m.cpu.onnx")
    assert not other.with_suffix(".encodings").exists()


def test_cli_target_conflicts_are_user_errors(tmp_path, capsys):
    model = make_model(NET)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    code = main(["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib",
                 str(tmp_path / "c.npz"), "--target", "tensorrt", "--activations", "uint8"])
    assert code == 2 and "target tensorrt does not allow activations.dtype='uint8'" in capsys.readouterr().err
    code = main(["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib",
                 str(tmp_path / "c.npz"), "--target", "npu-pow2", "--batch-size", "2", "--no-validate"])
    assert code == 0
    capsys.readouterr()
    assert main(["check", str(tmp_path / "q.onnx"), "--target", "npu-pow2"]) == 0
    assert "ok for target npu-pow2" in capsys.readouterr().out


def test_encodings_name_a_quantized_graph_output_by_its_visible_name_and_read_qcdq_grids():
    from onnxq.targets.encodings import encodings_dict

    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[4] y_float) => (float[4] y, float[4] z)
      <float s, uint16 zp, float s4, uint8 z4, uint8 lo, uint8 hi> {
        q = QuantizeLinear (y_float, s, zp)
        y = DequantizeLinear (q, s, zp)
        q4 = QuantizeLinear (y_float, s4, z4)
        c4 = Clip (q4, lo, hi)
        z = DequantizeLinear (c4, s4, z4)
    }"""
    model = make_model(text, s=np.float32(0.5), zp=np.uint16(1000), s4=np.float32(0.25), z4=np.uint8(3),
                       lo=np.uint8(0), hi=np.uint8(15))
    acts = encodings_dict(model)["activation_encodings"]
    assert acts["y"] == [{"bitwidth": 16, "dtype": "int", "is_symmetric": "False", "scale": 0.5,
                          "offset": -1000, "min": -500.0, "max": (65535 - 1000) * 0.5}]
    four = acts["z"][0]  # the QCDQ Clip [0, 15] makes it a 4-bit grid
    assert (four["bitwidth"], four["offset"], four["max"]) == (4, -3, 12 * 0.25)
