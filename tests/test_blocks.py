"""blocks.partition: BRECQ blocks on QDQ graphs emitted by onnxq.quantize (tiny inline models)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import onnxq
from onnxq.blocks.chain_split import even_split, narrowest_split
from onnxq.blocks.partition import Block, describe_blocks, partition
from onnxq.errors import UserError
from tests.helpers import make_model, prepare_float, random_feeds

CLIP = {"lo": np.float32(0.0), "hi": np.float32(6.0)}

# stem conv, inverted residual with skip, inverted residual with stride 2 (no skip), classifier.
MBV2 = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,3,16,16] x) => (float[N,10] y)
  <float[8,3,3,3] ws, float[8] bs, float lo, float hi,
   float[16,8,1,1] we1, float[16] be1, float[16,1,3,3] wd1, float[16] bd1, float[8,16,1,1] wp1, float[8] bp1,
   float[16,8,1,1] we2, float[16] be2, float[16,1,3,3] wd2, float[16] bd2,
   float[12,16,1,1] wp2, float[12] bp2,
   float[10,12] wf, float[10] bf> {
    s = Conv <pads=[1,1,1,1], strides=[2,2]> (x, ws, bs)
    s6 = Clip (s, lo, hi)
    e1 = Conv (s6, we1, be1)
    e16 = Clip (e1, lo, hi)
    d1 = Conv <group=16, pads=[1,1,1,1]> (e16, wd1, bd1)
    d16 = Clip (d1, lo, hi)
    p1 = Conv (d16, wp1, bp1)
    a1 = Add (p1, s6)
    e2 = Conv (a1, we2, be2)
    e26 = Clip (e2, lo, hi)
    d2 = Conv <group=16, pads=[1,1,1,1], strides=[2,2]> (e26, wd2, bd2)
    d26 = Clip (d2, lo, hi)
    p2 = Conv (d26, wp2, bp2)
    gp = GlobalAveragePool (p2)
    fl = Flatten (gp)
    y = Gemm <transB=1> (fl, wf, bf)
}"""

# stem, ResNet basic block with BN and a stride-2 downsample conv on the shortcut, classifier.
RESNET = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,3,16,16] x) => (float[N,10] y)
  <float[8,3,3,3] ws, float[16,8,3,3] w1, float[16] g1, float[16] b1, float[16] m1, float[16] var1,
   float[16,16,3,3] w2, float[16] g2, float[16] b2, float[16] m2, float[16] var2,
   float[16,8,1,1] wd, float[16] gd, float[16] bd, float[16] md, float[16] vard, float[16,10] wf> {
    s = Conv <pads=[1,1,1,1]> (x, ws)
    sr = Relu (s)
    c1 = Conv <pads=[1,1,1,1], strides=[2,2]> (sr, w1)
    n1 = BatchNormalization (c1, g1, b1, m1, var1)
    r1 = Relu (n1)
    c2 = Conv <pads=[1,1,1,1]> (r1, w2)
    n2 = BatchNormalization (c2, g2, b2, m2, var2)
    cd = Conv <strides=[2,2]> (sr, wd)
    nd = BatchNormalization (cd, gd, bd, md, vard)
    a = Add (n2, nd)
    r = Relu (a)
    gp = GlobalAveragePool (r)
    fl = Flatten (gp)
    y = MatMul (fl, wf)
}"""


def _chain_text(n: int, between: dict[int, str] | None = None) -> str:
    """x -> n x (Conv 3x3 + Relu) -> y; ``between[i]`` is an extra op line after conv i (on t{i})."""
    decls = ", ".join(f"float[4,4,3,3] w{i}" for i in range(n))
    lines, prev = [], "x"
    for i in range(n):
        lines.append(f"c{i} = Conv <pads=[1,1,1,1]> ({prev}, w{i})")
        lines.append(f"{'y' if i == n - 1 and not (between and i in between) else f't{i}'} = Relu (c{i})")
        prev = f"t{i}"
        if between and i in between:
            out = "y" if i == n - 1 else f"u{i}"
            lines.append(f"{out} = {between[i]} (t{i})")
            prev = out
    body = "\n    ".join(lines)
    return f"""
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,4,6,6] x) => (float[N,4,6,6] y) <{decls}> {{
    {body}
}}"""


def _qdq(model: onnx.ModelProto, **config) -> gs.Graph:
    feeds = [random_feeds(model, seed=i, batch=2) for i in range(4)]
    result = onnxq.quantize(model, feeds, onnxq.QuantConfig(validate=False, **config))
    return gs.import_onnx(result.model)


def _float_names(model: onnx.ModelProto) -> set[str]:
    return {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output}


def _by_op(graph: gs.Graph, op: str) -> list[str]:
    return [n.name for n in graph.nodes if n.op == op]


def _check_invariants(graph: gs.Graph, blocks: list[Block], float_model: onnx.ModelProto) -> None:
    names = _float_names(float_model)
    node_names = {n.name for n in graph.nodes}
    weighted = [w for b in blocks for w in b.weighted_ops]
    assert len(weighted) == len(set(weighted)), "a weighted op is in two blocks"
    for k, b in enumerate(blocks):
        assert b.index == k and b.name.startswith(f"block{k:02d}:{b.kind}(")
        assert set(b.nodes) <= node_names and len(set(b.nodes)) == len(b.nodes)
        assert set(b.inputs) <= names and set(b.outputs) <= names, (b.inputs, b.outputs)
        assert all(w.endswith("_dequantized") for w in b.weights)
        assert len(b.weights) == len(b.weighted_ops)
    order = {n.name: i for i, n in enumerate(graph.nodes)}  # onnxq emits sorted graphs
    flat = [order[n] for b in blocks for n in b.nodes if n in b.weighted_ops]
    assert flat == sorted(flat), "blocks are not in topological order"


@pytest.fixture(scope="module")
def mbv2() -> tuple[onnx.ModelProto, gs.Graph]:
    model = make_model(MBV2, **CLIP)
    return model, _qdq(model)


def test_mobilenetv2_like_blocks(mbv2):
    model, graph = mbv2
    blocks = partition(graph)
    _check_invariants(graph, blocks, model)
    assert [b.kind for b in blocks] == ["layer", "residual", "chain", "layer"]
    convs = _by_op(graph, "Conv")
    assert [len(b.weighted_ops) for b in blocks] == [1, 3, 3, 1]
    assert blocks[0].weighted_ops == (convs[0],)
    assert blocks[3].weighted_ops == tuple(_by_op(graph, "Gemm"))
    # The residual unit closes at its Add; the stride-2 unit (no skip) is a chain taking the pooling along.
    assert blocks[1].inputs == ("s6",) and blocks[1].outputs == ("a1",)
    assert _by_op(graph, "Add")[0] in blocks[1].nodes
    assert blocks[2].inputs == ("a1",) and blocks[2].outputs == ("fl",)
    assert blocks[0].inputs == ("x",) and blocks[3].outputs == ("y",)
    # Every node of this fully supported graph is in exactly one block (no weight is shared).
    everything = [n for b in blocks for n in b.nodes]
    assert sorted(everything) == sorted(n.name for n in graph.nodes)


def test_quantizers_belong_to_the_consuming_block(mbv2):
    _, graph = mbv2
    blocks = partition(graph)
    q_of = {n.inputs[0].name: n.name for n in graph.nodes if n.op == "QuantizeLinear"}
    dq_of = {n.outputs[0].name.removesuffix("_dequantized"): n.name for n in graph.nodes
             if n.op == "DequantizeLinear" and n.inputs[0].name.endswith("_quantized")
             and not isinstance(n.inputs[0], gs.Constant)}
    assert "x" in q_of and "a1" in q_of
    for b in blocks:
        for t in b.inputs:
            assert q_of[t] in b.nodes and dq_of[t] in b.nodes, (b.name, t)
        for t in b.outputs:
            if t in q_of:
                assert q_of[t] not in b.nodes and dq_of[t] not in b.nodes
    for b, nxt in zip(blocks, blocks[1:]):
        assert b.outputs == nxt.inputs
        assert q_of[b.outputs[0]] in nxt.nodes
    # weight and bias DQs sit with their conv
    assert "ws_DequantizeLinear" in blocks[0].nodes and "bs_DequantizeLinear" in blocks[0].nodes
    assert blocks[0].weights == ("ws_dequantized",)


def test_qcdq_quantizers_are_contracted_too(mbv2):
    model, graph8 = mbv2
    graph = _qdq(model, activation_bits=4)  # sub-8-bit activations: Q -> Clip -> DQ
    qcdq = [n.name for n in graph.nodes if n.op == "Clip" and n.inputs[0].name.endswith("_quantized")]
    assert qcdq, "expected QCDQ quantizers"
    blocks = partition(graph)
    _check_invariants(graph, blocks, model)
    ref = partition(graph8)
    # the same cut; a block may start at a ReLU6's input instead of its output, where the ReLU6 became a
    # Clip on the 4-bit codes (onnxq.passes.export.clip_on_codes)
    assert [(b.kind, b.weights, len(b.inputs), len(b.outputs)) for b in blocks] == \
        [(b.kind, b.weights, len(b.inputs), len(b.outputs)) for b in ref]
    for b in blocks:
        for t in b.inputs:
            if f"{t}_Clip" in qcdq:
                assert f"{t}_Clip" in b.nodes
    assert sorted(n for b in blocks for n in b.nodes) == sorted(n.name for n in graph.nodes)


def test_resnet_basic_block_with_downsample_is_one_residual_block():
    model = make_model(RESNET)
    graph = _qdq(model)
    blocks = partition(graph)
    reference, _ = prepare_float(model, onnxq.QuantConfig())
    _check_invariants(graph, blocks, model)
    _check_invariants(graph, blocks, reference)
    assert [b.kind for b in blocks] == ["layer", "residual", "layer"]
    res = blocks[1]
    assert len(res.weighted_ops) == 3  # both convs of the main path and the downsample conv
    assert res.inputs == ("sr",) and res.outputs == ("fl",)  # Add, Relu, pooling and flatten ride along
    ops = {n.name: n.op for n in graph.nodes}
    compute = sorted(ops[n] for n in res.nodes if ops[n] not in ("QuantizeLinear", "DequantizeLinear"))
    assert compute[:6] == ["Add", "Conv", "Conv", "Conv", "Flatten", "GlobalAveragePool"], compute
    assert blocks[2].kind == "layer" and ops[blocks[2].weighted_ops[0]] == "MatMul"


@pytest.fixture(scope="module")
def chain7() -> tuple[onnx.ModelProto, gs.Graph]:
    model = make_model(_chain_text(7))
    return model, _qdq(model)


def test_plain_chain_is_split_into_chains_of_at_most_max_chain(chain7):
    model, graph = chain7
    blocks = partition(graph, max_chain=3)
    _check_invariants(graph, blocks, model)
    assert [(b.kind, len(b.weighted_ops)) for b in blocks] == [
        ("layer", 1), ("chain", 3), ("chain", 2), ("layer", 1)]
    assert blocks[0].outputs == ("t0",) and blocks[1].inputs == ("t0",) and blocks[1].outputs == ("t3",)
    split = partition(graph, max_chain=3, separate_first_last=False)
    assert [len(b.weighted_ops) for b in split] == [3, 2, 2]  # even split, not 3 + 3 + 1
    assert [b.kind for b in partition(graph, max_chain=1)] == ["layer"] * 7
    assert [len(b.weighted_ops) for b in partition(graph, max_chain=5, separate_first_last=False)] == [4, 3]
    with pytest.raises(UserError, match="max_chain"):
        partition(graph, max_chain=0)


def _widths_text(widths: list[int], spatial: str = "6,6") -> str:
    """x (4 channels) -> Conv 1x1 + Relu to each width in turn -> y: an inverted-residual-like run."""
    decls, lines, prev, cin = [], [], "x", 4
    for i, cout in enumerate(widths):
        decls.append(f"float[{cout},{cin},1,1] w{i}")
        lines.append(f"c{i} = Conv ({prev}, w{i})")
        prev = "y" if i == len(widths) - 1 else f"t{i}"
        lines.append(f"{prev} = Relu (c{i})")
        cin = cout
    body = "\n    ".join(lines)
    return f"""
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,4,{spatial}] x) => (float[N,{widths[-1]},{spatial}] y) <{", ".join(decls)}> {{
    {body}
}}"""


def test_chain_is_cut_at_its_narrowest_tensors():
    # widths 16, 4, 16, 4, 4: two chains of <= 3; the even split (3 + 2) would end the first at a
    # 16-channel expansion, the narrowest (2 + 3) ends it at the 4-channel projection.
    model = make_model(_widths_text([16, 4, 16, 4, 4]))
    graph = _qdq(model)
    blocks = partition(graph, max_chain=3, separate_first_last=False)
    _check_invariants(graph, blocks, model)
    assert [len(b.weighted_ops) for b in blocks] == [2, 3] and blocks[0].outputs == ("t1",)
    # the same run without known spatial sizes: no sizes to compare, the even split
    model = make_model(_widths_text([16, 4, 16, 4, 4], spatial="H,W"))
    graph = _qdq(model)
    blocks = partition(graph, max_chain=3, separate_first_last=False)
    _check_invariants(graph, blocks, model)
    assert [len(b.weighted_ops) for b in blocks] == [3, 2] and blocks[0].outputs == ("t2",)


def test_narrowest_split_ties_and_limits():
    # equal cut sizes: the most even split, larger groups first (what the even split gives)
    assert narrowest_split([1] * 7, [5] * 6, 3) == [3, 2, 2]
    assert narrowest_split([1] * 5, [5] * 4, 3) == [3, 2]
    assert narrowest_split([1] * 4, [5] * 3, 3) == [2, 2]
    assert narrowest_split([1] * 3, [5] * 2, 3) == [3]
    # the narrow tensors win over evenness, within max_chain
    assert narrowest_split([1] * 5, [9, 1, 9, 9], 3) == [2, 3]
    assert narrowest_split([1] * 7, [9, 9, 1, 9, 1, 9], 3) == [3, 2, 2]
    assert narrowest_split([1] * 7, [1, 9, 9, 1, 9, 9], 3) == [1, 3, 3]
    # a unit heavier than max_chain: no split (the caller falls back to the even one)
    assert narrowest_split([1, 4, 1], [1, 1], 3) is None
    assert even_split([1] * 7, 3) == [3, 2, 2] and even_split([1] * 5, 3) == [3, 2]
    assert even_split([1] * 4, 3) == [2, 2] and even_split([1, 4, 1], 3) == [1, 1, 1]


def test_unsupported_op_breaks_a_chain():
    model = make_model(_chain_text(7, between={1: "Softplus"}))
    graph = _qdq(model)
    everything = partition(graph)
    assert [len(b.weighted_ops) for b in everything] == [1, 3, 2, 1]
    blocks = partition(graph, is_supported=lambda n: n.op != "Softplus")
    _check_invariants(graph, blocks, model)
    assert [(b.kind, len(b.weighted_ops)) for b in blocks] == [
        ("layer", 1), ("layer", 1), ("chain", 2), ("chain", 2), ("layer", 1)]
    softplus = _by_op(graph, "Softplus")[0]
    assert all(softplus not in b.nodes for b in blocks)
    assert blocks[1].outputs == ("t1",) and blocks[2].inputs == ("u1",)


def test_unsupported_weighted_op_is_left_out(chain7):
    _, graph = chain7
    convs = _by_op(graph, "Conv")
    blocks = partition(graph, is_supported=lambda n: n.name != convs[3])
    assert [len(b.weighted_ops) for b in blocks] == [1, 2, 2, 1]
    assert all(convs[3] not in b.nodes for b in blocks)


def test_partition_is_deterministic_and_independent_of_node_order():
    model = make_model(RESNET)
    graph = _qdq(model)

    def key(blocks: list[Block]) -> list[tuple]:
        return [(b.kind, frozenset(b.nodes), b.inputs, b.outputs, frozenset(b.weights)) for b in blocks]

    first = partition(graph)
    assert partition(graph) == first
    shuffled = graph.copy()
    random.Random(0).shuffle(shuffled.nodes)
    assert key(partition(shuffled)) == key(first)
    assert len(graph.nodes) == len(shuffled.nodes)  # the input graph is not modified


def test_two_graph_inputs_side_branch_does_not_crash():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N,4,6,6] x, float[N,2,6,6] z) => (float[N,4,6,6] y)
      <float[4,4,3,3] w0, float[4,4,3,3] w1, float[4,2,1,1] wz, float[4,4,3,3] w2, float[4,4,3,3] w3> {
        c0 = Conv <pads=[1,1,1,1]> (x, w0)
        r0 = Relu (c0)
        c1 = Conv <pads=[1,1,1,1]> (r0, w1)
        cz = Conv (z, wz)
        a = Add (c1, cz)
        c2 = Conv <pads=[1,1,1,1]> (a, w2)
        r2 = Relu (c2)
        y = Conv <pads=[1,1,1,1]> (r2, w3)
    }"""
    model = make_model(text)
    graph = _qdq(model)
    blocks = partition(graph)
    _check_invariants(graph, blocks, model)
    side = next(b for b in blocks if "z" in b.inputs)
    assert _by_op(graph, "Add")[0] in side.nodes and len(side.weighted_ops) >= 2
    assert sum(len(b.weighted_ops) for b in blocks) == 5


def test_shape_logic_does_not_hide_cuts():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) <float[4,4,3,3] w0, float[4,4,3,3] w1, float[4,4,3,3] w2,
                                                float[4,4,3,3] w3> {
        c0 = Conv <pads=[1,1,1,1]> (x, w0)
        t0 = Relu (c0)
        sh = Shape (t0)
        c1 = Conv <pads=[1,1,1,1]> (t0, w1)
        t1 = Relu (c1)
        c2 = Conv <pads=[1,1,1,1]> (t1, w2)
        t2 = Relu (c2)
        f = Flatten (t2)
        rs = Reshape (f, sh)
        y = Conv <pads=[1,1,1,1]> (rs, w3)
    }"""
    model = make_model(text)
    graph = _qdq(model)
    blocks = partition(graph, max_chain=1)
    _check_invariants(graph, blocks, model)
    assert [len(b.weighted_ops) for b in blocks] == [1, 1, 1, 1]
    shape_block = next(b for b in blocks if _by_op(graph, "Shape")[0] in b.nodes)
    assert _by_op(graph, "Reshape")[0] in shape_block.nodes and "t0" in shape_block.inputs


def test_no_cut_no_weights_and_multi_output_graphs_do_not_crash():
    heads = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N,4,6,6] x) => (float[N,4,6,6] y1, float[N,4,6,6] y2)
      <float[4,4,3,3] w0, float[4,4,3,3] w1, float[4,4,3,3] w2> {
        c0 = Conv <pads=[1,1,1,1]> (x, w0)
        y1 = Conv <pads=[1,1,1,1]> (c0, w1)
        y2 = Conv <pads=[1,1,1,1]> (c0, w2)
    }"""
    model = make_model(heads)
    graph = _qdq(model)
    blocks = partition(graph)
    _check_invariants(graph, blocks, model)
    assert blocks[-1].outputs == ("y1", "y2") and sum(len(b.weighted_ops) for b in blocks) == 3
    plain = make_model("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N,4] x) => (float[N,4] y) {
        r = Relu (x)
        y = Sigmoid (r)
    }""")
    assert partition(_qdq(plain)) == []  # no weighted op: no block
    assert partition(gs.Graph()) == []
    with pytest.raises(UserError, match="unique node names"):
        partition(gs.import_onnx(plain))  # nodes without names cannot be listed in a Block


def test_describe_blocks(mbv2):
    _, graph = mbv2
    lines = describe_blocks(partition(graph))
    assert len(lines) == 4 and lines[1].startswith("block01:residual(")
    assert "3 weighted op(s)" in lines[1] and "s6 -> a1" in lines[1]


EFFNET = Path(__file__).resolve().parents[1] / "build" / "models" / "efficientnet_lite0.onnx"


@pytest.mark.slow
@pytest.mark.skipif(not EFFNET.exists(), reason=f"{EFFNET} is absent: run scripts/export_efficientnet.py")
def test_efficientnet_lite0_blocks():
    model = onnx.load(str(EFFNET))
    rng = np.random.default_rng(0)
    name = model.graph.input[0].name
    feeds = [{name: rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(3)]
    graph = gs.import_onnx(onnxq.quantize(model, feeds, onnxq.QuantConfig(validate=False)).model)
    blocks = partition(graph)
    _check_invariants(graph, blocks, model)
    kinds = [b.kind for b in blocks]
    # stem, 9 MBConv units with a skip, the 7 without one chained (<= 3 convs) and cut at their
    # projections, head conv + pool, classifier
    assert kinds[0] == kinds[-2] == kinds[-1] == "layer" and kinds.count("residual") == 9
    assert kinds.count("chain") == 7 and len(blocks) == 19
    assert blocks[1].outputs == ("/_blocks.0/_project_conv/Conv_output_0",)
    assert blocks[16].outputs == ("/_blocks.15/_project_conv/Conv_output_0",)
    assert sum(len(b.weighted_ops) for b in blocks) == 50  # 49 convs + the Gemm, each once
    assert all(len(b.weighted_ops) <= 3 for b in blocks)
    for b, nxt in zip(blocks, blocks[1:]):
        assert b.outputs == nxt.inputs and len(b.inputs) == 1
