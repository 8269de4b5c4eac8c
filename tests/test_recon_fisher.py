"""onnxq.blocks.fisher: the quantized tail in torch and BRECQ's Fisher gradients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import onnxq
from onnxq.blocks.fisher import build_tail, fisher_gradients
from onnxq.blocks.partition import partition
from onnxq.core import graph as g
from onnxq.data.capture import capture
from tests.test_reconstruct import _config, _rtn_graph

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture(scope="module")
def calib() -> list[dict[str, np.ndarray]]:
    x = np.load(MODELS / "tiny_cnn_calib.npz")["input"]
    return [{"input": x[i:i + 4]} for i in range(0, 24, 4)]


def test_tail_equals_onnxruntime_and_gradients_flow(calib):
    """The rest of the quantized network after each block computes the QDQ model's logits."""
    graph, ctx = _rtn_graph(calib, _config())
    model = g.to_model(graph)
    blocks = partition(graph)
    for block in blocks:
        ok, tail = build_tail(graph, block, ctx)
        assert ok, block.name
        if tail is None:  # the last block: its outputs are the logits
            assert list(block.outputs) == [t.name for t in graph.outputs]
            continue
        values: dict[str, list[np.ndarray]] = {}
        capture(model, [*block.outputs, "logits"], calib[:2], lambda n, v: values.setdefault(n, []).append(v))
        z = [torch.from_numpy(np.concatenate(values[n])) for n in block.outputs]
        with torch.no_grad():
            got = tail(*z)[0]
        ref = np.concatenate(values["logits"])
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=block.name)
        grads = fisher_gradients(tail, z, [1.5 * ref])
        assert grads[0].shape == z[0].shape and grads[0].dtype == np.float32
        assert np.abs(grads[0]).max() > 0, block.name


def test_gradient_at_the_logits_is_the_softmax_difference():
    """d/dz KL(softmax(fp) || softmax(z)) with batchmean over 32 = (softmax(z) - softmax(fp)) / 32."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((40, 5)).astype(np.float32)
    fp = rng.standard_normal((40, 5)).astype(np.float32)
    got = fisher_gradients(None, [torch.from_numpy(z)], [fp])[0]
    sm = lambda a: np.exp(a) / np.exp(a).sum(1, keepdims=True)  # noqa: E731
    expected = sm(z) - sm(fp)
    expected[:32] /= 32
    expected[32:] /= 8  # the last mini-batch holds 8 samples
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_fisher_weighted_brecq_end_to_end(calib):
    config = _config(fisher=True, recon_iters=6, recon_samples=12, validate=True)
    result = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, config)
    blocks = result.report["reconstruction"]["blocks"]
    assert len(blocks) >= 3 and all(b["loss_final"] > 0 for b in blocks)
    assert result.validation.checker_ok and result.validation.runs_enable_all
    plain = onnxq.quantize(MODELS / "tiny_cnn.onnx", calib, _config(recon_iters=6, recon_samples=12))
    # The Fisher weights (|g| + 1)^2 >= 1 make the weighted error at least the plain one (the weight
    # pass's: in BRECQ's two-pass order the activation pass reports plain errors) on the same inputs: the
    # first block's (later blocks read what the two runs' different codes upstream compute).
    weighted = blocks[0].get("weight_phase", blocks[0])
    unweighted = plain.report["reconstruction"]["blocks"][0]
    unweighted = unweighted.get("weight_phase", unweighted)
    assert weighted["loss_rtn"] >= unweighted["loss_rtn"] * (1 - 1e-6)
