"""The export passes: what onnxruntime runs at ORT_ENABLE_ALL is what the report says (structure tests:
which ops fuse; no timing)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxq
from onnxq.errors import UserError
from onnxq.report.validate import optimized_op_counts
from onnxq.targets.rules import check_target
from tests.helpers import init_array, make_model, run_ort

CHAIN = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) <float[4,4,3,3] w1, float[4,4,3,3] w2, float[4,4,1,1] w3> {
        a = Conv <pads=[1,1,1,1]> (x, w1)
        r = Relu (a)
        b = Conv <pads=[1,1,1,1]> (r, w2)
        r2 = Relu (b)
        y = Conv (r2, w3)
    }"""


@pytest.fixture(scope="module")
def chain():
    model = make_model(CHAIN)
    for node, name in zip(model.graph.node, ("first", "relu1", "mid", "relu2", "last"), strict=True):
        node.name = name
    rng = np.random.default_rng(0)
    calib = [{"x": rng.normal(size=(4, 4, 6, 6)).astype(np.float32)} for _ in range(4)]
    return model, calib


def test_an_excluded_conv_stays_float_at_enable_all(chain) -> None:
    model, calib = chain
    base = onnxq.quantize(model, calib, onnxq.Config(), validation=calib[:1])
    res = onnxq.quantize(model, calib, onnxq.Config(exclude=("mid",)), validation=calib[:1])
    assert res.report["float_ops"] == {"mid": "excluded by the user"} and res.report["kept_float"] == ["mid"]
    counts = optimized_op_counts(res.model)
    # without the guard onnxruntime quantizes the float weight itself and fuses a third QLinearConv
    assert optimized_op_counts(base.model).get("QLinearConv") == 2  # the last Conv's output stays float
    assert counts.get("QLinearConv") == 1 and counts.get("Conv") == 2
    assert check_target(res.model, "ort-cpu") == []
    for level in ("all", "disable"):  # the guard reads the same values
        np.testing.assert_allclose(run_ort(res.model, calib[0], level)[0], run_ort(res.model, calib[0], "disable")[0],
                                   rtol=1e-5, atol=1e-5)


def test_an_exclude_that_names_nothing_is_an_error(chain) -> None:
    model, calib = chain
    with pytest.raises(UserError, match=r"'midd' matches no node name or op type.*did you mean 'mid'"):
        onnxq.quantize(model, calib, onnxq.Config(exclude=("midd",)), validation=calib[:1])
    res = onnxq.quantize(model, calib, onnxq.Config(exclude=("Relu",)), validation=calib[:1])  # an op type
    assert set(res.report["float_ops"]) >= {"relu1", "relu2"}


def test_int4_weights_run_on_the_int8_kernels_and_stay_4_bit_in_the_file(chain) -> None:
    model, calib = chain
    cfg = onnxq.Config(weights=onnxq.Weights(bits=4, first_last_bits=None),
                       validation=onnxq.Validation(min_top1_agreement=0.0, min_cosine=-1.0))
    res = onnxq.quantize(model, calib, cfg, validation=calib[:1])
    kinds = {t.name: t.data_type for t in res.model.graph.initializer}
    casts = [n for n in res.model.graph.node if n.op_type == "Cast"]
    assert casts and all(kinds[c.input[0]] == onnx.TensorProto.INT4 for c in casts)
    assert res.report["int4_cast_to_int8"] == 3
    assert optimized_op_counts(res.model).get("QLinearConv") == 2  # as the int8 model: no float Conv left
    codes = init_array(res.model, casts[0].output[0])
    assert codes.min() >= -8 and codes.max() <= 7
    np.testing.assert_allclose(run_ort(res.model, calib[0], "all")[0], run_ort(res.model, calib[0], "disable")[0],
                               rtol=1e-5, atol=1e-4)


def test_other_runtimes_keep_float_layers_as_written(chain) -> None:
    model, calib = chain
    cfg = onnxq.Config(target="tensorrt", exclude=("mid",), validation=onnxq.Validation(enabled=False))
    res = onnxq.quantize(model, calib, cfg)
    assert "kept_float" not in res.report  # per-channel activation DQs are for onnxruntime only
    assert all(n.op_type != "DequantizeLinear" or "per_channel" not in n.name for n in res.model.graph.node)


def test_fit_kernels_pass_repairs_any_pair_left_over_the_limit() -> None:
    from onnxq.passes.export.fit_kernels import FitKernelsPass

    from onnxq.core.context import QuantContext
    from onnxq.core.graph import to_graph, to_model
    from onnxq.report.kernel_check import saturating_pairs
    from onnxq.targets.profiles import resolve_config
    from tests.targets.test_ort_kernels import _saturating_model

    model, calib = _saturating_model()
    free = onnxq.quantize(model, calib, onnxq.Config(kernels="int32", rounding=onnxq.RoundToNearest()),
                          validation=calib[:1]).model
    assert saturating_pairs(free)
    ctx = QuantContext(config=resolve_config(onnxq.Config()))
    graph = to_graph(free)
    result = FitKernelsPass().call(graph, ctx)
    assert result.modified and ctx.report["weight_rounding"]["repaired_at_export"] == sum(
        saturating_pairs(free).values())
    assert saturating_pairs(to_model(graph)) == {}


def _relu6_qdq(scale: float, opset: int = 13) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv (int8 weight) -> Clip(0, 6) -> Q(scale, 0) -> DQ -> y."""
    rng = np.random.default_rng(5)
    h = onnx.helper
    inits = [onnx.numpy_helper.from_array(v, k) for k, v in {
        "xs": np.array(0.02, np.float32), "xz": np.array(0, np.uint8),
        "wq": rng.integers(-60, 60, (8, 4, 3, 3)).astype(np.int8), "ws": np.full(8, 0.01, np.float32),
        "ys": np.array(scale, np.float32), "yz": np.array(0, np.uint8),
        "lo": np.array(0, np.float32), "hi": np.array(6, np.float32)}.items()]
    nodes = [h.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             h.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             h.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], axis=0),
             h.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             h.make_node("Clip", ["c", "lo", "hi"], ["r"], name="relu6"),
             h.make_node("QuantizeLinear", ["r", "ys", "yz"], ["rq"]),
             h.make_node("DequantizeLinear", ["rq", "ys", "yz"], ["y"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4, 8, 8])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 8, 8, 8])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], ir_version=8 if opset < 21 else 10)


@pytest.mark.parametrize(("scale", "moved"), [(2.0 ** -5, True), (6.0 / 255, False)])
def test_clip_on_codes_is_exact_and_lets_the_conv_fuse(scale, moved) -> None:
    from onnxq.passes.export.clip_on_codes import ClipOnCodesPass

    from onnxq.core.context import QuantContext
    from onnxq.core.graph import to_graph, to_model
    from onnxq.targets.profiles import get_target, resolve_config

    model = _relu6_qdq(scale)
    ctx = QuantContext(config=resolve_config(onnxq.Config()), target=get_target("ort-cpu"))
    graph = to_graph(model)
    result = ClipOnCodesPass().call(graph, ctx)
    assert result.modified == moved
    out = to_model(graph)
    x = {"x": np.random.default_rng(6).uniform(-1, 3, (2, 4, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run_ort(out, x, "disable")[0], run_ort(model, x, "disable")[0])  # exact
    counts = optimized_op_counts(out)
    assert counts.get("QLinearConv") == 1  # 2^-5 * 255 > 6: fused only after the move; 6/255: onnxruntime's own
    if moved:
        assert optimized_op_counts(model).get("QLinearConv") is None and ctx.report["clip_on_codes"] == ["relu6"]
        clip = next(n for n in out.graph.node if n.op_type == "Clip")
        assert clip.input[0] == "rq" or clip.input[0].endswith("rq")


def test_asymmetric_int4_weights_are_read_centred_without_zero_points(chain) -> None:
    from onnxq.core.weight_cast import folded_constants

    model, calib = chain
    cfg = onnxq.Config(weights=onnxq.Weights(bits=4, first_last_bits=None, symmetric=False),
                       validation=onnxq.Validation(min_top1_agreement=0.0, min_cosine=-1.0))
    res = onnxq.quantize(model, calib, cfg, validation=calib[:1])
    folded = folded_constants(res.model.graph)
    dqs = [n for n in res.model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_centred")]
    assert len(dqs) == 3 and res.report["int4_cast_to_int8"] == 3
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in res.model.graph.initializer}
    for dq in dqs:
        codes, kind = folded[dq.input[0]]
        assert kind == onnx.TensorProto.INT8 and codes.min() >= -15 and codes.max() <= 15
        assert not np.any(inits[dq.input[2]])  # zero-point 0: the fast kernels
        assert any(t.data_type == onnx.TensorProto.INT4 for t in res.model.graph.initializer
                   if dq.input[0].startswith(t.name))  # 4 bits a weight in the file
    assert optimized_op_counts(res.model).get("QLinearConv") == 2
    assert check_target(res.model, "ort-cpu") == []
    np.testing.assert_allclose(run_ort(res.model, calib[0], "all")[0], run_ort(res.model, calib[0], "disable")[0],
                               rtol=1e-5, atol=1e-4)


def test_clip_inside_the_q_range_at_opset_21_is_dropped_not_moved() -> None:
    """onnxruntime 1.31 did not fold a ReLU6 into an opset-21 Q even when the Q's range [0, 6] lies inside it;
    the Clip on the codes would be [0, 255], the identity, so the pass drops the activation instead:
    the same codes, one QLinearConv and no Clip left."""
    from onnxq.passes.export.clip_on_codes import ClipOnCodesPass

    from onnxq.core.context import QuantContext
    from onnxq.core.graph import to_graph, to_model
    from onnxq.targets.profiles import get_target, resolve_config

    model = _relu6_qdq(6.0 / 255, opset=21)
    ctx = QuantContext(config=resolve_config(onnxq.Config()), target=get_target("ort-cpu"))
    graph = to_graph(model)
    assert ClipOnCodesPass().call(graph, ctx).modified and ctx.report["clip_on_codes"] == ["relu6"]
    out = to_model(graph)
    assert not any(n.op_type == "Clip" for n in out.graph.node)
    x = {"x": np.random.default_rng(6).uniform(-1, 3, (2, 4, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run_ort(out, x, "disable")[0], run_ort(model, x, "disable")[0])  # exact
    counts = optimized_op_counts(out)
    assert counts.get("QLinearConv") == 1 and "Clip" not in counts


def test_dynamic_matmul_activations_fuse_and_match_both_levels() -> None:
    """--dynamic: each weight MatMul quantizes its input per call (DynamicQuantizeLinear + MatMulInteger);
    onnxruntime fuses that into DynamicQuantizeMatMul, the same at both levels, close to the float model."""
    from tests.helpers import make_model, random_feeds

    model = make_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,T,16] x) => (float[N,T,8] y) <float[16] gam, float[16] bet, float[16,32] w1, float[32] b1,
                                                   float[32,8] w2> {
            h = LayerNormalization <axis=-1> (x, gam, bet)
            m = MatMul (h, w1)
            a = Add (m, b1)
            r = Relu (a)
            y = MatMul (r, w2)
        }""")
    calib = [random_feeds(model, seed=i, batch=4, dims={"T": 5}) for i in range(6)]
    res = onnxq.quantize(model, calib, onnxq.Config(activations=onnxq.Activations(dynamic=True)),
                         validation=calib[:2])
    q = res.model
    assert len(res.report["dynamic_matmuls"]) == 2
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("DynamicQuantizeLinear") == 2 and ops.count("MatMulInteger") == 2 and "MatMul" not in ops
    counts = optimized_op_counts(q)
    assert counts.get("DynamicQuantizeMatMul", 0) + counts.get("MatMulIntegerToFloat", 0) == 2, counts
    feeds = random_feeds(model, seed=9, batch=3, dims={"T": 5})
    ref, fused, simulated = (run_ort(model, feeds)[0], run_ort(q, feeds, "all")[0], run_ort(q, feeds, "disable")[0])
    np.testing.assert_allclose(fused, simulated, rtol=1e-4, atol=1e-4)
    assert float(np.sum((fused - ref) ** 2) / np.sum(ref ** 2)) < 1e-3
    with pytest.raises(onnxq.UserError, match="dynamic MatMul activations"):
        onnxq.quantize(model, calib, onnxq.Config(target="qnn", activations=onnxq.Activations(dynamic=True)))
