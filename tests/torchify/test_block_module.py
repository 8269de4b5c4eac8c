"""BlockModule on a small QDQ block against onnxruntime, quantizer substitution and gradients.

Block: x -> Q/DQ (uint8) -> Conv (int8 per-channel weight DQ, int32 bias DQ) -> Relu -> Q/DQ
-> depthwise Conv (int8 weight DQ, int32 bias DQ) -> Add(residual: dequantized x) -> y.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper
from torch import nn

from onnxq.core.spec import INT8_WEIGHT_PC, UINT8_ACT, QParams, dequantize, qparams_from_range, quantize
from onnxq.torchify import BlockModule, block_from_model, dequantize_linear, quantize_linear

C = 4
S_X = QParams(np.float32(0.03), np.int64(120), UINT8_ACT)
S_R = QParams(np.float32(0.02), np.int64(0), UINT8_ACT)


def _weight(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, QParams]:
    w = rng.standard_normal(shape).astype(np.float32) * 0.3
    amax = np.abs(w.reshape(shape[0], -1)).max(axis=1)
    return w, qparams_from_range(-amax, amax, INT8_WEIGHT_PC.with_axis(0))


def _qdq_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    inits, nodes = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def act_qdq(t: str, qp: QParams) -> str:
        s, z = const(f"{t}_scale", qp.scale), const(f"{t}_zero_point", qp.zero_point.astype(np.uint8))
        nodes.append(helper.make_node("QuantizeLinear", [t, s, z], [f"{t}_quantized"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{t}_quantized", s, z], [f"{t}_dequantized"]))
        return f"{t}_dequantized"

    def weight_dq(name: str, w: np.ndarray, qp: QParams) -> str:
        q = const(f"{name}_quantized", quantize(w, qp).astype(np.int8))
        nodes.append(helper.make_node("DequantizeLinear", [q, const(f"{name}_scale", qp.scale)],
                                      [f"{name}_dequantized"], axis=0))
        return f"{name}_dequantized"

    def bias_dq(name: str, b: np.ndarray, s_in: np.ndarray, w_qp: QParams) -> str:
        s_b = (w_qp.scale * s_in).astype(np.float32)
        q = const(f"{name}_quantized", np.rint(b / s_b).astype(np.int32))
        nodes.append(helper.make_node("DequantizeLinear", [q, const(f"{name}_scale", s_b)],
                                      [f"{name}_dequantized"], axis=0))
        return f"{name}_dequantized"

    w1, qp1 = _weight(rng, (C, C, 3, 3))
    w2, qp2 = _weight(rng, (C, 1, 3, 3))
    b1, b2 = rng.standard_normal(C).astype(np.float32) * 0.1, rng.standard_normal(C).astype(np.float32) * 0.1
    xd = act_qdq("x", S_X)
    nodes.append(helper.make_node("Conv", [xd, weight_dq("w1", w1, qp1), bias_dq("b1", b1, S_X.scale, qp1)],
                                  ["c1"], pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("Relu", ["c1"], ["r"]))
    rd = act_qdq("r", S_R)
    nodes.append(helper.make_node("Conv", [rd, weight_dq("w2", w2, qp2), bias_dq("b2", b2, S_R.scale, qp2)],
                                  ["c2"], pads=[1, 1, 1, 1], group=C))
    nodes.append(helper.make_node("Add", ["c2", xd], ["y"]))
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TP.FLOAT, [2, C, 6, 6])],
                              [helper.make_tensor_value_info("y", TP.FLOAT, [2, C, 6, 6])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, {"w1": (w1, qp1), "w2": (w2, qp2)}


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


class OffsetWeight(nn.Module):
    """Test weight quantizer: the dequantized weight plus a learnable scalar offset (0 at start)."""

    def __init__(self, weight: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("weight", torch.from_numpy(weight))
        self.offset = nn.Parameter(torch.zeros(()))

    def forward(self) -> torch.Tensor:
        return self.weight + self.offset


class LearnedScaleFQ(nn.Module):
    """Test activation quantizer: ONNX fake quantization with a learnable scale."""

    def __init__(self, qp: QParams) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(qp.scale)))
        self.register_buffer("zp", torch.tensor(float(qp.zero_point)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dequantize_linear(quantize_linear(x, self.scale, self.zp, 0, 255), self.scale, self.zp)


@pytest.fixture(scope="module")
def case() -> tuple[onnx.ModelProto, dict, np.ndarray, np.ndarray]:
    model, weights = _qdq_model()
    x = np.random.default_rng(3).standard_normal((2, C, 6, 6)).astype(np.float32)
    return model, weights, x, _ort(model, x)


def test_block_without_quantizers_matches_onnxruntime(case) -> None:
    model, _, x, want = case
    block = block_from_model(model, ["x"], ["y"])
    assert len(list(block.parameters())) == 0 and len(list(block.buffers())) > 0
    (got,) = block(torch.from_numpy(x))
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-5, atol=1e-5)
    assert np.abs(want).max() > 0.5  # a real signal went through


def test_substituted_quantizers_match_and_get_gradients(case) -> None:
    model, weights, x, want = case
    wq = {f"{k}_dequantized": OffsetWeight(dequantize(quantize(w, qp), qp)) for k, (w, qp) in weights.items()}
    aq = {"x": LearnedScaleFQ(S_X), "r": LearnedScaleFQ(S_R)}
    block = block_from_model(model, ["x"], ["y"], weight_quantizers=wq, act_quantizers=aq)
    kinds = [kind for kind, _, _ in block.plan]
    assert kinds.count("weight") == 2 and kinds.count("act") == 2
    qdq = ("QuantizeLinear", "DequantizeLinear")
    generic_qdq = [op for kind, _, op in block.plan if kind == "op" and op in qdq]
    assert generic_qdq == ["DequantizeLinear"] * 2  # only the two int32 bias DQs run the generic op
    params = dict(block.named_parameters())
    assert len(params) == 4, sorted(params)
    (got,) = block(torch.from_numpy(x))
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-5, atol=1e-5)

    got.square().sum().backward()
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert float(p.grad.abs()) > 0, name
    # The offset really feeds the conv: moving it changes the output.
    with torch.no_grad():
        wq["w1_dequantized"].offset.fill_(0.05)
    (moved,) = block(torch.from_numpy(x))
    assert float((moved - got).detach().abs().max()) > 1e-3


def test_generic_qdq_passes_straight_through_gradient(case) -> None:
    model, _, x, _ = case
    block = block_from_model(model, ["x"], ["y"])
    xt = torch.from_numpy(x).requires_grad_(True)
    block(xt)[0].sum().backward()
    assert xt.grad is not None and float(xt.grad.abs().sum()) > 0


def test_bad_quantizer_keys_and_ops_raise(case) -> None:
    model, _, _, _ = case
    with pytest.raises(ValueError, match="no DequantizeLinear"):
        block_from_model(model, ["x"], ["y"],
                         weight_quantizers={"nope_dequantized": OffsetWeight(np.zeros(1, np.float32))})
    with pytest.raises(ValueError, match="QuantizeLinear"):
        block_from_model(model, ["x"], ["y"], act_quantizers={"c1": LearnedScaleFQ(S_R)})
    with pytest.raises(ValueError, match="neither a block input"):
        block_from_model(model, ["r"], ["y"]).forward  # "x" (residual) is missing
    import onnx_graphsurgeon as gs
    odd = gs.Node("NonMaxSuppression", name="nms", inputs=[gs.Variable("a")], outputs=[gs.Variable("b")])
    with pytest.raises(ValueError, match="'nms'"):
        BlockModule([odd], ["a"], ["b"])


def test_qcdq_pattern_runs_generic_and_is_replaced_whole() -> None:
    """4-bit activation in a uint8 container: x -> Q -> Clip(0, 15) -> DQ -> Relu."""
    qp = QParams(np.float32(0.1), np.int64(8), UINT8_ACT)
    u8 = np.uint8
    consts = {"s": qp.scale, "z": np.array(8, u8), "lo": np.array(0, u8), "hi": np.array(15, u8)}
    inits = [onnx.numpy_helper.from_array(v, n) for n, v in consts.items()]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("Clip", ["xq", "lo", "hi"], ["xc"]),
             helper.make_node("DequantizeLinear", ["xc", "s", "z"], ["xd"]),
             helper.make_node("Relu", ["xd"], ["y"])]
    graph = helper.make_graph(nodes, "qcdq", [helper.make_tensor_value_info("x", TP.FLOAT, [2, C, 6, 6])],
                              [helper.make_tensor_value_info("y", TP.FLOAT, [2, C, 6, 6])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x = np.random.default_rng(5).standard_normal((2, C, 6, 6)).astype(np.float32)
    want = _ort(model, x)
    assert len(np.unique(want)) == 8  # the clip really bites: codes 8..15 survive the Relu
    (plain,) = block_from_model(model, ["x"], ["y"])(torch.from_numpy(x))
    np.testing.assert_array_equal(plain.numpy(), want)

    class Grid4(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            s, z = torch.tensor(0.1), torch.tensor(8.0)
            return dequantize_linear(quantize_linear(t, s, z, 0, 15), s, z)

    block = block_from_model(model, ["x"], ["y"], act_quantizers={"x": Grid4()})
    assert [(kind, op) for kind, _, op in block.plan] == [("act", "QuantizeLinear"), ("op", "Relu")]
    (got,) = block(torch.from_numpy(x))
    np.testing.assert_array_equal(got.numpy(), want)


def _relu6_model(extra_reader: bool) -> onnx.ModelProto:
    """x -> Conv -> Clip(0, 6) -> r -> Q -> DQ -> y (and, with ``extra_reader``, r -> Neg -> z)."""
    rng = np.random.default_rng(11)
    consts = {"w": (rng.standard_normal((C, C, 3, 3)) * 0.8).astype(np.float32), "lo": np.array(0.0, np.float32),
              "hi": np.array(6.0, np.float32), "s": np.array(0.05, np.float32), "z": np.array(0, np.uint8)}
    inits = [onnx.numpy_helper.from_array(v, n) for n, v in consts.items()]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c", "lo", "hi"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "s", "z"], ["rq"]),
             helper.make_node("DequantizeLinear", ["rq", "s", "z"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TP.FLOAT, [2, C, 6, 6])]
    if extra_reader:
        nodes.append(helper.make_node("Neg", ["r"], ["z_out"]))
        outputs.append(helper.make_tensor_value_info("z_out", TP.FLOAT, [2, C, 6, 6]))
    graph = helper.make_graph(nodes, "relu6", [helper.make_tensor_value_info("x", TP.FLOAT, [2, C, 6, 6])],
                              outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


class _Unfused(nn.Module):
    """The same FakeQuant without ``fuses_clip`` or ``fuses_pad``: the Clip and the pad run as their own ops."""

    def __init__(self, fq: nn.Module) -> None:
        super().__init__()
        self.fq = fq

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.fq(t)


def _fused_and_unfused(model: onnx.ModelProto, x: np.ndarray, name: str, fq_args: tuple, drop: float,
                       fused_away) -> None:
    """The block with a FakeQuant on ``name`` and with the same FakeQuant behind a wrapper that fuses
    nothing: ``fused_away(block, wrapped)`` checks the plans; outputs (onnxruntime's without drop), input
    and scale gradients are equal."""
    from onnxq.recon import FakeQuant

    out_name = model.graph.output[0].name
    want = _ort(model, x)
    results = []
    for wrap in (False, True):
        fq = FakeQuant(*fq_args, learn_scale=True)
        fq.drop_prob, fq.generator = drop, torch.Generator().manual_seed(4)
        block = block_from_model(model, ["x"], [out_name], act_quantizers={name: _Unfused(fq) if wrap else fq})
        fused_away(block, wrap)
        if drop == 0.0:
            (got,) = block(torch.from_numpy(x))
            np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-5, atol=1e-5)
        block.train()
        xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        (out,) = block(xt)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out.detach(), xt.grad, fq.scale.grad))
    (o1, gx1, gs1), (o2, gx2, gs2) = results
    assert torch.equal(o1, o2) and torch.equal(gx1, gx2) and torch.equal(gs1, gs2)
    assert float(gx1.abs().sum()) > 0 and float(gs1.abs()) > 0


@pytest.mark.parametrize("drop", [0.0, 0.5])
def test_relu6_before_a_fake_quant_is_fused_with_the_same_numbers(drop: float) -> None:
    def clip_runs_only_unfused(block: BlockModule, wrapped: bool) -> None:
        assert ("Clip" in [op for _, _, op in block.plan]) == wrapped

    x = np.random.default_rng(2).standard_normal((2, C, 6, 6)).astype(np.float32) * 2
    _fused_and_unfused(_relu6_model(extra_reader=False), x, "r", (0.05, 0, 0, 255), drop, clip_runs_only_unfused)


def test_relu6_is_not_fused_where_its_output_is_read_elsewhere() -> None:
    from onnxq.recon import FakeQuant

    model = _relu6_model(extra_reader=True)
    block = block_from_model(model, ["x"], ["y", "z_out"], act_quantizers={"r": FakeQuant(0.05, 0, 0, 255)})
    assert "Clip" in [op for _, _, op in block.plan]
    block = block_from_model(model, ["x"], ["y", "r"], act_quantizers={"r": FakeQuant(0.05, 0, 0, 255)})
    assert "Clip" in [op for _, _, op in block.plan]  # a block output keeps its own value


def _strided_conv_model() -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv(3x3, stride 2, pads [0, 0, 1, 1]: TensorFlow's "same") -> y."""
    rng = np.random.default_rng(12)
    consts = {"w": (rng.standard_normal((C, 1, 3, 3)) * 0.8).astype(np.float32),
              "s": np.array(0.05, np.float32), "z": np.array(128, np.uint8)}
    inits = [onnx.numpy_helper.from_array(v, n) for n, v in consts.items()]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("Conv", ["xd", "w"], ["y"], pads=[0, 0, 1, 1], strides=[2, 2], group=C)]
    graph = helper.make_graph(nodes, "same", [helper.make_tensor_value_info("x", TP.FLOAT, [2, C, 8, 8])],
                              [helper.make_tensor_value_info("y", TP.FLOAT, [2, C, 4, 4])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("drop", [0.0, 0.5])
def test_a_convs_asymmetric_padding_goes_to_the_quantizer_with_the_same_numbers(drop: float) -> None:
    def conv_pads_only_unfused(block: BlockModule, wrapped: bool) -> None:
        conv = next(s for s in block._steps if s.op == "Conv")
        assert list(conv.attrs["pads"]) == ([0, 0, 1, 1] if wrapped else [0, 0, 0, 0])

    x = np.random.default_rng(4).standard_normal((2, C, 8, 8)).astype(np.float32)
    _fused_and_unfused(_strided_conv_model(), x, "x", (0.05, 128, 0, 255), drop, conv_pads_only_unfused)
