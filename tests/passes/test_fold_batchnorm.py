"""FoldBatchNormPass: float equivalence in onnxruntime and the structure of the rewritten graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxq.passes.float.fold_batchnorm import FoldBatchNormPass

from onnxq.config.legacy import QuantConfig
from onnxq.errors import UserError
from tests.helpers import (
    assert_close,
    initializer,
    make_model,
    op_types,
    random_feeds,
    run_ort,
    run_pass,
)

HEAD = '<ir_version: 8, opset_import: ["" : 13]>'
BN4 = "float[4] g, float[4] be, float[4] mu, float[4] var"


def _check_equivalent(model: onnx.ModelProto, out: onnx.ModelProto, batch: int = 2) -> None:
    feeds = random_feeds(model, seed=1, batch=batch)
    assert_close(run_ort(model, feeds, "disable"), run_ort(out, feeds, "disable"), rtol=1e-5, atol=1e-5)


def _fold(model: onnx.ModelProto, **kwargs) -> tuple[onnx.ModelProto, dict]:
    out, ctx = run_pass(model, FoldBatchNormPass(**kwargs))
    return out, ctx.report["fold_batchnorm"]


def test_conv_bn_folds_and_changes_weights():
    model = make_model(f"""{HEAD}
        g (float[N,3,8,8] x) => (float[N,4,8,8] y) <float[4,3,3,3] w, float[4] b, {BN4}> {{
            c = Conv <pads=[1,1,1,1]> (x, w, b)
            y = BatchNormalization <epsilon=0.001> (c, g, be, mu, var)
        }}""")
    out, rep = _fold(model)
    assert op_types(out) == ["Conv"]
    assert rep == {"folded": 1, "decomposed": 0, "refused": []}
    conv = out.graph.node[0]
    assert conv.output[0] == "y"
    new_w = initializer(out, conv.input[1])
    assert conv.input[1] != "w" and not np.allclose(new_w, initializer(model, "w"))
    # the exact formula: W'_c = k_c W_c with k = gamma / sqrt(var + eps)
    k = initializer(model, "g") / np.sqrt(initializer(model, "var") + 1e-3)
    np.testing.assert_allclose(new_w, initializer(model, "w") * k[:, None, None, None], rtol=1e-6)
    _check_equivalent(model, out)


def test_conv_without_bias_gets_a_new_bias():
    model = make_model(f"""{HEAD}
        g (float[N,3,8,8] x) => (float[N,4,6,6] y) <float[4,3,3,3] w, {BN4}> {{
            c = Conv (x, w)
            y = BatchNormalization (c, g, be, mu, var)
        }}""", seed=3)
    out, rep = _fold(model)
    assert op_types(out) == ["Conv"] and rep["folded"] == 1
    assert len(out.graph.node[0].input) == 3
    assert initializer(out, out.graph.node[0].input[2]).shape == (4,)
    _check_equivalent(model, out)


def test_depthwise_conv():
    model = make_model(f"""{HEAD}
        g (float[N,4,8,8] x) => (float[N,4,8,8] y) <float[4,1,3,3] w, float[4] b, {BN4}> {{
            c = Conv <group=4, pads=[1,1,1,1]> (x, w, b)
            y = BatchNormalization (c, g, be, mu, var)
        }}""", seed=4)
    out, rep = _fold(model)
    assert op_types(out) == ["Conv"] and rep["folded"] == 1
    _check_equivalent(model, out)


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose(group):
    # W: (C_in, C_out/group, kh, kw) with C_in = 4, C_out = 6
    model = make_model(f"""{HEAD}
        g (float[N,4,5,5] x) => (float[N,6,10,10] y)
          <float[4,{6 // group},2,2] w, float[6] b, float[6] g, float[6] be, float[6] mu, float[6] var> {{
            c = ConvTranspose <group={group}, strides=[2,2]> (x, w, b)
            y = BatchNormalization (c, g, be, mu, var)
        }}""", seed=5 + group)
    out, rep = _fold(model)
    assert op_types(out) == ["ConvTranspose"] and rep["folded"] == 1
    _check_equivalent(model, out)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm(trans_b):
    bshape = "5,3" if trans_b else "3,5"
    model = make_model(f"""{HEAD}
        g (float[N,3] x) => (float[N,5] y)
          <float[{bshape}] w, float[5] c, float[5] g, float[5] be, float[5] mu, float[5] var> {{
            h = Gemm <transB={trans_b}, alpha=0.5, beta=2.0> (x, w, c)
            y = BatchNormalization (h, g, be, mu, var)
        }}""", seed=7)
    out, rep = _fold(model)
    assert op_types(out) == ["Gemm"] and rep["folded"] == 1
    _check_equivalent(model, out, batch=3)


def test_gemm_without_bias():
    model = make_model(f"""{HEAD}
        g (float[N,3] x) => (float[N,4] y) <float[3,4] w, {BN4}> {{
            h = Gemm (x, w)
            y = BatchNormalization (h, g, be, mu, var)
        }}""", seed=8)
    out, rep = _fold(model)
    assert op_types(out) == ["Gemm"] and rep["folded"] == 1
    _check_equivalent(model, out)


def test_shared_weight_is_refused_and_bn_kept():
    model = make_model(f"""{HEAD}
        g (float[N,3,8,8] x) => (float[N,4,8,8] y, float[N,4,8,8] z) <float[4,3,3,3] w, {BN4}> {{
            c = Conv <pads=[1,1,1,1]> (x, w)
            y = BatchNormalization (c, g, be, mu, var)
            z = Conv <pads=[1,1,1,1]> (x, w)
        }}""")
    out, rep = _fold(model)
    assert "BatchNormalization" in op_types(out)
    assert rep["folded"] == 0 and rep["decomposed"] == 0
    assert len(rep["refused"]) == 1 and "shared" in rep["refused"][0]["reason"]
    np.testing.assert_array_equal(initializer(out, "w"), initializer(model, "w"))
    _check_equivalent(model, out)


def test_producer_with_other_consumers_is_refused():
    model = make_model(f"""{HEAD}
        g (float[N,3,8,8] x) => (float[N,4,8,8] y, float[N,4,8,8] z) <float[4,3,3,3] w, {BN4}> {{
            c = Conv <pads=[1,1,1,1]> (x, w)
            y = BatchNormalization (c, g, be, mu, var)
            z = Relu (c)
        }}""")
    out, rep = _fold(model)
    assert "BatchNormalization" in op_types(out)
    assert "other consumers" in rep["refused"][0]["reason"]
    _check_equivalent(model, out)


def test_lone_bn_is_decomposed_into_mul_add():
    model = make_model(f"""{HEAD}
        g (float[N,4,5,5] x, float[N,4,5,5] x2) => (float[N,4,5,5] y) <{BN4}> {{
            a = Add (x, x2)
            y = BatchNormalization (a, g, be, mu, var)
        }}""", seed=9)
    out, rep = _fold(model)
    assert op_types(out) == ["Add", "Mul", "Add"]
    assert rep["decomposed"] == 1 and rep["folded"] == 0
    mul = out.graph.node[1]
    assert initializer(out, mul.input[1]).shape == (4, 1, 1)
    assert out.graph.output[0].name == "y" and out.graph.node[2].output[0] == "y"
    _check_equivalent(model, out)


def test_lone_bn_keep_option_and_bad_option():
    model = make_model(f"""{HEAD}
        g (float[N,4,5,5] x) => (float[N,4,5,5] y) <{BN4}> {{
            y = BatchNormalization (x, g, be, mu, var)
        }}""")
    out, rep = _fold(model, lone_bn="keep")
    assert op_types(out) == ["BatchNormalization"] and rep["decomposed"] == 0
    out, rep = _fold(model)
    assert op_types(out) == ["Mul", "Add"] and rep["decomposed"] == 1
    _check_equivalent(model, out)
    with pytest.raises(UserError):
        FoldBatchNormPass(lone_bn="remove")


def test_disabled_in_config_skips_everything():
    model = make_model(f"""{HEAD}
        g (float[N,3,8,8] x) => (float[N,4,6,6] y) <float[4,3,3,3] w, {BN4}> {{
            c = Conv (x, w)
            y = BatchNormalization (c, g, be, mu, var)
        }}""")
    out, ctx = run_pass(model, FoldBatchNormPass(), config=QuantConfig(fold_batchnorm=False))
    assert op_types(out) == ["Conv", "BatchNormalization"]
    assert ctx.report["fold_batchnorm"]["folded"] == 0 and ctx.report["fold_batchnorm"].get("skipped")


def test_training_outputs_used_is_refused():
    model = make_model(f"""{HEAD}
        g (float[N,3,8,8] x) => (float[N,4,6,6] y, float[4] rm, float[4] rv) <float[4,3,3,3] w, {BN4}> {{
            c = Conv (x, w)
            y, rm, rv = BatchNormalization <training_mode=1> (c, g, be, mu, var)
        }}""".replace("13]", "15]"))
    out, rep = _fold(model)
    assert "BatchNormalization" in op_types(out) and rep["folded"] == 0
    assert rep["refused"][0]["node"] == out.graph.node[1].name


def test_chain_and_new_initializers_have_fresh_names():
    # Conv -> BN -> BN folds twice; a tensor already named w_bnfold forces another fresh name.
    model = make_model(f"""{HEAD}
        g (float[N,3,8,8] x) => (float[N,4,6,6] y, float[4] w_bnfold)
          <float[4,3,3,3] w, {BN4}, float[4] g2, float[4] be2, float[4] mu2, float[4] var2> {{
            c = Conv (x, w)
            d = BatchNormalization (c, g, be, mu, var)
            y = BatchNormalization (d, g2, be2, mu2, var2)
            w_bnfold = Identity (g)
        }}""", seed=11)
    out, rep = _fold(model)
    assert op_types(out) == ["Conv", "Identity"] and rep["folded"] == 2
    names = [i.name for i in out.graph.initializer]
    assert len(names) == len(set(names)) and "w" not in names
    _check_equivalent(model, out)
