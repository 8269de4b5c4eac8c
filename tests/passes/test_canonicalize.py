"""CanonicalizePass: constants to initializers, Identity removal, safe folding; equivalence in ORT."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxq.passes.float.canonicalize import CanonicalizePass
from onnxq.passes.float.fold_batchnorm import FoldBatchNormPass

from tests.helpers import (
    assert_close,
    initializer,
    make_context,
    make_model,
    op_types,
    random_feeds,
    run_ort,
    run_pass,
)

HEAD = '<ir_version: 8, opset_import: ["" : 13]>'


def _check_equivalent(model: onnx.ModelProto, out: onnx.ModelProto, batch: int = 2) -> None:
    feeds = random_feeds(model, seed=1, batch=batch)
    assert_close(run_ort(model, feeds, "disable"), run_ort(out, feeds, "disable"), rtol=1e-5, atol=1e-5)


def _canon(model: onnx.ModelProto, **kwargs) -> tuple[onnx.ModelProto, dict]:
    out, ctx = run_pass(model, CanonicalizePass(**kwargs))
    return out, ctx.report["canonicalize"]


def _inits_to_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Paddle style: every initializer becomes a Constant node (prepended)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
             for t in out.graph.initializer]
    del out.graph.initializer[:]
    all_nodes = nodes + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(all_nodes)
    onnx.checker.check_model(out)
    return out


def test_constant_nodes_become_initializers():
    model = make_model(f"""{HEAD}
        g (float[N,6] x) => (float[N,3,2] y) {{
            s = Constant <value_ints=[-1,3,2]> ()
            r = Reshape (x, s)
            f = Constant <value_float=2.5> ()
            m = Mul (r, f)
            fs = Constant <value_floats=[1.0, -1.0]> ()
            a = Add (m, fs)
            i = Constant <value_int=1> ()
            c = Cast <to=1> (i)
            t = Constant <value=float[3,1] {{0.5, 1.5, 2.5}}> ()
            b = Add (a, c)
            y = Mul (b, t)
        }}""")
    out, rep = _canon(model, fold=False)
    assert "Constant" not in op_types(out)
    assert rep["constants_to_initializers"] == 5
    assert initializer(out, "f").dtype == np.float32 and initializer(out, "s").dtype == np.int64
    np.testing.assert_array_equal(initializer(out, "s"), [-1, 3, 2])
    _check_equivalent(model, out)
    # with folding on, Cast(i) folds too
    out, rep = _canon(model)
    assert op_types(out) == ["Reshape", "Mul", "Add", "Add", "Mul"] and rep["folded"] == 1
    _check_equivalent(model, out)


def test_identity_and_dropout_removed_output_names_kept():
    model = make_model(f"""{HEAD}
        g (float[N,4] x) => (float[N,4] y, float[N,4] z) {{
            a = Identity (x)
            b = Relu (a)
            c = Dropout (b)
            d = Sigmoid (c)
            y = Identity (d)
            e = Identity (d)
            z = Identity (e)
        }}""")
    out, rep = _canon(model)
    assert op_types(out) == ["Relu", "Sigmoid", "Identity"]
    assert rep["identities_removed"] == 4  # z = Identity(y) must stay: both are graph outputs
    assert [o.name for o in out.graph.output] == ["y", "z"]
    assert [i.name for i in out.graph.input] == ["x"]
    _check_equivalent(model, out)


def test_identities_that_must_stay():
    # x -> y directly (input to output), and a Dropout whose mask is used.
    model = make_model(f"""{HEAD}
        g (float[N,4] x) => (float[N,4] y, bool[N,4] mask, float[N,4] z) {{
            y = Identity (x)
            z, mask = Dropout (x)
        }}""")
    out, rep = _canon(model)
    assert op_types(out) == ["Identity", "Dropout"] and rep["identities_removed"] == 0
    assert [o.name for o in out.graph.output] == ["y", "mask", "z"]


def test_dropout_training_mode_graph_input_stays():
    model = make_model(f"""{HEAD}
        g (float[N,4] x, bool t) => (float[N,4] y) {{
            d = Dropout (x, , t)
            y = Relu (d)
        }}""")
    out, rep = _canon(model)
    assert "Dropout" in op_types(out) and rep["identities_removed"] == 0


def test_folding_is_safe():
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    model = make_model(f"""{HEAD}
        g (float[N,4] x, float[3] p) => (float[N,3] y, float[3] o) <float[3,4] w> {{
            wt = Transpose (w)
            h = MatMul (x, wt)
            qs = Constant <value=float {{0.1}}> ()
            q = QuantizeLinear (w, qs)
            dq = DequantizeLinear (q, qs)
            dqt = Transpose (dq)
            h2 = MatMul (x, dqt)
            y = Add (h, h2)
            o = Add (p, p)
        }}""", w=w)
    out, rep = _canon(model)
    ops = op_types(out)
    assert ops.count("Transpose") == 1 and "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert ops.count("Add") == 2  # the Add of a graph input stays
    assert rep["folded"] == 1
    _check_equivalent(model, out)


def test_size_threshold_blocks_big_outputs():
    # ConstantOfShape: the size is known before evaluation; NonZero: only after it.
    model = make_model(f"""{HEAD}
        g (float[N,1] x) => (float[N,1000] y, float[N,1000] z) <float[1000] ones> {{
            s = Constant <value=int64[1] {{1000}}> ()
            big = ConstantOfShape <value=float[1] {{1.0}}> (s)
            y = Mul (x, big)
            nz = NonZero (ones)
            nzf = Cast <to=1> (nz)
            z = Mul (x, nzf)
        }}""", ones=np.ones(1000, np.float32))
    out, rep = _canon(model, size_threshold=1000)
    assert {"ConstantOfShape", "NonZero", "Cast"} <= set(op_types(out)) and rep["folded"] == 0
    out, rep = _canon(model)
    assert op_types(out) == ["Mul", "Mul"] and rep["folded"] == 3
    _check_equivalent(model, out)


def test_dynamic_batch_stays_symbolic():
    # a = Relu(x) is declared (value_info) with the symbolic batch N: Shape(a) must not fold.
    model = make_model(f"""{HEAD}
        g (float[N,3,4,4] x) => (float[N,48] y, float[6,8] z)
          <float[2,3,8] r, float[6,8] rr, float[N,3,4,4] a> {{
            a = Relu (x)
            s = Shape (a)
            i0 = Constant <value=int64[1] {{0}}> ()
            n = Gather <axis=0> (s, i0)
            m1 = Constant <value=int64[1] {{-1}}> ()
            shp = Concat <axis=0> (n, m1)
            y = Reshape (x, shp)
            rs = Relu (r)
            rshp = Shape (rr)
            z = Reshape (rs, rshp)
        }}""", rr=np.zeros((6, 8), np.float32))
    out, rep = _canon(model)
    ops = op_types(out)
    assert ops.count("Shape") == 1 and "Gather" in ops and "Concat" in ops  # dynamic N is not baked in
    assert ops.count("Reshape") == 2 and ops.count("Relu") == 1  # Relu(r), Shape(rr) folded; z is an output
    assert rep["folded"] == 2
    dim0 = out.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "N" and not dim0.HasField("dim_value")
    for batch in (1, 3):
        _check_equivalent(model, out, batch=batch)


def test_static_shape_of_intermediate_folds_not_of_graph_input():
    model = make_model(f"""{HEAD}
        g (float[2,12] x) => (float[4,6] y, float[2,12] x2) <float[2,12] a> {{
            a = Relu (x)
            s = Shape (a)
            one = Constant <value=int64[1] {{1}}> ()
            c = Gather <axis=0> (s, one)
            two = Constant <value=int64[1] {{2}}> ()
            h = Div (c, two)
            four = Constant <value=int64[1] {{4}}> ()
            shp = Concat <axis=0> (four, h)
            y = Reshape (a, shp)
            sx = Shape (x)
            x2 = Reshape (x, sx)
        }}""")
    out, rep = _canon(model)
    assert sorted(op_types(out)) == ["Relu", "Reshape", "Reshape", "Shape"]  # Shape(x) reads a graph input
    assert rep["folded"] == 4  # Shape(a), Gather, Div, Concat
    np.testing.assert_array_equal(initializer(out, "shp"), [4, 6])
    _check_equivalent(model, out)


def test_paddle_style_opset11_constants_and_unfused_bn():
    text = """<ir_version: 6, opset_import: ["" : 11]>
        g (float[N,3,8,8] x) => (float[N,4,4,4] out)
          <float[4,3,3,3] w, float[4] g, float[4] be, float[4] mu, float[4] var, float[4] gb, float[4] beb,
           float[4] mub, float[4] varb> {
            c = Conv <pads=[1,1,1,1], strides=[2,2]> (x, w)
            b = BatchNormalization <epsilon=0.00001, momentum=0.9> (c, g, be, mu, var)
            r = Relu (b)
            x2 = Identity (r)
            t = Add (r, x2)
            l = BatchNormalization <epsilon=0.00001> (t, gb, beb, mub, varb)
            out = Identity (l)
        }"""
    model = _inits_to_constant_nodes(make_model(text, seed=5))
    assert op_types(model).count("Constant") == 9
    out, ctx = run_pass(model, CanonicalizePass())
    assert "Constant" not in op_types(out) and "Identity" not in op_types(out)
    assert ctx.report["canonicalize"]["constants_to_initializers"] == 9
    assert ctx.report["canonicalize"]["identities_removed"] == 2
    out2, ctx2 = run_pass(out, FoldBatchNormPass())
    assert op_types(out2) == ["Conv", "Relu", "Add", "Mul", "Add"]
    assert ctx2.report["fold_batchnorm"] == {"folded": 1, "decomposed": 1, "refused": []}
    assert [o.name for o in out2.graph.output] == ["out"]
    _check_equivalent(model, out2)


def test_report_accumulates_and_second_run_is_noop():
    model = make_model(f"""{HEAD}
        g (float[N,4] x) => (float[N,4] y) {{
            a = Identity (x)
            y = Relu (a)
        }}""")
    from onnxq.config.legacy import QuantConfig
    from onnxq.core.graph import to_graph

    graph, ctx = to_graph(model), make_context(QuantConfig())
    assert CanonicalizePass()(graph, ctx).modified
    assert not CanonicalizePass()(graph, ctx).modified
    assert ctx.report["canonicalize"]["identities_removed"] == 1


def test_sparse_constant_stays():
    values = numpy_helper.from_array(np.array([2.0], np.float32), "v")
    indices = numpy_helper.from_array(np.array([1], np.int64), "i")
    sparse = helper.make_sparse_tensor(values, indices, [3])
    node = helper.make_node("Constant", [], ["c"], sparse_value=sparse)
    add = helper.make_node("Add", ["x", "c"], ["y"])
    g = helper.make_graph([node, add], "g", [helper.make_tensor_value_info("x", 1, [3])],
                          [helper.make_tensor_value_info("y", 1, [3])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    out, rep = _canon(model, fold=False)
    assert rep["constants_to_initializers"] == 0 and "Constant" in op_types(out)


def test_constant_graph_output_keeps_its_node():
    model = make_model(f"""{HEAD}
        g (float[N,2] x) => (float[N,2] y, float[2] c) {{
            c = Constant <value=float[2] {{1.0, 2.0}}> ()
            y = Add (x, c)
        }}""")
    out, rep = _canon(model)
    assert op_types(out) == ["Constant", "Add"] and rep["constants_to_initializers"] == 0
    assert [o.name for o in out.graph.output] == ["y", "c"]
    _check_equivalent(model, out)
