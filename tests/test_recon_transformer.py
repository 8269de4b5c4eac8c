"""Reconstruction on a transformer: token-id inputs, an additive attention mask and Reshape targets
computed from ``Shape`` (what torch's exporters write for BERT-style attention).

The model: embedding Gather over a 3000-token table (ids above float16's exact 2048), a mask bias
``(1 - mask) * -3.4e38`` (past float16's range), and two attention layers whose head split reads
``Concat(Shape(mask)[0], Shape(mask)[1], 2, 8)``. Calibration batches of 4 and reconstruction
mini-batches of 3 make any shape captured from a calibration batch wrong inside the torch block.
"""

from __future__ import annotations

import numpy as np
import pytest

import onnxq
from onnxq.blocks.cache import TensorStore, collect
from onnxq.blocks.partition import partition
from onnxq.core import graph as g
from onnxq.errors import UserError
from tests.helpers import make_model, without_floors

VOCAB, D, HEADS = 3000, 16, 2

_LAYER = """
    h{i} = LayerNormalization <axis = -1> (x{i}, ln_s, ln_b)
    q{i} = MatMul (h{i}, wq{i})
    k{i} = MatMul (h{i}, wk{i})
    v{i} = MatMul (h{i}, wv{i})
    shp{i} = Concat <axis = 0> (n, s, heads, hd)
    qr{i} = Reshape (q{i}, shp{i})
    kr{i} = Reshape (k{i}, shp{i})
    vr{i} = Reshape (v{i}, shp{i})
    qt{i} = Transpose <perm = [0, 2, 1, 3]> (qr{i})
    kt{i} = Transpose <perm = [0, 2, 3, 1]> (kr{i})
    vt{i} = Transpose <perm = [0, 2, 1, 3]> (vr{i})
    sc{i} = MatMul (qt{i}, kt{i})
    sm{i} = Add (sc{i}, bias4)
    p{i} = Softmax <axis = -1> (sm{i})
    ctx{i} = MatMul (p{i}, vt{i})
    ct{i} = Transpose <perm = [0, 2, 1, 3]> (ctx{i})
    back{i} = Concat <axis = 0> (n, s, dim)
    cr{i} = Reshape (ct{i}, back{i})
    o{i} = MatMul (cr{i}, wo{i})
    x{j} = Add (o{i}, x{i})
"""


def _model():
    body = "".join(_LAYER.format(i=i, j=i + 1) for i in range(2))
    weights = ", ".join(f"float[{D},{D}] w{k}{i}" for i in range(2) for k in "qkvo")
    text = f"""
        <ir_version: 8, opset_import: ["" : 18]>
        g (int64[N,S] ids, int64[N,S] mask) => (float[N,S,4] y)
          <float[{VOCAB},{D}] emb, float[{D}] ln_s, float[{D}] ln_b, {weights}, float[{D},4] wy,
           int64[1] heads, int64[1] hd, int64[1] dim, float one, float low, int64[2] ax> {{
            x0 = Gather (emb, ids)
            mf = Cast <to = 1> (mask)
            inv = Sub (one, mf)
            bias = Mul (inv, low)
            bias4 = Unsqueeze (bias, ax)
            n = Shape <start = 0, end = 1> (mask)
            s = Shape <start = 1, end = 2> (mask)
            {body}
            hy = LayerNormalization <axis = -1> (x2, ln_s, ln_b)
            y = MatMul (hy, wy)
        }}"""
    rng = np.random.default_rng(0)
    return make_model(text, heads=np.array([HEADS]), hd=np.array([D // HEADS]), dim=np.array([D]),
                      one=np.array(1.0, np.float32), low=np.array(np.finfo(np.float32).min, np.float32),
                      ax=np.array([1, 2]), ln_s=np.ones(D, np.float32), ln_b=np.zeros(D, np.float32),
                      emb=rng.standard_normal((VOCAB, D)).astype(np.float32) * 0.5)


def _feeds(batches: int = 6, batch: int = 4, seq: int = 5, ragged: bool = False
           ) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    out = []
    for b in range(batches):
        s = seq + (b % 2 if ragged else 0)
        mask = np.ones((batch, s), np.int64)
        mask[:, s - 1 - b % 2:] = 0  # padded tail
        out.append({"ids": rng.integers(2049, VOCAB, size=(batch, s)).astype(np.int64), "mask": mask})
    return out


def test_blocks_recompute_shapes_instead_of_reading_them():
    """Each attention block holds its own ``Shape`` nodes and reads the mask, not a captured shape."""
    graph = g.to_graph(_model())
    for k, node in enumerate(graph.nodes):
        node.name = f"{node.op}_{k}"
    blocks = partition(graph)
    assert len(blocks) >= 2
    for b in blocks:
        assert not {"n", "s"} & (set(b.inputs) | set(b.outputs)), (b.name, b.inputs, b.outputs)
    shape_nodes = {n.name for n in graph.nodes if n.op == "Shape"}
    reshapes = {n.name for n in graph.nodes if n.op == "Reshape"}
    with_reshape = [b for b in blocks if reshapes & set(b.nodes)]
    assert len(with_reshape) >= 2
    for b in with_reshape:
        assert shape_nodes <= set(b.nodes), b.name
        assert "mask" in b.inputs


@pytest.mark.parametrize("method", ["brecq", "qdrop"])
def test_reconstruction_runs_on_attention_blocks(method):
    config = without_floors(onnxq.QuantConfig(weight_bits=4, method=method, recon_iters=6, recon_samples=24,
                                              recon_batch_size=3, first_last_bits=None, validate=True))
    result = onnxq.quantize(_model(), _feeds(), config, validation=_feeds(batches=1))
    blocks = result.report["reconstruction"]["blocks"]
    assert len(blocks) >= 2
    assert all(np.isfinite(b["loss_rtn"]) and np.isfinite(b["loss_final"]) for b in blocks), blocks
    assert any(b["kept"] for b in blocks)
    assert result.validation.ok


def test_ragged_calibration_batches_are_refused_with_the_fix():
    config = onnxq.QuantConfig(weight_bits=4, method="brecq", recon_iters=2, recon_samples=24,
                               recon_batch_size=3, validate=False)
    with pytest.raises(UserError, match="one shape"):
        onnxq.quantize(_model(), _feeds(ragged=True), config)


def test_cache_keeps_token_ids_exact_and_huge_floats_finite():
    """int64 ids stay int64 (float16 rounds 2049 to 2048); a -3.4e38 mask bias is kept in float32."""
    model = _model()
    feeds = _feeds(batches=2)
    store = TensorStore(budget_bytes=1 << 20)
    got = collect(model, ["ids", "bias4", "x1"], feeds, 8, store, "test")
    np.testing.assert_array_equal(got["ids"], np.concatenate([f["ids"] for f in feeds]))
    assert got["ids"].dtype == np.int64
    assert got["bias4"].dtype == np.float32 and np.isfinite(got["bias4"]).all()
    assert got["bias4"].min() < -1e38
    assert got["x1"].dtype == np.float16


def test_inspect_lists_the_attention_blocks_and_what_torch_cannot_run(tmp_path):
    import onnx

    from onnxq.pipeline.inspect import inspect_model

    model = _model()
    model.graph.node.append(onnx.helper.make_node("Hardmax", ["y"], ["hm"]))  # no torch implementation
    out = onnx.helper.make_tensor_value_info("hm", onnx.TensorProto.FLOAT, ["N", "S", 4])
    model.graph.output.append(out)
    onnx.save(model, tmp_path / "t.onnx")
    rec = inspect_model(tmp_path / "t.onnx", onnxq.QuantConfig(weight_bits=4))["reconstruction"]
    assert len(rec["blocks"]) >= 2
    assert any("mask" in b.split(" nodes, ")[1] for b in rec["blocks"][1:])
    assert [why for why in rec["not_in_torch"].values()] == ["op Hardmax has no torch implementation"]
