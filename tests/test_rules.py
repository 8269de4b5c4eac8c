"""The rule checker: flags deliberately bad QDQ models, passes good ones, reads onnxruntime's own output."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.cli import main
from onnxq.config.legacy import QuantConfig
from onnxq.targets.rules import Violation, check_target, format_violations
from tests.helpers import make_model, random_feeds

CNN = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,3,8,8] x) => (float[N,5] y)
  <float[8,3,3,3] w1, float[8] b1, float[8,8,1,1] w2, float[8] b2, float[8,5] wf, float[5] bf> {
    c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
    r1 = Relu (c1)
    c2 = Conv (r1, w2, b2)
    a = Add (c2, r1)
    g1 = GlobalAveragePool (a)
    f = Flatten (g1)
    y = Gemm (f, wf, bf)
}"""


def _rules(violations: list[Violation]) -> set[str]:
    return {v.rule for v in violations}


@pytest.fixture(scope="module")
def ort_cpu_model() -> onnx.ModelProto:
    model = make_model(CNN)
    calib = [random_feeds(model, seed=i, batch=4) for i in range(6)]
    return onnxq.quantize(model, calib, QuantConfig(validate=False)).model


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _conv_model(*, x_scale=0.02, w_scale=(0.01, 0.02), b_scale=None, x_zp=0, x_type=np.int8, domain="",
                q_after=True, opset=13, b_codes=(10, -20)) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv(DQ(w), DQ(b)) [-> Q -> DQ] -> y, with every parameter settable."""
    w_scale = np.asarray(w_scale, np.float32)
    b_scale = np.asarray(b_scale if b_scale is not None else np.float32(x_scale) * w_scale, np.float32)
    inits = [
        _init("xs", np.float32(x_scale)), _init("xz", np.asarray(x_zp, x_type)),
        _init("wq", np.ones((2, 3, 1, 1), np.int8)), _init("ws", w_scale),
        _init("bq", np.asarray(b_codes, np.int32)), _init("bs", b_scale),
        _init("ys", np.float32(0.05)), _init("yz", np.asarray(0, x_type)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="qx"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dqx"),
        helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], name="dqw", axis=0),
        helper.make_node("DequantizeLinear", ["bq", "bs"], ["bd"], name="dqb", axis=0),
        helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], name="conv", domain=domain),
    ]
    if q_after:
        nodes += [helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["cq"], name="qc"),
                  helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["y"], name="dqc")]
    else:
        nodes.append(helper.make_node("Identity", ["c"], ["y"], name="id"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=imports)


def test_violation_is_a_frozen_record():
    v = Violation("zero_point", "node", "why")
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.rule = "x"  # type: ignore[misc]
    assert str(v) == "zero_point: node: why" and format_violations([v, v]).count("\n") == 1


def test_our_outputs_pass_their_own_target(ort_cpu_model):
    assert check_target(ort_cpu_model, "ort-cpu") == []
    assert check_target(_conv_model(), "tensorrt") == []


def test_uint8_model_violates_tensorrt_zero_points_and_types(ort_cpu_model):
    violations = check_target(ort_cpu_model, "tensorrt")
    assert {"zero_point", "dtype"} <= _rules(violations)
    zp = [v for v in violations if v.rule == "zero_point"]
    assert all("not in [0]" in v.message for v in zp)
    assert any(v.node.startswith("a_") for v in zp)  # the Add output has a non-zero zero-point


def test_float_scales_violate_npu_pow2(ort_cpu_model):
    violations = check_target(ort_cpu_model, "npu-pow2")
    pow2 = [v for v in violations if v.rule == "pow2"]
    # Every Q/DQ with a float scale: activations, weights and biases.
    assert any("weight scale" in v.message for v in pow2) and any("bias scale" in v.message for v in pow2)
    assert "eltwise" in _rules(violations)  # the residual Add's inputs have different scales
    exact = _conv_model(x_scale=2.0**-6, w_scale=(2.0**-7, 2.0**-8))
    exact.graph.initializer[-2].CopyFrom(_init("ys", np.float32(2.0**-4)))
    assert check_target(exact, "npu-pow2") == []


def test_bias_scale_and_range_are_checked():
    assert check_target(_conv_model(), "ort-cpu") == []
    bad = check_target(_conv_model(b_scale=(0.0002, 0.0004001)), "ort-cpu")
    assert [v.rule for v in bad] == ["bias"] and "s_in * s_w" in bad[0].message and bad[0].node == "conv"
    low = check_target(_conv_model(b_codes=(-(2**31), 0)), "ort-cpu")
    assert [v.rule for v in low] == ["bias"] and "outside" in low[0].message


def test_unwrapped_ops_custom_domains_and_opset_are_flagged():
    no_q = check_target(_conv_model(q_after=False), "ort-cpu")
    assert [(v.rule, v.node) for v in no_q] == [("wrapped", "conv")]
    assert check_target(_conv_model(q_after=False), "tensorrt") == []  # TensorRT needs no output Q
    model = _conv_model()
    model.graph.node[0].input[0] = "x"
    model.graph.node[1].output[0] = "xd_unused"
    model.graph.node[4].input[0] = "x"  # the conv reads the float input directly
    assert ("wrapped", "conv") in {(v.rule, v.node) for v in check_target(model, "ort-cpu")}
    custom = check_target(_conv_model(domain="vendor.npu"), "ort-cpu")
    assert ("domain", "conv") in {(v.rule, v.node) for v in custom}
    u16 = _conv_model(x_type=np.uint16, opset=13)
    rules = {(v.rule, v.node) for v in check_target(u16, "qnn-a16")}
    assert ("opset", "<model>") in rules and ("opset", "qx") in rules
    assert ("dtype", "qx") in {(v.rule, v.node) for v in check_target(u16, "ort-cpu")}


def test_qdq_pairs_and_concat_alignment():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1,2] a, float[1,2] b) => (float[1,4] y) <float s1, float s2, int8 z> {
        qa = QuantizeLinear (a, s1, z)
        da = DequantizeLinear (qa, s1, z)
        qb = QuantizeLinear (b, s2, z)
        db = DequantizeLinear (qb, s1, z)
        y = Concat <axis=1> (da, db)
    }"""
    model = make_model(text, s1=np.float32(0.5), s2=np.float32(0.25), z=np.int8(0))
    by_rule = {v.rule: v for v in check_target(model, "npu-pow2")}
    assert set(by_rule) == {"qdq_pair"}  # db uses s1 while qb used s2; the Concat inputs agree
    model = make_model(text.replace("db = DequantizeLinear (qb, s1, z)", "db = DequantizeLinear (qb, s2, z)"),
                       s1=np.float32(0.5), s2=np.float32(0.25), z=np.int8(0))
    assert _rules(check_target(model, "npu-pow2")) == {"concat"}
    assert check_target(model, "ort-cpu") == []  # ort-cpu does not require aligned Concat inputs


def test_onnxruntime_quantize_static_output_can_be_checked(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model = make_model(CNN)
    onnx.save(model, tmp_path / "m.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([random_feeds(model, seed=i, batch=2) for i in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    out = tmp_path / "ort_u8.onnx"
    quantize_static(str(tmp_path / "m.onnx"), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    u8 = onnx.load(out)
    assert check_target(u8, "ort-cpu") == []
    assert {"zero_point", "dtype"} <= _rules(check_target(u8, "tensorrt"))
    assert "pow2" in _rules(check_target(u8, "npu-pow2"))
    out8 = tmp_path / "ort_s8.onnx"
    quantize_static(str(tmp_path / "m.onnx"), str(out8), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True})
    assert "zero_point" not in _rules(check_target(onnx.load(out8), "tensorrt"))


def test_cli_check_exit_codes(ort_cpu_model, tmp_path, capsys):
    path = tmp_path / "q.onnx"
    onnx.save(ort_cpu_model, path)
    assert main(["check", str(path), "--target", "ort-cpu"]) == 0
    assert main(["check", str(path), "--target", "tensorrt"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == len(check_target(ort_cpu_model, "tensorrt")) + 1  # + the ort-cpu "ok" line
    assert any(line.startswith("zero_point: ") for line in out)
    assert main(["check", str(path), "--target", "fpga"]) == 2
    assert main(["check", str(tmp_path / "missing.onnx"), "--target", "ort-cpu"]) == 2
    assert "onnxq: error:" in capsys.readouterr().err


def test_matmul_of_two_dequantized_activations_is_a_float_op():
    """Attention's ``softmax(QK) @ V`` reads two DQ'd activations and stays float: it has no weight, so
    the ``wrapped`` rule (quantized weight, no output Q) does not apply."""
    x_params = [_init("s", np.float32(0.05)), _init("z", np.asarray(0, np.int8))]
    nodes = [
        helper.make_node("QuantizeLinear", ["a", "s", "z"], ["aq"], name="qa"),
        helper.make_node("DequantizeLinear", ["aq", "s", "z"], ["ad"], name="dqa"),
        helper.make_node("QuantizeLinear", ["b", "s", "z"], ["bq"], name="qb"),
        helper.make_node("DequantizeLinear", ["bq", "s", "z"], ["bd"], name="dqb"),
        helper.make_node("MatMul", ["ad", "bd"], ["m"], name="mm"),
        helper.make_node("Transpose", ["m"], ["y"], name="t", perm=[0, 2, 1]),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4, 4]) for n in ("a", "b")]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 4])]
    graph = helper.make_graph(nodes, "attn", inputs, out, initializer=x_params)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert "wrapped" not in _rules(check_target(model, "ort-cpu"))

