"""Reconstruction from a ternary operator's codes (PTQ setting) and learned weight scales."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from onnxq.passes.export.cleanup import CleanupPass
from onnxq.passes.quant.assign_specs import AssignSpecsPass
from onnxq.passes.quant.calibrate import CalibratePass
from onnxq.passes.quant.insert_qdq import InsertQDQPass

import onnxq
from onnxq.blocks.build import build_block
from onnxq.blocks.partition import partition
from onnxq.core import graph as g
from onnxq.core.pass_infra import PassManager
from onnxq.recon import AdaRoundWeight, RoundToNearestWeight
from onnxq.recon.adaround import weight_optimizer
from onnxq.targets.rules import check_target
from onnxq.ternary.operators import ternarize
from tests.helpers import make_model, prepare_float

TEXT = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,3,8,8] x) => (float[N,5] y) <float[8,3,3,3] w1, float[12,8,3,3] w2, float[12] b2, float[16,12,1,1] w3,
                                         float[16] b3, float[16,5] w4> {
    c1 = Conv <pads=[1,1,1,1]> (x, w1)
    r1 = Relu (c1)
    c2 = Conv <pads=[1,1,1,1]> (r1, w2, b2)
    r2 = Relu (c2)
    c3 = Conv (r2, w3, b3)
    r3 = Relu (c3)
    p = GlobalAveragePool (r3)
    f = Flatten (p)
    y = MatMul (f, w4)
}"""


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return make_model(TEXT, seed=5)


@pytest.fixture(scope="module")
def calib() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((4, 3, 8, 8)).astype(np.float32)} for _ in range(8)]


def _config(**kw) -> onnxq.QuantConfig:
    base = dict(weight_bits=2, ternary_method="twn", ternary_storage="int4", method="brecq", recon_iters=12,
                recon_samples=16, recon_batch_size=8, validate=False)
    base.update(kw)
    return onnxq.QuantConfig(**base)


def _codes(m: onnx.ModelProto, w: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == w + "_quantized")).astype(np.int64)


def test_quantizers_start_from_the_operators_codes(model, calib):
    config = _config()
    reference, ctx = prepare_float(model, config)
    ctx.calib, ctx.reference = calib, reference
    graph = g.to_graph(reference)
    PassManager([AssignSpecsPass(), CalibratePass(), InsertQDQPass(), CleanupPass()])(graph, ctx)
    w2 = np.asarray(graph.tensors()["w2_quantized"].values).astype(np.int64)
    twn = ternarize(ctx.float_weights["w2"], "twn", axis=0)
    np.testing.assert_array_equal(w2, twn.codes)
    assert np.any(w2 != np.clip(np.rint(ctx.float_weights["w2"] / twn.scale[:, None, None, None]), -1, 1))
    for rounding, cls in ((True, AdaRoundWeight), (False, RoundToNearestWeight)):
        built = [build_block(graph, b, ctx, rounding=rounding, learn_scales=False) for b in partition(graph)]
        quantizers = {built_b.weight_names[k]: q for built_b in built for k, q in built_b.weights.items()}
        q = quantizers["w2"]
        assert isinstance(q, cls) and (q.qmin, q.qmax) == (-1, 1)
        np.testing.assert_array_equal(q.codes().numpy(), twn.codes)
        np.testing.assert_array_equal(q.scale.reshape(-1).numpy(), twn.scale)
        if rounding:
            assert q.learned_scale is None


def test_brecq_from_ternary_codes_stays_ternary_and_is_deterministic(model, calib):
    a = onnxq.quantize(model, calib, _config())
    b = onnxq.quantize(model, calib, _config())
    assert a.model.SerializeToString() == b.model.SerializeToString()
    rec = a.report["reconstruction"]
    assert any(blk["kept"] for blk in rec["blocks"])
    t = a.report["ternary"]
    assert t["ok"] and {x["weight"] for x in t["layers"]} == {"w2", "w3"}
    for w in ("w2", "w3"):
        assert set(np.unique(_codes(a.model, w)).tolist()) <= {-1, 0, 1}
    folded = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert any(np.any(_codes(a.model, w) != ternarize(folded[w], "twn", axis=0).codes) for w in ("w2", "w3"))
    assert check_target(a.model, "ort-cpu") == []


def test_learned_weight_scale_is_written_back_with_biases(model, calib):
    learned = onnxq.quantize(model, calib, _config(method="adaround", learn_weight_scale=True, validate=True))
    inits = {t.name: numpy_helper.to_array(t) for t in learned.model.graph.initializer}
    folded = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    kept = [blk for blk in learned.report["reconstruction"]["blocks"] if blk["kept"]]
    assert kept
    changed = [w for w in ("w2", "w3") if not np.array_equal(inits[w + "_scale"],
                                                             ternarize(folded[w], "twn", axis=0).scale)]
    assert changed  # some learned scale moved away from the operator's
    for w in ("w2", "w3"):
        assert set(np.unique(inits[w + "_quantized"]).tolist()) <= {-1, 0, 1}
    # Biases requantized with the learned weight scale: s_b = s_in * s_w (checked by the rule checker).
    assert check_target(learned.model, "ort-cpu") == []
    assert learned.validation.ok and learned.report["ternary"]["ok"]


def test_adaround_weight_learned_scale_gradient_and_optimizer():
    torch.manual_seed(0)
    w = np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)
    t = ternarize(w, "mquant-b", axis=0)
    q = AdaRoundWeight(w, t.scale, np.zeros(3), -1, 1, axis=0, init_codes=t.codes, learn_scale=True)
    plain = AdaRoundWeight(w, t.scale, np.zeros(3), -1, 1, axis=0, init_codes=t.codes)
    assert plain.learned_scale is None and len(weight_optimizer([plain], 0.05).param_groups) == 1
    q.soft = False
    out = q()
    np.testing.assert_allclose(out.detach().numpy(), t.dequantize(), rtol=1e-6)
    out.sum().backward()
    np.testing.assert_allclose(q.learned_scale.grad.reshape(-1).numpy(), t.codes.sum(axis=1), rtol=1e-6)
    opt = weight_optimizer([q], 0.05)
    assert len(opt.param_groups) == 2
    assert opt.param_groups[1]["lr"] == pytest.approx(q.scale_lr * float(t.scale.mean()))
    # Learning the scale alone fits a target that is the operator's weight times 1.2.
    q.learned_scale.grad = None
    q.v.requires_grad_(False)
    target = torch.from_numpy(t.dequantize() * 1.2)
    first = float(((q() - target) ** 2).sum().detach())
    for _ in range(300):
        opt.zero_grad()
        ((q() - target) ** 2).sum().backward()
        opt.step()
    assert float(((q() - target) ** 2).sum().detach()) < 0.1 * first
    np.testing.assert_allclose(q.scale_values(), t.scale * 1.2, rtol=0.05)
    np.testing.assert_array_equal(q.codes().numpy(), t.codes)
