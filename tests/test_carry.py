"""Capture once: the quantized model's block inputs carried block by block in torch equal onnxruntime's
run of the QDQ graph, and a block the carry cannot reach is captured in onnxruntime instead."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from onnxq.passes.export.cleanup import CleanupPass
from onnxq.passes.quant.assign_specs import AssignSpecsPass
from onnxq.passes.quant.calibrate import CalibratePass
from onnxq.passes.quant.insert_qdq import InsertQDQPass

import onnxq
from onnxq.blocks.cache import TensorStore, collect, weights_only
from onnxq.blocks.carry import Carry
from onnxq.blocks.partition import partition
from onnxq.core import graph as g
from onnxq.core.pass_infra import PassManager
from tests.helpers import prepare_float

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture(scope="module")
def calib() -> list[dict[str, np.ndarray]]:
    x = np.load(MODELS / "tiny_cnn_calib.npz")["input"]
    return [{"input": x[i:i + 8]} for i in range(0, 48, 8)]


def _qdq_graph(calib, bits: int, add_inputs: str = "all"):
    config = onnxq.QuantConfig(weight_bits=bits, activation_bits=bits, method="rtn", validate=False).to_config()
    config = config.replace(activations=dataclasses.replace(config.activations, add_inputs=add_inputs))
    reference, ctx = prepare_float(g.load_model(MODELS / "tiny_cnn.onnx"), config)
    ctx.calib, ctx.reference = calib, reference
    graph = g.to_graph(reference)
    PassManager([AssignSpecsPass(), CalibratePass(), InsertQDQPass(), CleanupPass()])(graph, ctx)
    return graph, ctx


@pytest.mark.parametrize("bits, add_inputs", [(8, "all"), (4, "all"), (4, "residual")])
@pytest.mark.parametrize("activations", [True, False])
def test_carried_inputs_equal_onnxruntime(calib, bits, add_inputs, activations):
    graph, ctx = _qdq_graph(calib, bits, add_inputs)
    fused = [n for n in graph.nodes if n.op == "Add" and any(t.inputs and t.inputs[0].op == "Conv" for t in n.inputs)]
    assert bool(fused) == (add_inputs == "residual")  # the residual Add reads a Conv's float output
    model = g.to_model(graph)
    model = model if activations else weights_only(model)
    blocks = partition(graph)
    assert len(blocks) >= 3
    store = TensorStore(1 << 30)
    carry = Carry(blocks, calib, 40, store, activations=activations)
    for block in blocks:
        got = carry.inputs(block, lambda: pytest.fail("the carry should reach every block"))
        ref = collect(model, list(block.inputs), calib, 40, store, "ref", float_dtype=np.float32)
        for name, value in zip(block.inputs, got, strict=True):
            expected = ref[name]
            assert value.shape == expected.shape and value.dtype == np.float32
            # float32 summation order differs between torch and onnxruntime; nothing more
            np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()),
                                       err_msg=block.name)
            qp = ctx.qparams.get(name)
            if activations and qp is not None:  # and the block's input quantizer reads the same integers

                def codes(a, qp=qp):
                    return np.clip(np.rint(a / qp.scale) + qp.zero_point, qp.spec.qmin, qp.spec.qmax)

                np.testing.assert_array_equal(codes(value), codes(expected), err_msg=block.name)
        carry.advance(graph, ctx, block)
    assert carry.carried_blocks == len(blocks) - 1 and carry.captured_blocks == 0
    assert not carry.cut  # nothing is kept past the last block that reads it


def test_unreachable_block_is_captured_in_onnxruntime(calib):
    graph, ctx = _qdq_graph(calib, 8)
    model = g.to_model(graph)
    blocks = partition(graph)
    store = TensorStore(1 << 30)
    carry = Carry(blocks[1:], calib, 40, store)  # the first block is never carried: its outputs are missing
    block = blocks[1]
    got = carry.inputs(block, lambda: model)
    ref = collect(model, list(block.inputs), calib, 40, store, "ref", float_dtype=np.float32)
    np.testing.assert_array_equal(got[0], ref[block.inputs[0]])
    assert carry.captured_blocks == 1
    carry.advance(graph, ctx, block)
    assert carry.carried_blocks == 1 and set(carry.cut) == set(blocks[2].inputs)


def test_float_targets_in_budget_sized_groups_change_nothing(calib, monkeypatch):
    """The float model runs once for all blocks when their tensors fit the cache budget; with a budget
    that holds one block's, once per block; the learned codes are the same."""
    import onnxq.passes.rounding.reconstruct as rp

    from tests.helpers import recon_config

    config = onnxq.QuantConfig(weight_bits=4, activation_bits=4, method="qdrop", recon_iters=4, recon_samples=16,
                               recon_batch_size=8, validate=False)
    runs = []
    real = rp.collect
    monkeypatch.setattr(rp, "collect", lambda *a, **k: runs.append(a[5]) or real(*a, **k))
    models = []
    for budget in (1 << 30, 1):
        graph, ctx = _qdq_graph(calib, 4)
        runs.clear()
        rp.ReconstructPass(recon_config(config), cache_budget_bytes=budget)(graph, ctx)
        captures = sum(1 for desc in runs if desc == "capture float")
        models.append((g.to_model(graph).SerializeToString(), captures, len(ctx.reconstruction["blocks"])))
    (big, once, blocks), (small, per_block, _) = models
    assert once == 1 and per_block == blocks >= 3
    assert big == small
