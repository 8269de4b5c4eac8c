"""fake_quant / FakeQuant: bit-exact against onnxruntime Q->DQ, STE/LSQ gradients, modes."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxq.recon import MIN_SCALE, FakeQuant, fake_quant, lsq_grad_scale, round_ste
from onnxq.recon.drop_mask import bernoulli_mask
from tests.helpers import run_ort

# (storage dtype, qmin, qmax, opset)
GRIDS = {
    "uint8": (np.uint8, 0, 255, 13),
    "int8": (np.int8, -128, 127, 13),
    "int4": (ml_dtypes.int4, -8, 7, 21),
}


def _qdq_model(scale: np.ndarray, zp: np.ndarray, axis: int | None, opset: int,
               shape: list[int]) -> onnx.ModelProto:
    attrs = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(scale.astype(np.float32), "s"), numpy_helper.from_array(zp, "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 21 else 8
    onnx.checker.check_model(model)
    return model


def _test_data(rng: np.random.Generator, shape: tuple[int, ...], scale: np.ndarray, zp: np.ndarray,
               axis: int | None, qmin: int, qmax: int) -> np.ndarray:
    """Saturating random values, exact .5 ties of the grid and their float neighbours."""
    bshape = [1] * len(shape)
    if axis is not None:
        bshape[axis] = -1
    s = scale.reshape(bshape).astype(np.float32)
    z = zp.astype(np.float32).reshape(bshape)
    span = (qmax - qmin) * s
    wide = rng.uniform(-1.5, 1.5, size=shape).astype(np.float32) * span + (qmin - z + (qmax - qmin) / 2) * s
    k = rng.integers(qmin - 2, qmax + 2, size=shape).astype(np.float32) - z
    ties = ((k + 0.5) * s).astype(np.float32)
    nudged = np.nextafter(ties, ties + rng.choice([-1.0, 1.0], size=shape).astype(np.float32))
    pick = rng.integers(0, 3, size=shape)
    return np.choose(pick, [wide, ties, nudged]).astype(np.float32)


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("pow2", [False, True])
def test_matches_onnxruntime(grid: str, per_channel: bool, pow2: bool) -> None:
    dtype, qmin, qmax, opset = GRIDS[grid]
    rng = np.random.default_rng([list(GRIDS).index(grid), int(per_channel), int(pow2)])
    shape = (3, 5, 4, 6)
    axis = 1 if per_channel else None
    n = shape[1] if per_channel else 1
    scale = 2.0 ** rng.integers(-6, -1, size=n) if pow2 else rng.uniform(0.01, 0.2, size=n)
    scale = scale.astype(np.float32)
    zp64 = rng.integers(qmin, qmax + 1, size=n) if qmin < 0 else rng.integers(100, 156, size=n)
    if not per_channel:
        scale, zp64 = scale.reshape(()), zp64.reshape(())
    zp = zp64.astype(dtype)
    x = _test_data(rng, shape, scale, zp64, axis, qmin, qmax)
    if pow2:  # the data holds exact ties, the case round-half-to-even decides
        s_b = scale.reshape([1, -1, 1, 1]) if per_channel else scale
        v = x / s_b
        assert np.any(v - np.floor(v) == 0.5)
    expected = run_ort(_qdq_model(scale, zp, axis, opset, list(shape)), {"x": x}, level="disable")[0]
    got = fake_quant(torch.from_numpy(x), torch.from_numpy(scale), torch.from_numpy(zp64), qmin, qmax, axis)
    np.testing.assert_array_equal(got.numpy(), expected)
    module = FakeQuant(torch.from_numpy(scale), torch.from_numpy(zp64), qmin, qmax, axis).eval()
    np.testing.assert_array_equal(module(torch.from_numpy(x)).detach().numpy(), expected)


def test_division_not_reciprocal() -> None:
    """x / s and x * (1 / s) round differently near ties; ONNX divides."""
    rng = np.random.default_rng(3)
    s = np.float32(0.0371)
    k = rng.integers(-100, 100, size=20000).astype(np.float32)
    x = np.nextafter(((k + 0.5) * s).astype(np.float32), np.float32(0)).astype(np.float32)
    by_mul = np.round(x * (np.float32(1) / s))
    by_div = np.round(x / s)
    assert np.any(by_mul != by_div)
    got = fake_quant(torch.from_numpy(x), float(s), 0, -128, 127).numpy()
    expected = (np.clip(by_div, -128, 127) * s).astype(np.float32)
    np.testing.assert_array_equal(got, expected)


def test_round_ste_half_even_and_identity_gradient() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0.49, 2.51], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 0.0, 3.0]
    (y * torch.arange(7.0)).sum().backward()
    assert x.grad.tolist() == list(range(7))


def _hand_grads(x: torch.Tensor, g: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int):
    v = x / s
    u = v + z
    inside = (u >= qmin) & (u <= qmax)
    local = torch.where(inside, torch.round(v) - v, torch.where(u < qmin, qmin - z, qmax - z))
    return g * inside, g * local


def test_ste_and_lsq_gradients_per_tensor() -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 6, 5, generator=gen) * 2).requires_grad_()
    s = torch.tensor(0.13, requires_grad=True)
    z = torch.tensor(3.0)
    g = torch.randn(4, 6, 5, generator=gen)
    (fake_quant(x, s, z, -8, 7) * g).sum().backward()
    gx, gs = _hand_grads(x.detach(), g, s.detach(), z, -8, 7)
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(s.grad, gs.sum(), rtol=1e-5, atol=1e-5)
    inside = gx != 0
    assert 0 < int(inside.sum()) < x.numel()  # both regions are exercised


def test_ste_and_lsq_gradients_per_channel_and_grad_scale() -> None:
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 4, 5, generator=gen) * 3).requires_grad_()
    s = torch.tensor([0.05, 0.2, 0.4, 1.0], requires_grad=True)
    z = torch.tensor([0.0, 10.0, 128.0, 250.0])
    g = torch.randn(3, 4, 5, generator=gen)
    gsc = lsq_grad_scale(15, 255)
    (fake_quant(x, s, z, 0, 255, axis=1, grad_scale=gsc) * g).sum().backward()
    gx, gs = _hand_grads(x.detach(), g, s.detach().reshape(1, 4, 1), z.reshape(1, 4, 1), 0, 255)
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(s.grad, gs.sum(dim=(0, 2)) * gsc, rtol=1e-5, atol=1e-6)
    assert gsc == pytest.approx(1 / np.sqrt(15 * 255))


def test_fake_quant_shape_errors() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        fake_quant(x, torch.ones(3), torch.zeros(3), 0, 255)  # per-channel without axis
    with pytest.raises(ValueError):
        fake_quant(x, torch.ones(2), torch.zeros(2), 0, 255, axis=1)
    with pytest.raises(ValueError):
        FakeQuant(torch.ones(3), torch.zeros(3), 0, 255)
    with pytest.raises(ValueError):
        FakeQuant(0.0, 0, 0, 255)
    with pytest.raises(ValueError):
        FakeQuant(0.1, 300, 0, 255)


def test_fake_quant_module_modes() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 16, generator=gen)
    fq = FakeQuant(0.1, 0, -8, 7)
    xq = fake_quant(x, 0.1, 0, -8, 7)
    assert torch.equal(fq(x), xq)
    fq.enabled = False
    assert fq(x) is x
    fq.enabled = True
    assert not fq.learn_scale and not fq.scale.requires_grad
    fq.learn_scale = True
    assert fq.scale.requires_grad
    with torch.no_grad():
        fq.scale.fill_(-1.0)  # a learned scale that went negative is clamped, never used as is
    out = fq(x)
    assert torch.isfinite(out).all() and float(fq.current_scale()) == pytest.approx(MIN_SCALE)


@pytest.mark.parametrize("p", [0.5, 0.25])
def test_drop_keeps_float_with_probability_p(p: float) -> None:
    x = torch.randn(64, 32, 8, generator=torch.Generator().manual_seed(4))
    fq = FakeQuant(0.2, 0, -8, 7)
    xq = fq(x)
    fq.drop_prob = p
    fq.generator = torch.Generator().manual_seed(5)
    fq.train()
    out = fq(x)
    is_fp, is_q = out == x, out == xq
    assert bool((is_fp | is_q).all())  # every element is exactly one of the two
    frac_fp = float((is_fp & ~is_q).sum()) / float((~(is_fp & is_q)).sum())
    assert abs(frac_fp - p) < 0.02
    fq.generator = torch.Generator().manual_seed(5)
    assert torch.equal(fq(x), out)  # seeded -> reproducible
    fq.eval()
    assert torch.equal(fq(x), xq)  # no drop outside training


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_bernoulli_mask(p: float) -> None:
    m1 = bernoulli_mask((100, 1001), p, generator=torch.Generator().manual_seed(0))
    m2 = bernoulli_mask((100, 1001), p, generator=torch.Generator().manual_seed(0))
    assert m1.shape == (100, 1001) and m1.dtype == torch.float32
    assert torch.equal(m1, m2)
    assert set(torch.unique(m1).tolist()) == {0.0, 1.0}
    assert abs(float(m1.mean()) - p) < 0.01


def test_fused_drop_matches_unfused_reference() -> None:
    gen = torch.Generator().manual_seed(6)
    x0 = torch.randn(4, 3, 5, 5, generator=gen) * 2
    keep = bernoulli_mask(x0.shape, 0.5, generator=gen)
    s0 = torch.tensor([0.1, 0.3, 0.05])
    g = torch.randn(x0.shape, generator=gen)
    x1, s1 = x0.clone().requires_grad_(), s0.clone().requires_grad_()
    out1 = fake_quant(x1, s1, torch.zeros(3), -8, 7, axis=1, keep=keep)
    (out1 * g).sum().backward()
    x2, s2 = x0.clone().requires_grad_(), s0.clone().requires_grad_()
    out2 = torch.lerp(fake_quant(x2, s2, torch.zeros(3), -8, 7, axis=1), x2, keep)
    (out2 * g).sum().backward()
    assert torch.equal(out1, out2)
    assert bool(((out1 == x0) | (keep == 0)).all())
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-6)
