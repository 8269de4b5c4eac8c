"""Tests for onnxq.report.validate and onnxq.report.metrics on tiny hand-built float / QDQ models."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.core.cpu import describe
from onnxq.errors import UserError
from onnxq.report import sessions
from onnxq.report import validate as V
from onnxq.report.metrics import (
    OutputFidelity,
    check_qdq_constants,
    cosine,
    is_power_of_two,
    level_gap,
    max_abs_err,
    sqnr_db,
    top1_agreement,
)
from onnxq.report.validate import ValidationReport, optimized_op_counts, validate, write_report
from onnxq.report.verdict import Criteria, agreement_upper_bound, failures

OPSET = 13
IR = 8  # onnx 1.23 writes IR 14 by default, which ORT 1.31 refuses (max 13)
C_IN, C_MID, HW, CLASSES = 3, 4, 6, 10


def _params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W": rng.normal(0, 0.3, (C_MID, C_IN, 3, 3)).astype(np.float32),
        "B": rng.normal(0, 0.1, C_MID).astype(np.float32),
        "G": rng.normal(0, 0.3, (CLASSES, C_MID * HW * HW)).astype(np.float32),
        "GB": rng.normal(0, 0.1, CLASSES).astype(np.float32),
    }


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], name: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C_IN, HW, HW])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CLASSES])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR)


def float_model() -> onnx.ModelProto:
    """x -> Conv(3x3, pad 1) -> Relu -> Flatten -> Gemm(transB) -> y."""
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "G", "GB"], ["y"], transB=1),
    ]
    return _model(nodes, [numpy_helper.from_array(v, k) for k, v in _params().items()], "float")


def qdq_model(pow2: bool = False, levels: int = 63) -> onnx.ModelProto:
    """The float model in QDQ form: uint8 activations, int8 per-channel (axis 0) weights with codes up to
    ``levels`` (63: no pair of codes can saturate onnxruntime's int8 kernels), int32 bias."""
    p = _params()
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    rnd = (lambda s: 2.0 ** np.ceil(np.log2(s))) if pow2 else (lambda s: s)

    def const(arr: np.ndarray, name: str) -> str:
        inits.append(numpy_helper.from_array(arr, name))
        return name

    def act(name: str, scale: float, zp: int) -> str:
        s = const(np.array(rnd(scale), np.float32), name + "_s")
        z = const(np.array(zp, np.uint8), name + "_z")
        nodes.append(helper.make_node("QuantizeLinear", [name, s, z], [name + "_q"]))
        nodes.append(helper.make_node("DequantizeLinear", [name + "_q", s, z], [name + "_dq"]))
        return name + "_dq"

    def weight(name: str, bias: str, s_in: float) -> tuple[str, str]:
        w = p[name]
        s = rnd(np.abs(w).reshape(w.shape[0], -1).max(1) / levels).astype(np.float32)
        q = np.clip(np.round(w / s.reshape(-1, *[1] * (w.ndim - 1))), -127, 127).astype(np.int8)
        nodes.append(helper.make_node("DequantizeLinear", [const(q, name + "_q"), const(s, name + "_s"),
                                                          const(np.zeros(len(s), np.int8), name + "_z")],
                                      [name + "_dq"], axis=0))
        sb = (s * np.float32(rnd(s_in))).astype(np.float32)
        qb = np.round(p[bias] / sb).astype(np.int32)
        nodes.append(helper.make_node("DequantizeLinear", [const(qb, bias + "_q"), const(sb, bias + "_s"),
                                                          const(np.zeros(len(sb), np.int32), bias + "_z")],
                                      [bias + "_dq"], axis=0))
        return name + "_dq", bias + "_dq"

    s_x, s_r = 2.0 * 4 / 255, 3.0 / 255
    xq = act("x", s_x, 128)
    w, b = weight("W", "B", s_x)
    nodes.append(helper.make_node("Conv", [xq, w, b], ["c"], pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("Relu", ["c"], ["r"]))
    nodes.append(helper.make_node("Flatten", [act("r", s_r, 0)], ["f"]))
    g, gb = weight("G", "GB", s_r)
    nodes.append(helper.make_node("Gemm", [act("f", s_r, 0), g, gb], ["y"], transB=1))
    return _model(nodes, inits, "qdq")


def feeds(n: int = 3, batch: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(-1, 1, (batch, C_IN, HW, HW)).astype(np.float32)} for _ in range(n)]


def _set_init(model: onnx.ModelProto, name: str, arr: np.ndarray) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(arr, name))
    return out


# ------------------------------------------------------------------------------------------- validate


@pytest.fixture(scope="module")
def good_report() -> ValidationReport:
    return validate(float_model(), qdq_model(), feeds())


def test_sane_int8_model_validates(good_report: ValidationReport) -> None:
    r = good_report
    assert r.checker_ok and r.checker_error is None
    assert r.runs_enable_all and r.runs_disable_all
    assert r.errors == () and r.ok
    assert r.n_samples == 3
    (out,) = r.outputs
    assert out.name == "y"
    assert math.isfinite(out.sqnr_db) and out.sqnr_db > 20
    assert 0.99 < out.cosine <= 1.0
    assert 0 < out.max_abs_err < 0.5
    assert out.top1_agreement is not None and out.top1_agreement >= 0.75
    # ORT's integer kernels compute what the reference QDQ graph computes, up to float rounding
    assert 0 <= r.levels_max_abs_diff < 1e-3


def test_ort_fuses_tiny_model_into_integer_kernels(good_report: ValidationReport) -> None:
    # verified on ORT 1.31.1: at ENABLE_ALL Conv becomes com.microsoft QLinearConv (NHWC, with Transposes)
    # and Gemm becomes QGemm; only the input QuantizeLinear remains; no float Conv/Gemm is left
    assert good_report.integer_kernels == {"QGemm": 1, "QLinearConv": 1}
    assert good_report.float_compute_ops == {}
    assert good_report.qdq_left == {"QuantizeLinear": 1}
    assert good_report.constants["dtypes"] == {"int32": 2, "int8": 2}


def test_optimized_op_counts_levels() -> None:
    assert optimized_op_counts(float_model(), ort.GraphOptimizationLevel.ORT_DISABLE_ALL) == {
        "Conv": 1, "Flatten": 1, "Gemm": 1, "Relu": 1}
    assert "Relu" not in optimized_op_counts(float_model())  # fused into the (NCHWc) Conv
    ext = optimized_op_counts(qdq_model(), ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    assert ext["QLinearConv"] == 1 and ext["QGemm"] == 1 and "DequantizeLinear" not in ext


def test_broken_model_is_reported_not_raised() -> None:
    # the axis-0 weight scale has C_MID - 1 entries: the checker accepts it, ORT cannot run it
    broken = _set_init(qdq_model(), "W_s", np.full(C_MID - 1, 0.01, np.float32))
    r = validate(float_model(), broken, feeds())
    assert not r.runs_enable_all and not r.runs_disable_all
    assert not r.ok and r.errors
    assert any("DequantizeLinear" in e for e in r.errors)
    assert all("\n" not in e for e in r.errors)
    assert r.outputs == () and math.isnan(r.levels_max_abs_diff)
    json.dumps(r.to_dict(), allow_nan=False)
    assert "FAILS" in r.summary()


def test_unloadable_ir_version_is_reported() -> None:
    q = qdq_model()
    q.ir_version = 99
    r = validate(float_model(), q, feeds(1))
    assert not r.runs_enable_all and not r.runs_disable_all
    assert any("IR version" in e for e in r.errors)
    assert "/onnxruntime_src/" not in " ".join(r.errors)


def test_bad_scale_sign_is_an_error() -> None:
    bad = _set_init(qdq_model(), "G_s", -np.abs(numpy_helper.to_array(
        next(t for t in qdq_model().graph.initializer if t.name == "G_s"))))
    r = validate(float_model(), bad, feeds(1))
    assert r.constants["scales_ok"] is False and len(r.constants["bad_scales"]) == 1
    assert not r.ok


def test_identical_models_give_inf_sqnr(tmp_path: Path) -> None:
    path = tmp_path / "f.onnx"
    onnx.save(float_model(), path)
    r = validate(path, float_model(), feeds(2))
    (out,) = r.outputs
    assert out.sqnr_db == math.inf and out.max_abs_err == 0.0 and out.top1_agreement == 1.0
    d = r.to_dict()
    assert d["outputs"][0]["sqnr_db"] == "inf"
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert r.constants["n_dq"] == 0 and r.float_compute_ops  # float Conv/Gemm stay float


def test_max_samples_limits_a_generator() -> None:
    taken: list[int] = []

    def gen():
        for i, f in enumerate(feeds(5, batch=2)):
            taken.append(i)
            yield f

    r = validate(float_model(), qdq_model(), gen(), max_samples=2)
    assert r.n_samples == 2 and taken == [0, 1]


@pytest.mark.parametrize(
    "bad_feeds, match",
    [
        ([], "empty"),
        ({"x": np.zeros((1, 3, 6, 6), np.float32)}, "iterable"),
        ([np.zeros((1, 3, 6, 6), np.float32)], "not a dict"),
        ([{"z": np.zeros((1, 3, 6, 6), np.float32)}], "lacks input 'x'"),
        ([{"x": np.zeros((1, 3, 6, 6), np.float64)}], "astype"),
    ],
)
def test_user_errors(bad_feeds, match: str) -> None:
    with pytest.raises(UserError, match=match):
        validate(float_model(), qdq_model(), bad_feeds)


def test_user_errors_on_models_and_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="not a file"):
        validate(tmp_path / "missing.onnx", qdq_model(), feeds(1))
    with pytest.raises(UserError, match="max_samples"):
        validate(float_model(), qdq_model(), feeds(1), max_samples=0)
    monkeypatch.setattr(sessions, "PROTO_LIMIT", 1000)  # pretend the tiny proto is over protobuf's limit
    with pytest.raises(UserError, match="save_as_external_data"):
        validate(float_model(), qdq_model(), feeds(1))
    monkeypatch.undo()
    onnx.save(qdq_model(), tmp_path / "q.onnx", save_as_external_data=True, location="q.data",
              size_threshold=0)
    assert validate(float_model(), tmp_path / "q.onnx", feeds(1)).ok  # the path variant reads external data
    with pytest.raises(UserError, match="external data"):
        validate(float_model(), onnx.load(tmp_path / "q.onnx", load_external_data=False), feeds(1))
    monkeypatch.setenv("ONNXQ_THREADS", "many")
    with pytest.raises(UserError, match="ONNXQ_THREADS"):
        validate(float_model(), qdq_model(), feeds(1))
    monkeypatch.setenv("ONNXQ_THREADS", "1")
    assert validate(float_model(), qdq_model(), feeds(1)).ok


def _token_model(quant: bool) -> onnx.ModelProto:
    """ids int64 [N, L] -> Gather(embedding [16, 8]) -> Relu -> y [N, L, 8] (L varies between feeds)."""
    emb = np.random.default_rng(3).normal(0, 1, (16, 8)).astype(np.float32)
    scale = np.float32(np.abs(emb).max() / 127)
    if quant:
        inits = [numpy_helper.from_array(np.round(emb / scale).astype(np.int8), "E_q"),
                 numpy_helper.from_array(np.array(scale), "E_s")]
        nodes = [helper.make_node("DequantizeLinear", ["E_q", "E_s"], ["E"])]
    else:
        inits, nodes = [numpy_helper.from_array(emb, "E")], []
    nodes += [helper.make_node("Gather", ["E", "ids"], ["g"]), helper.make_node("Relu", ["g"], ["y"])]
    graph = helper.make_graph(nodes, "tok",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "L"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "L", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR)


def test_int64_inputs_and_varying_output_shapes() -> None:
    rng = np.random.default_rng(4)
    fs = [{"ids": rng.integers(0, 16, (2, n)).astype(np.int64)} for n in (3, 5, 7)]
    r = validate(_token_model(False), _token_model(True), fs)
    assert r.ok, r.errors
    (out,) = r.outputs
    assert out.top1_agreement is None
    assert 30 < out.sqnr_db < math.inf
    assert r.constants["dtypes"] == {"int8": 1} and r.constants["zero_point_zero"] == 1


def test_levels_diff_and_op_classes() -> None:
    errors: list[str] = []
    a = {"y": np.array([1.0, 2.0]), "z": np.zeros(0)}
    assert V._levels_diff(a, {"y": np.array([1.0, 2.5]), "z": np.zeros(0)}, 0, errors) == 0.5
    assert errors == []
    assert V._levels_diff(a, {"y": np.array([1.0]), "z": np.zeros(0)}, 3, errors) == math.inf
    assert len(errors) == 1 and "sample 3" in errors[0]
    counts = {"QLinearSigmoid": 1, "MatMulInteger": 2, "FusedConv": 1, "NchwcConv": 1, "DequantizeLinear": 3,
              "Transpose": 2, "QuantizeLinear": 1, "MatMulNBits": 1}
    ints, flts, qdq = V.classify_ops(counts)
    assert ints == {"MatMulInteger": 2, "MatMulNBits": 1, "QLinearSigmoid": 1}
    assert flts == {"FusedConv": 1, "NchwcConv": 1}
    assert qdq == {"DequantizeLinear": 3, "QuantizeLinear": 1}


def test_summary_mentions_the_essentials(good_report: ValidationReport) -> None:
    text = good_report.summary()
    needles = ("checker: ok", "ENABLE_ALL runs", "DISABLE_ALL runs", "output y: SQNR", "QLinearConv 1",
               "top1")
    for needle in needles:
        assert needle in text


# -------------------------------------------------------------------------------------------- metrics


def test_metrics_on_known_arrays() -> None:
    ref = np.array([1.0, 1.0, 1.0, 1.0])
    assert sqnr_db(ref, np.array([1.0, 1.0, 1.0, 0.0])) == pytest.approx(10 * np.log10(4.0))
    assert sqnr_db(ref, ref) == math.inf
    assert sqnr_db(np.zeros(3), np.ones(3)) == -math.inf
    assert sqnr_db(ref, 1.1 * ref) == pytest.approx(20.0)  # noise is 1/10 of the signal amplitude
    assert cosine(np.array([1.0, 0.0]), np.array([0.0, 2.0])) == pytest.approx(0.0)
    assert cosine(np.array([1.0, 2.0]), np.array([2.0, 4.0])) == pytest.approx(1.0)
    assert cosine(np.array([1.0, 2.0]), np.array([-1.0, -2.0])) == pytest.approx(-1.0)
    assert cosine(np.zeros(2), np.zeros(2)) == 1.0 and cosine(np.zeros(2), np.ones(2)) == 0.0
    assert max_abs_err(np.array([1.0, -2.0]), np.array([1.5, 1.0])) == 3.0
    with pytest.raises(UserError):
        sqnr_db(np.ones(3), np.ones(4))


def test_top1_agreement_shapes() -> None:
    ref = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    test = np.array([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.9, 0.0, 0.1]])
    assert top1_agreement(ref, test) == 0.5
    assert top1_agreement(ref[:, :, None, None], test[:, :, None, None]) == 0.5
    assert top1_agreement(ref[:, :1], test[:, :1]) is None  # one class
    assert top1_agreement(ref.ravel(), test.ravel()) is None  # 1-D
    assert top1_agreement(ref[:, :, None], test[:, :, None]) is None  # [N, C, 1] is not classifier-shaped


def test_is_power_of_two() -> None:
    a = np.array([1.0, 0.5, 2.0**-20, 1024.0, 3.0, 0.0, -2.0, np.inf, np.nan, 0.75, 2.0**-20 * 1.0000001])
    expected = [True, True, True, True, False, False, False, False, False, False, False]
    assert is_power_of_two(a).tolist() == expected
    assert is_power_of_two(np.float32(0.125)).item() is True
    assert is_power_of_two(np.array([0.25, 0.3], np.float16)).tolist() == [True, False]
    assert is_power_of_two(np.array([0.25, 0.3], ml_dtypes.bfloat16)).tolist() == [True, False]
    k = np.arange(-40, 40)
    assert is_power_of_two(np.ldexp(1.0, k).astype(np.float32)).all()
    assert not is_power_of_two(np.ldexp(1.0, k) * (1 + 2.0**-20)).any()


def test_check_qdq_constants_counts() -> None:
    c = check_qdq_constants(qdq_model())
    assert c["n_dq"] == 7 and c["n_const_dq"] == 4  # 3 activation DQs read QuantizeLinear outputs
    assert c["int32_bias"] == 2 and c["scales_ok"] and c["bad_scales"] == []
    assert c["value_range"]["int8"] == [-63, 63]
    assert c["pow2_scales"] == 0 and c["zero_point_zero"] == 4
    p = check_qdq_constants(qdq_model(pow2=True))
    assert p["pow2_scales"] == 4  # weight scales and the bias scales s_in * s_w built from them
    json.dumps(p, allow_nan=False)
    with pytest.raises(UserError):
        check_qdq_constants("model.onnx")  # type: ignore[arg-type]


def test_check_qdq_constants_int4_and_constant_node() -> None:
    w = np.array([[-8, 7], [0, 1]], dtype=ml_dtypes.int4)
    nodes = [
        helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(np.array(0.25, np.float32))),
        helper.make_node("DequantizeLinear", ["w", "s"], ["wd"]),
        helper.make_node("MatMul", ["x", "wd"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "i4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                              [numpy_helper.from_array(w, "w")])
    c = check_qdq_constants(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    assert c["dtypes"] == {"int4": 1} and c["value_range"] == {"int4": [-8, 7]} and c["pow2_scales"] == 1


# --------------------------------------------------------------------------------------- write_report


def test_write_report_roundtrip_and_atomic(tmp_path: Path, good_report: ValidationReport,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "q.onnx"
    target = write_report(good_report.to_dict(), model)
    assert target == tmp_path / "q.report.json"
    assert json.loads(target.read_text()) == good_report.to_dict()
    # numpy values and inf are made JSON-safe
    target = write_report({"a": np.float32(1.5), "b": [np.int64(3)], "c": math.inf, "d": math.nan}, model)
    assert json.loads(target.read_text()) == {"a": 1.5, "b": [3], "c": "inf", "d": None}
    assert sorted(os.listdir(tmp_path)) == ["q.report.json"]

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_report({"new": 1}, model)
    assert json.loads(target.read_text())["b"] == [3]  # the old report is intact
    assert sorted(os.listdir(tmp_path)) == ["q.report.json"]  # no temp file left behind


# ------------------------------------------------------------------------------------------- the verdict
def test_weights_that_saturate_without_vnni_fail_a_portable_validation() -> None:
    full = qdq_model(levels=127)  # 8-bit codes up to 127: same-sign pairs over the limit
    report = validate(float_model(), full, feeds())
    assert not report.ok and sum(report.saturating_pairs.values()) > 0
    assert "--kernels portable" in report.reason and "FAILED" in report.summary()
    accepted = validate(float_model(), full, feeds(), criteria=Criteria(portable=False))
    assert accepted.ok, accepted.summary()
    assert report.to_dict()["saturating_pairs"] == report.saturating_pairs


def test_fidelity_floor_fails_a_degraded_model() -> None:
    broken = _set_init(qdq_model(), "G_q", np.zeros((CLASSES, C_MID * HW * HW), np.int8))
    report = validate(float_model(), broken, feeds())
    assert not report.ok and report.reason.startswith("output y: ")
    assert "floor" in report.reason and "min_top1_agreement" in report.reason
    lowered = validate(float_model(), broken, feeds(), criteria=Criteria(min_top1_agreement=0.0))
    assert lowered.ok


def _fid(name: str, cos: float, top1: float | None, rows: int = 1000) -> OutputFidelity:
    return OutputFidelity(name, 30.0, cos, 0.1, top1, rows if top1 is not None else 0)


def test_a_kernel_gap_fails_onnxruntime_cpu_but_not_another_runtime() -> None:
    good = (_fid("y", 0.999, 0.97),)
    ort_cpu = failures(Criteria(), fidelity=good, gaps={"y": 4.2}, saturating={"conv": 3}, cpu="avx2")
    assert len(ort_cpu) == 2 and "(avx2)" in ort_cpu[1] and "add 4.20 times the quantization error" in ort_cpu[1]
    other = failures(Criteria(runtime="qdq", portable=False), fidelity=good, gaps={"y": 4.2}, saturating={"conv": 3},
                     cpu="avx2")
    assert other == []
    assert failures(Criteria(), fidelity=good, gaps={"y": 0.3}, saturating={}, cpu="vnni") == []


def test_level_gap_is_the_added_error_over_the_quantization_error() -> None:
    ref = [np.zeros((2, 3)), np.ones((1, 3))]
    sim = [r + 0.1 for r in ref]
    assert level_gap(ref, sim, sim) == 0.0
    assert level_gap(ref, sim, [s + 0.2 for s in sim]) == pytest.approx(4.0)
    assert level_gap(ref, ref, [r + 1 for r in ref]) == math.inf


def test_floors_use_top1_for_classifiers_and_cosine_otherwise() -> None:
    low = failures(Criteria(), fidelity=(_fid("logits", 0.99, 0.85), _fid("boxes", 0.9, None)), gaps={},
                   saturating={}, cpu="vnni")
    assert [line.split(":")[0] for line in low] == ["output logits", "output boxes"]
    assert "85.00% on 1000 samples" in low[0] and "cosine with the float model 0.90000" in low[1]
    few = failures(Criteria(), fidelity=(_fid("logits", 0.99, 0.875, rows=8),), gaps={}, saturating={}, cpu="vnni")
    assert few == []  # one flip in eight samples is no evidence of a model under 90 %
    assert agreement_upper_bound(0.875, 8) > 0.9 > agreement_upper_bound(0.78, 32)
    assert agreement_upper_bound(0.5, 0) == 0.5
    with pytest.raises(UserError, match="runtime"):
        Criteria(runtime="gpu")


def test_cpu_and_criteria_are_reported(good_report: ValidationReport) -> None:
    d = good_report.to_dict()
    assert d["cpu"] == describe() and d["criteria"]["runtime"] == "ort-cpu"
    assert [lv["name"] for lv in d["levels"]] == ["y"] and d["levels"][0]["cosine"] > 0.999
    assert 0 <= d["level_gaps"]["y"] < 1
    assert d["simulation"][0]["top1_agreement"] is not None and d["failures"] == []
    assert f"CPU: {describe()}" in good_report.summary()


def test_agreement_a_constant_prediction_reaches_is_judged_by_the_cosine() -> None:
    # Four samples of one float class: a model with a constant output agrees on all of them.
    constant = OutputFidelity("y", 0.2, 0.21, 1.0, 1.0, 4, majority=1.0)
    (line,) = failures(Criteria(), fidelity=(constant,), gaps={}, saturating={}, cpu="vnni")
    assert "cosine with the float model 0.21000" in line
    varied = OutputFidelity("y", 20.0, 0.9, 1.0, 1.0, 64, majority=0.1)
    assert failures(Criteria(), fidelity=(varied,), gaps={}, saturating={}, cpu="vnni") == []
    # A floor lowered to zero accepts any classifier.
    assert failures(Criteria(min_top1_agreement=0.0), fidelity=(constant,), gaps={}, saturating={}, cpu="vnni") == []
