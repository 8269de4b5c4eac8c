"""AssignSpecs / Calibrate / InsertQDQ / Cleanup: the structure they emit and the numerics in ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxq.passes.export.cleanup import CleanupPass
from onnxq.passes.quant.assign_specs import AssignSpecsPass
from onnxq.passes.quant.calibrate import CalibratePass
from onnxq.passes.quant.insert_qdq import InsertQDQPass, fit_bias

from onnxq.config.legacy import QuantConfig
from onnxq.core.context import QuantContext
from onnxq.core.graph import to_graph, to_model
from onnxq.core.pass_infra import PassManager
from onnxq.core.spec import INT8_WEIGHT_PC, QParams, is_power_of_two
from onnxq.targets.profiles import get_target
from tests.helpers import initializer, make_context, make_model, op_types, random_feeds, run_ort

CNN = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,3,8,8] x) => (float[N,5] y)
  <float[8,3,3,3] w1, float[8] b1, float[8,8,1,1] w2, float[8] b2, float[8,5] wf, float[5] bf> {
    c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
    r1 = Relu (c1)
    p1 = MaxPool <kernel_shape=[2,2], strides=[2,2]> (r1)
    c2 = Conv (p1, w2, b2)
    a = Add (c2, p1)
    g1 = GlobalAveragePool (a)
    f = Flatten (g1)
    y = Gemm (f, wf, bf)
}"""


def _ctx(config: QuantConfig, calib=None) -> QuantContext:
    return make_context(config=config, target=get_target(config.target), calib=calib)


def _quantize(model: onnx.ModelProto, config: QuantConfig, n: int = 6) -> tuple[onnx.ModelProto, QuantContext]:
    feeds = [random_feeds(model, seed=i, batch=4) for i in range(n)]
    ctx = _ctx(config, feeds)
    graph = to_graph(onnx.shape_inference.infer_shapes(model))
    from onnxq.core.graph import set_opset

    set_opset(graph, ctx.config.output_opset)
    PassManager([AssignSpecsPass(), CalibratePass(), InsertQDQPass(), CleanupPass()])(graph, ctx)
    out = to_model(graph, template=model)
    onnx.checker.check_model(out, full_check=True)
    return out, ctx


def _sqnr(ref: np.ndarray, test: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - test) ** 2)))


def test_assign_specs_places_qdq_the_onnxruntime_way():
    model = onnx.shape_inference.infer_shapes(make_model(CNN))
    ctx = _ctx(QuantConfig())
    AssignSpecsPass()(to_graph(model), ctx)
    # Relu is fused into the first conv's output quantizer: c1 itself is not quantized.
    assert "r1" in ctx.specs and "c1" not in ctx.specs
    assert ctx.specs["w1"].axis == 0 and ctx.specs["w1"].narrow and ctx.specs["w1"].bits == 8
    assert ctx.specs["wf"].axis == 1  # Gemm transB=0: output channels are columns
    assert ctx.specs["b1"].bits == 32
    assert ctx.shared["p1"] == "r1"  # MaxPool output reuses its input's parameters
    assert "y" not in ctx.specs  # graph outputs stay float
    assert ctx.specs["x"].bits == 8 and not ctx.specs["x"].signed


def test_assign_specs_reasons_and_exclusions():
    text = CNN.replace("f = Flatten (g1)", "e = Exp (g1)\n    f = Flatten (e)")
    model = onnx.shape_inference.infer_shapes(make_model(text))
    ctx = _ctx(QuantConfig(exclude=("Add",)))
    graph = to_graph(model)
    AssignSpecsPass()(graph, ctx)
    by_op = {n.name or n.outputs[0].name: n.op for n in graph.nodes}
    reasons = {by_op.get(k, k): v for k, v in ctx.float_ops.items()}
    assert "excluded by the user" in ctx.float_ops.values()
    assert any("Exp has no integer kernel" in v for v in reasons.values())


def test_first_and_last_layers_keep_8_bits_with_int4():
    model = onnx.shape_inference.infer_shapes(make_model(CNN))
    ctx = _ctx(QuantConfig(weight_bits=4))
    AssignSpecsPass()(to_graph(model), ctx)
    assert (ctx.specs["w1"].bits, ctx.specs["w2"].bits, ctx.specs["wf"].bits) == (8, 4, 8)
    ctx = _ctx(QuantConfig(weight_bits=4, first_last_bits=None))
    AssignSpecsPass()(to_graph(model), ctx)
    assert {ctx.specs[w].bits for w in ("w1", "w2", "wf")} == {4}


def test_w8a8_structure_and_fidelity():
    model = make_model(CNN)
    q, ctx = _quantize(model, QuantConfig())
    ops = op_types(q)
    assert ops.count("Conv") == 2 and "QuantizeLinear" in ops
    # Weight constants are int8 in [-127, 127]; biases int32 with s_b = s_in * s_w.
    w1 = initializer(q, "w1_quantized")
    assert w1.dtype == np.int8 and w1.min() >= -127
    b1_scale = initializer(q, "b1_scale")
    np.testing.assert_allclose(b1_scale, ctx.qparams["x"].scale * ctx.qparams["w1"].scale, rtol=1e-6)
    assert initializer(q, "b1_quantized").dtype == np.int32
    feeds = random_feeds(model, seed=99, batch=4)
    ref = run_ort(model, feeds)[0]
    fused, plain = run_ort(q, feeds, "all")[0], run_ort(q, feeds, "disable")[0]
    assert _sqnr(ref, plain) > 25
    np.testing.assert_allclose(fused, plain, atol=0.05 * np.abs(ref).max())
    assert q.graph.output[0].name == "y"


def test_qdq_model_equals_numpy_simulation_of_one_conv():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N,3,6,6] x) => (float[N,4,6,6] y) <float[4,3,3,3] w, float[4] b> {
        c = Conv <pads=[1,1,1,1]> (x, w, b)
        y = Relu (c)
    }"""
    model = make_model(text)
    cfg = QuantConfig(calib_method="minmax")
    from onnxq.targets.profiles import TARGETS, Target

    # Quantize the graph output too, so the whole Q/DQ chain is checked against numpy.
    t = TARGETS["ort-cpu"]
    target = Target(t.name, t.description, t.weight_ops, t.activation_ops, t.passthrough_ops,
                    t.fusable_activations, quantize_graph_outputs=True)
    feeds = [random_feeds(model, seed=i, batch=2) for i in range(3)]
    ctx = make_context(config=cfg, target=target, calib=feeds)
    graph = to_graph(onnx.shape_inference.infer_shapes(model))
    PassManager([AssignSpecsPass(), CalibratePass(), InsertQDQPass(), CleanupPass()])(graph, ctx)
    q = to_model(graph, template=model)
    x = feeds[0]["x"]
    from onnxq.core.spec import fake_quantize

    xq = fake_quantize(x, ctx.qparams["x"])
    wq = fake_quantize(initializer(model, "w"), ctx.qparams["w"])
    bq = fake_quantize(initializer(model, "b"), ctx.qparams["b"])
    ref_model = make_model(text, w=wq, b=bq)
    expected = fake_quantize(run_ort(ref_model, {"x": xq}, "disable")[0], ctx.qparams["y"])
    got = run_ort(q, {"x": x}, "disable")[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_pow2_scales_are_exact_powers_of_two():
    model = make_model(CNN)
    q, ctx = _quantize(model, QuantConfig(scale_kind="pow2"))
    for node in q.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert np.all(is_power_of_two(initializer(q, node.input[1]))), node.name
    feeds = random_feeds(model, seed=5, batch=4)
    assert _sqnr(run_ort(model, feeds)[0], run_ort(q, feeds)[0]) > 15


def test_int4_weights_are_stored_natively_at_opset_21():
    model = make_model(CNN)
    q, _ = _quantize(model, QuantConfig(weight_bits=4, first_last_bits=None))
    assert next(o.version for o in q.opset_import if o.domain == "") >= 21
    w2 = next(i for i in q.graph.initializer if i.name == "w2_quantized")
    assert w2.data_type == onnx.TensorProto.INT4
    vals = onnx.numpy_helper.to_array(w2).astype(np.int8)
    assert vals.min() >= -8 and vals.max() <= 7
    feeds = random_feeds(model, seed=3, batch=2)
    assert _sqnr(run_ort(model, feeds)[0], run_ort(q, feeds)[0]) > 8


def test_int8_symmetric_activations_have_zero_zero_points():
    q, _ = _quantize(make_model(CNN), QuantConfig(activation_dtype="int8"))
    for node in q.graph.node:
        if node.op_type == "QuantizeLinear":
            zp = initializer(q, node.input[2])
            assert zp.dtype == np.int8 and np.all(zp == 0)


def test_fit_bias_raises_weight_scale_to_avoid_int32_overflow():
    qp = QParams(np.array([1e-9, 1e-2], np.float32), np.zeros(2, np.int64), INT8_WEIGHT_PC.with_axis(0))
    bias = np.array([100.0, 0.1], np.float32)
    fitted = fit_bias(qp, np.float32(1e-3), bias)
    codes = np.rint(bias / (fitted.scale * 1e-3))
    assert np.all(np.abs(codes) <= 2**31 - 1)
    assert fitted.scale[0] > qp.scale[0] and fitted.scale[1] == qp.scale[1]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_matmul_and_gemm_weight_axes(trans_b):
    shape = "[5,8]" if trans_b else "[8,5]"
    text = f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N,8] x) => (float[N,5] y, float[N,5] z) <float{shape} w, float[8,5] m> {{
        y = Gemm <transB={trans_b}> (x, w)
        z = MatMul (x, m)
    }}"""
    model = onnx.shape_inference.infer_shapes(make_model(text))
    ctx = _ctx(QuantConfig())
    AssignSpecsPass()(to_graph(model), ctx)
    assert ctx.specs["w"].axis == (0 if trans_b else 1)
    assert ctx.specs["m"].axis == 1
    q, _ = _quantize(model, QuantConfig())
    feeds = random_feeds(model, seed=1, batch=3)
    for ref, got in zip(run_ort(model, feeds), run_ort(q, feeds)):
        assert _sqnr(ref, got) > 30


def test_onnxruntime_fuses_the_emitted_qdq_into_integer_kernels():
    from onnxq.report.validate import optimized_op_counts

    q, _ = _quantize(make_model(CNN), QuantConfig())
    counts = optimized_op_counts(q)
    assert counts.get("QLinearConv", 0) == 2
    assert counts.get("QGemm", 0) == 1
    assert counts.get("QLinearAdd", 0) == 1
    assert counts.get("QLinearGlobalAveragePool", 0) == 1
    assert not {"Conv", "Gemm", "FusedConv"} & set(counts)


def test_onnxruntime_fuses_matmul_with_per_column_weights():
    from onnxq.report.validate import optimized_op_counts

    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N,8] x) => (float[N,4] z) <float[8,6] m, float[6,4] m2> {
        h = MatMul (x, m)
        r = Relu (h)
        z = MatMul (r, m2)
    }"""
    q, _ = _quantize(make_model(text), QuantConfig())
    counts = optimized_op_counts(q)
    integer = {k: v for k, v in counts.items() if k in ("QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger")}
    assert sum(integer.values()) == 2, counts


def test_4bit_activations_keep_network_input_and_classifier_input_at_8_bits():
    model = make_model(CNN)
    q, ctx = _quantize(model, QuantConfig(weight_bits=4, activation_bits=4))
    assert ctx.specs["x"].bits == 8 and ctx.specs["f"].bits == 8
    # back to the head's output: the pooled values are the classifier's input (BRECQ's and QDrop's 8-bit
    # "last layer input" is the output of the op before the pooling)
    assert ctx.specs["g1"].bits == 8 and ctx.specs["a"].bits == 8
    assert ctx.specs["r1"].bits == 4 and ctx.specs["p1"].bits == 4 and ctx.specs["c2"].bits == 4
    dtypes = {i.name: i.data_type for i in q.graph.initializer}
    # 4-bit activations live in uint8 containers clipped to [0, 15] (QCDQ).
    assert dtypes["r1_zero_point"] == onnx.TensorProto.UINT8
    clip = next(n for n in q.graph.node if n.name == "r1_Clip")
    assert initializer(q, clip.input[2]) == 15 and initializer(q, clip.input[1]) == 0
    feeds = random_feeds(model, seed=3, batch=2)
    assert _sqnr(run_ort(model, feeds)[0], run_ort(q, feeds)[0]) > 5


def test_int8_symmetric_activations_still_fuse_conv():
    import onnxq
    from onnxq.report.validate import optimized_op_counts

    model = make_model(CNN)
    _, ctx = _quantize(model, QuantConfig(activation_dtype="int8"))
    assert "r1" in ctx.specs and "c1" not in ctx.specs  # the Relu's output is quantized, as for uint8
    feeds = [random_feeds(model, seed=i, batch=4) for i in range(6)]
    q = onnxq.quantize(model, feeds, onnxq.Config(activations=onnxq.Activations(dtype="int8")),
                       validation=feeds[:1]).model
    counts = optimized_op_counts(q)
    # A symmetric int8 grid reaches below the Relu's 0, so onnxruntime cannot drop the Relu into the Q;
    # the export quantizes before it too (Conv -> Q -> DQ -> Relu -> Q, exact: passes/export/clip_on_codes.py)
    # and Conv -> Q becomes QLinearConv. onnxruntime 1.31 leaves the 1x1 conv feeding the residual Add
    # in float with int8 activations (uint8 fuses it: see the test above).
    assert counts.get("QLinearConv", 0) >= 1 and "FusedConv" not in counts, counts


def test_additive_attention_mask_stays_float():
    """A mask of float32's lowest value added to attention scores: quantizing it (one 8-bit scale over
    [-3.4e38, x]) would flatten the scores, so the mask and the masked sum stay float."""
    model = make_model("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,4,6] q, float[N,1,6] m) => (float[N,4,6] y) <float[6,6] wk> {
            s = MatMul (q, wk)
            a = Add (s, m)
            y = Softmax <axis=-1> (a)
        }""")

    def feed(seed: int) -> dict[str, np.ndarray]:
        r = np.random.default_rng(seed)
        mask = np.where(r.random((4, 1, 6)) < 0.3, np.finfo(np.float32).min, 0).astype(np.float32)
        return {"q": r.standard_normal((4, 4, 6)).astype(np.float32), "m": mask}

    ctx = _ctx(QuantConfig(), [feed(i) for i in range(6)])
    graph = to_graph(onnx.shape_inference.infer_shapes(model))
    PassManager([AssignSpecsPass(), CalibratePass(), InsertQDQPass(), CleanupPass()])(graph, ctx)
    q = to_model(graph, template=model)
    assert "m" not in ctx.qparams and "a" not in ctx.qparams and "s" in ctx.qparams
    assert sorted(ctx.report["calibration"]["kept_float"]) == ["a", "m"]
    assert any("mask" in reason for reason in ctx.float_ops.values())
    quantized_inputs = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert not quantized_inputs & {"m", "a"}
    feeds = feed(99)
    ref, got = run_ort(model, feeds)[0], run_ort(q, feeds)[0]
    assert _sqnr(ref, got) > 25


TRANSFORMER_FFN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,T,8] x) => (float[N,T,8] y) <float[8] gam, float[8] bet, float[8,16] w1, float[16] b1, float[16,8] w2,
                                         float[8] b2> {
    h = LayerNormalization <axis=-1> (x, gam, bet)
    m = MatMul (h, w1)
    a = Add (m, b1)
    c1 = Constant <value = float {1.0}> ()
    c2 = Constant <value = float {1.4142135}> ()
    d = Div (a, c2)
    e = Erf (d)
    e1 = Add (e, c1)
    gl = Mul (a, e1)
    z = MatMul (gl, w2)
    zb = Add (z, b2)
    y = Add (zb, x)
}"""


def test_weight_matmul_read_only_by_float_ops_keeps_a_float_output():
    """A 3-D MatMul whose output only a float bias Add reads: no output Q; onnxruntime runs it as
    MatMulIntegerToFloat (integer products, float result), the same at both optimisation levels."""
    from onnxq.report.validate import optimized_op_counts

    model = make_model(TRANSFORMER_FFN)
    q, ctx = _quantize(model, QuantConfig())
    assert "m" not in ctx.specs and "z" not in ctx.specs
    assert set(ctx.report["plan"]["float_matmul_outputs"]) == {"MatMul(m)", "MatMul(z)"}
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in ("m", "z") for n in q.graph.node)
    counts = optimized_op_counts(q)
    assert counts.get("MatMulIntegerToFloat", 0) == 2, counts
    feeds = random_feeds(model, seed=5, batch=3, dims={"T": 4})
    np.testing.assert_allclose(run_ort(q, feeds, "all")[0], run_ort(q, feeds, "disable")[0], rtol=1e-4, atol=1e-4)


def test_two_d_matmul_with_a_bias_add_keeps_its_output_q():
    """onnxruntime fuses a 2-D MatMul + constant Add into a float Gemm before its QDQ fusion, so there
    the output Q stays (QLinearMatMul)."""
    model = make_model("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,8] x) => (float[N,4] y) <float[8,4] w, float[4] b> {
            m = MatMul (x, w)
            y = Add (m, b)
        }""")
    _, ctx = _quantize(model, QuantConfig())
    assert "m" in ctx.specs and not ctx.report["plan"]["float_matmul_outputs"]


def test_elementwise_ops_between_float_ops_stay_float():
    """GELU's inner Mul and the residual Add read only float producers: quantizing their inputs would
    round without gaining a kernel, so they stay float (the Mul's output stays quantized for the MatMul)."""
    from onnxq.targets.placement import ISOLATED

    model = make_model(TRANSFORMER_FFN)
    q, ctx = _quantize(model, QuantConfig())
    isolated = set(ctx.report["plan"]["isolated_float"])
    assert isolated == {"Add(e1)", "Mul(gl)", "Add(y)"}, isolated
    assert sum(reason == ISOLATED for reason in ctx.float_ops.values()) == len(isolated)
    # the MatMul inputs stay quantized (h, and gl, which the second MatMul reads)
    assert "h" in ctx.specs and "gl" in ctx.specs and "a" not in ctx.specs and "y" not in ctx.specs
    # a residual Add between two convolutions is not isolated: it still runs as QLinearAdd (CNN test)
    _, cnn_ctx = _quantize(make_model(CNN), QuantConfig())
    assert not cnn_ctx.report["plan"]["isolated_float"]
    # an NPU toolchain wants every op quantized: the rule is onnxruntime CPU's only
    _, npu_ctx = _quantize(model, QuantConfig(target="qnn"))
    assert not npu_ctx.report["plan"]["isolated_float"] and "Add(y)" not in npu_ctx.float_ops and "zb" in npu_ctx.specs


def test_float_readers_of_a_float_producers_output_read_it_unrounded():
    """A LayerNorm output feeds a quantized MatMul and a float residual Add: the MatMul reads DQ(Q(h)), the
    Add reads h itself (no rounding, no kernel lost: the LayerNorm is float anyway)."""
    model = make_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,T,8] x) => (float[N,T,8] y) <float[8] gam, float[8] bet, float[8,8] w, float[8] b> {
            h = LayerNormalization <axis=-1> (x, gam, bet)
            m = MatMul (h, w)
            a = Add (m, b)
            y = Add (a, h)
        }""")
    q, ctx = _quantize(model, QuantConfig())
    assert "h" in ctx.specs
    matmul = next(n for n in q.graph.node if n.op_type == "MatMul")
    residual = next(n for n in q.graph.node if n.op_type == "Add" and "y" in n.output)
    assert matmul.input[0] != "h" and "h" in residual.input
    feeds = random_feeds(model, seed=3, batch=2, dims={"T": 4})
    np.testing.assert_allclose(run_ort(q, feeds, "all")[0], run_ort(q, feeds, "disable")[0], rtol=1e-4, atol=1e-4)
