"""AdaQuant's torch quantizers (exact ONNX numerics, straight-through gradients) and its layer optimiser."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onnxq.blocks.engine_settings import adaquant_settings
from onnxq.config import AdaQuant
from onnxq.errors import UserError
from onnxq.recon.adaquant import (
    AdaQuantAct,
    AdaQuantBias,
    AdaQuantWeight,
    _groups,
    optimize_layer,
)
from onnxq.recon.fake_quant import fake_quant
from tests.helpers import one_torch_thread

_one_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)


def _weight(seed: int = 0, relative: bool = True) -> tuple[AdaQuantWeight, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    s = (np.abs(w).reshape(6, -1).max(1) / 7).astype(np.float32)
    return AdaQuantWeight(w, s, np.zeros(6, np.int64), -8, 7, axis=0, relative=relative), w, s


@pytest.mark.parametrize("relative", [True, False])
def test_weight_starts_at_round_to_nearest_and_forward_is_dequantized_codes(relative):
    q, w, s = _weight(relative=relative)
    codes = q.codes().numpy()
    np.testing.assert_array_equal(codes, np.clip(np.round(w / s[:, None, None, None]), -8, 7))
    with torch.no_grad():
        out = q().numpy()
    np.testing.assert_array_equal(out, codes.astype(np.float32) * s[:, None, None, None])
    assert q.export_scale().shape == (6,) and np.array_equal(q.export_scale(), s)


def test_weight_gradients_are_straight_through_and_lsq():
    q, w, s = _weight()
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    (q() * g).sum().backward()
    # continuous weight: identity gradient inside the grid (u = W / unit, so dL/du = g * unit)
    inside = (np.abs(np.round(w / s[:, None, None, None])) <= 7)
    expect = g.numpy() * s[:, None, None, None]
    np.testing.assert_allclose(q.u.grad.numpy()[inside], expect[inside], rtol=1e-6)
    # step size: LSQ sum over the channel of g * (round(v) - v) (times unit for the normalised r)
    v = w / s[:, None, None, None]
    lsq = (g.numpy() * (np.clip(np.round(v), -8, 7) - np.where(inside, v, 0))).reshape(6, -1).sum(1)
    np.testing.assert_allclose(q.r.grad.numpy().reshape(-1), lsq * s, rtol=1e-4, atol=1e-6)


def test_act_zero_point_is_rounded_and_gets_the_clipped_gradient():
    a = AdaQuantAct(0.05, 100, 0, 255)
    with torch.no_grad():
        a.z.fill_(100.4)  # continuous value between codes: the forward uses round(z) = 100
    x = (torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 4).requires_grad_(True)
    out = a(x)
    ref = fake_quant(x.detach(), torch.tensor(0.05), torch.tensor(100.0), 0, 255)
    assert torch.equal(out.detach(), ref)
    g = torch.rand(x.shape, generator=torch.Generator().manual_seed(2))
    (out * g).sum().backward()
    v = x.detach() / 0.05
    clipped = (v < 0 - 100) | (v > 255 - 100)
    assert clipped.any() and (~clipped).any()
    assert float(a.z.grad) == pytest.approx(float(-(g * clipped).sum() * 0.05), rel=1e-5)
    assert torch.equal(x.grad, g * (~clipped))
    scale, zp = a.export()
    assert zp == 100 and scale.dtype == np.float32 and float(scale) == pytest.approx(0.05)


def test_symmetric_act_keeps_its_zero_point():
    a = AdaQuantAct(0.1, 128, 0, 255, learn_zero_point=False)
    x = torch.randn(64) * 30
    a(x).sum().backward()
    assert a.z.grad is None and a.r.grad is not None


def test_bias_is_its_int32_quantization_with_the_linked_scales():
    q, _, s = _weight()
    a = AdaQuantAct(0.02, 0, 0, 255)
    b = np.array([0.3, -1.2, 5.0, 0.0, 1e-4, -7.77], np.float32)
    bq = AdaQuantBias(b, q, a, unit=np.full(6, 0.5, np.float32))
    s_b = (s.astype(np.float32) * np.float32(0.02)).astype(np.float32)
    with torch.no_grad():
        out = bq().numpy()
    np.testing.assert_array_equal(out, (np.round(b / s_b) * s_b).astype(np.float32))
    bq().sum().backward()
    np.testing.assert_allclose(bq.u.grad.numpy(), np.full(6, 0.5), rtol=1e-6)  # straight through, times unit


def test_learning_rates_follow_the_paper_or_relative_units():
    q, _, _ = _weight(relative=False)
    a = AdaQuantAct(0.05, 10, 0, 255, relative=False)
    groups = _groups([q], [], [a], adaquant_settings(AdaQuant.paper()))
    lrs = [g["lr"] for g in groups]
    # ranges -> steps, float zero-point -> codes
    assert lrs == pytest.approx([1e-5, 1e-3 / 15, 1e-1 / 255, 1e-1 / 0.05])
    rel = _groups([_weight()[0]], [], [AdaQuantAct(0.05, 10, 0, 255)], adaquant_settings(AdaQuant.fast()))
    assert [g["lr"] for g in rel] == pytest.approx([2e-3, 3e-3, 2e-2, 2e-2])


class _Layer(nn.Module):
    def __init__(self, w: AdaQuantWeight, b: AdaQuantBias, a: AdaQuantAct) -> None:
        super().__init__()
        self.w, self.b, self.a = w, b, a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.conv2d(self.a(x), self.w(), self.b(), padding=1))


def _problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(6, 4, 3, 3, generator=gen) * 0.3)
        conv.bias.copy_(torch.randn(6, generator=gen) * 0.1)
    x = torch.randn(80, 4, 6, 6, generator=gen).abs()
    with torch.no_grad():
        y = F.relu(conv(x))
    w = conv.weight.detach().numpy()
    s = (np.abs(w).reshape(6, -1).max(1) / 7).astype(np.float32)
    wq = AdaQuantWeight(w, s, np.zeros(6, np.int64), -8, 7, axis=0)
    aq = AdaQuantAct(float(x.max()) / 15, 0, 0, 15)
    bq = AdaQuantBias(conv.bias.detach().numpy(), wq, aq, unit=0.1)
    return _Layer(wq, bq, aq), x.half(), y.half()


def test_optimize_layer_beats_round_to_nearest_and_is_deterministic():
    cfg = adaquant_settings(AdaQuant.fast(iters=40, batch_size=16, holdout=16, log_every=10))
    layer, x, y = _problem()
    res = optimize_layer(layer, {"w": layer.w}, {"b": layer.b}, {"x": layer.a}, [x], [y], cfg, progress=False)
    assert res.loss_final < 0.8 * res.loss_rtn and res.improved
    assert len(res.history) == 5 and res.iters == 40
    assert all(p.requires_grad for p in (layer.w.u, layer.w.r, layer.b.u, layer.a.r, layer.a.z))
    again, x2, y2 = _problem()
    res2 = optimize_layer(again, {"w": again.w}, {"b": again.b}, {"x": again.a}, [x2], [y2], cfg,
                          progress=False)
    assert res2.loss_final == res.loss_final
    assert torch.equal(again.w.codes(), layer.w.codes()) and torch.equal(again.a.z, layer.a.z)


def test_config_rejects_bad_values():
    with pytest.raises(UserError, match="mode"):
        AdaQuant(mode="both")
    with pytest.raises(UserError, match="iters"):
        AdaQuant(iters=0)
    with pytest.raises(UserError, match="lr_weight"):
        AdaQuant(lr_weight=-1.0)
    assert AdaQuant.paper().iters == 100 and AdaQuant.paper().batch_size == 50
