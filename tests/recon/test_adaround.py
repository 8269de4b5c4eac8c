"""AdaRoundWeight / RoundToNearestWeight: initialisation, hard codes, regulariser, init_codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onnxq.core.spec import Granularity, QParams, QuantSpec, quantize
from onnxq.recon import AdaRoundWeight, RoundToNearestWeight, rectified_sigmoid


def _int4_weight(seed: int = 0, shape=(6, 4, 3, 3)):
    """Per-channel int4 grid whose scales clip the largest weights of each channel."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen)
    amax = w.abs().reshape(shape[0], -1).amax(1)
    scale = (0.8 * amax / 7).float()
    zp = torch.tensor([0, 1, -2, 0, 3, -1])[: shape[0]]
    return w, scale, zp


def _in_range(w: torch.Tensor, q: AdaRoundWeight) -> torch.Tensor:
    u = w / q.scale + q.zero_point
    return (u >= q.qmin) & (u <= q.qmax)


def test_soft_init_reproduces_the_float_weight_inside_the_grid() -> None:
    w, scale, zp = _int4_weight()
    q = AdaRoundWeight(w, scale, zp, -8, 7, axis=0)
    assert q.soft
    soft = q().detach()
    inside = _in_range(w, q)
    assert 0 < int((~inside).sum()) < w.numel()  # clipping is exercised
    torch.testing.assert_close(soft[inside], w[inside], rtol=1e-5, atol=1e-6)
    s = q.scale.expand_as(w)
    z = q.zero_point.expand_as(w)
    clipped = torch.where(w / s + z > 7, (7 - z) * s, (-8 - z) * s)
    torch.testing.assert_close(soft[~inside], clipped[~inside])


def test_hard_init_equals_onnx_round_to_nearest_including_ties() -> None:
    w, scale, zp = _int4_weight(1)
    scale = 2.0 ** torch.round(torch.log2(scale))  # power-of-two scales make exact .5 ties possible
    k = torch.randint(-6, 6, w.shape, generator=torch.Generator().manual_seed(2)).float()
    ties = (k + 0.5) * scale.reshape(-1, 1, 1, 1)
    w = torch.where(torch.arange(w.numel()).reshape(w.shape) % 3 == 0, ties, w)
    ws = w / scale.reshape(-1, 1, 1, 1)
    assert bool((ws - torch.floor(ws) == 0.5).any())
    q = AdaRoundWeight(w, scale, zp, -8, 7, axis=0)
    spec = QuantSpec(bits=4, signed=True, symmetric=False, granularity=Granularity.CHANNEL, axis=0)
    reference = quantize(w.numpy(), QParams(scale.numpy(), zp.numpy(), spec))
    np.testing.assert_array_equal(q.codes().numpy(), reference)
    rtn = RoundToNearestWeight(w, scale, zp, -8, 7, axis=0)
    np.testing.assert_array_equal(rtn.codes().numpy(), reference)
    q.soft = False
    expected = (q.codes().float() - q.zero_point) * q.scale
    assert torch.equal(q().detach(), expected)
    assert torch.equal(rtn(), expected)


def test_codes_stay_within_one_of_nearest_after_any_update() -> None:
    w, scale, zp = _int4_weight(3)
    q = AdaRoundWeight(w, scale, zp, -8, 7, axis=0)
    nearest = q.nearest_codes()
    with torch.no_grad():
        q.v.copy_(torch.randn(q.v.shape, generator=torch.Generator().manual_seed(4)) * 10)
    codes = q.codes()
    assert codes.dtype == torch.int64
    assert int((codes - nearest).abs().max()) <= 1
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    assert bool((codes != nearest).any())


def test_only_v_gets_gradients() -> None:
    w, scale, zp = _int4_weight(5)
    q = AdaRoundWeight(w, scale, zp, -8, 7, axis=0)
    assert [name for name, _ in q.named_parameters()] == ["v"]
    (q() ** 2).sum().backward()
    assert q.v.grad is not None and bool((q.v.grad != 0).any())
    inside_h = (rectified_sigmoid(q.v) > 0) & (rectified_sigmoid(q.v) < 1)
    clipped = ~_in_range(w, q)
    assert bool((q.v.grad[clipped & inside_h] == 0).all())  # saturated weights cannot move


def test_regularizer_falls_as_h_goes_to_zero_or_one() -> None:
    w, scale, zp = _int4_weight(6)
    q = AdaRoundWeight(w, scale, zp, -8, 7, axis=0)
    start = float(q.regularizer(2.0).detach())
    with torch.no_grad():
        q.v.copy_(torch.where(q.v >= 0, q.v + 2.0, q.v - 2.0))
    pushed = float(q.regularizer(2.0).detach())
    with torch.no_grad():
        q.v.copy_(torch.where(q.v >= 0, torch.full_like(q.v, 50.0), torch.full_like(q.v, -50.0)))
    assert 0 < pushed < start
    assert float(q.regularizer(2.0).detach()) == 0.0
    with torch.no_grad():
        q.v.zero_()  # h = 1/2 everywhere: the maximum, one per weight
    assert float(q.regularizer(20.0).detach()) == pytest.approx(w.numel())


def test_init_codes_ternary() -> None:
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(8, 16, generator=gen)
    scale = w.abs().mean(1) * 0.7
    init = torch.randint(-1, 2, w.shape, generator=gen)
    q = AdaRoundWeight(w, scale, torch.zeros(8, dtype=torch.int64), -1, 1, axis=0, init_codes=init)
    assert torch.equal(q.codes(), init)
    q.soft = False
    assert torch.equal(q().detach(), init.float() * scale.reshape(-1, 1))
    assert bool(((q.base == init - 1) | (q.base == init)).all())
    # where the requested code is one of the two neighbours of W/s, the soft weight starts at W
    q.soft = True
    ws = w / scale.reshape(-1, 1)
    f = torch.floor(ws)
    agree = ((init == f) & (ws - f < 0.5)) | ((init == f + 1) & (ws - f >= 0.5))
    agree &= (ws >= -1) & (ws <= 1)
    assert int(agree.sum()) > 10
    torch.testing.assert_close(q().detach()[agree], w[agree], rtol=1e-5, atol=1e-6)


def test_init_codes_validation() -> None:
    w = torch.randn(4, 3)
    with pytest.raises(ValueError):
        AdaRoundWeight(w, torch.ones(4), torch.zeros(4), -1, 1, axis=0, init_codes=torch.full((4, 3), 2))
    with pytest.raises(ValueError):
        AdaRoundWeight(w, torch.ones(4), torch.zeros(4), -1, 1, axis=0, init_codes=torch.zeros(3, 4))
    with pytest.raises(ValueError):
        AdaRoundWeight(w, -torch.ones(4), torch.zeros(4), -1, 1, axis=0)


def test_per_tensor_numpy_inputs() -> None:
    w = np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6)
    q = AdaRoundWeight(w, np.float32(0.1), np.int64(3), 0, 15, axis=None)
    assert q.axis is None and q.scale.dim() == 0
    expected = np.clip(np.round(w / np.float32(0.1)) + 3, 0, 15)
    np.testing.assert_array_equal(q.codes().numpy(), expected)
