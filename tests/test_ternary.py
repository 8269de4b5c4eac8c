"""Tests of onnxq.ternary.operators (numpy only, seeded or hypothesis-driven, fast)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxq.core.spec import Granularity, QParams, quantize
from onnxq.errors import UserError
from onnxq.ternary.operators import (
    METHODS,
    TernaryResult,
    max_error,
    mean_abs_error,
    mse,
    ternarize,
    ternary_mquant,
    ternary_rtn,
    ternary_spec,
    ternary_tquant,
    ternary_twn,
)

HALF_STEP_METHODS = ("rtn", "tquant", "mquant-a")  # threshold == scale / 2


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def sample(dist: str, shape, seed: int = 0) -> np.ndarray:
    g = rng(seed)
    if dist == "gauss":
        x = g.standard_normal(shape)
    elif dist == "laplace":
        x = g.laplace(size=shape)
    elif dist == "uniform":
        x = g.uniform(-1.0, 1.0, shape)
    elif dist == "t3":
        x = g.standard_t(3, shape)
    elif dist == "skewed":
        x = g.gamma(2.0, size=shape) - 2.0
    else:
        raise ValueError(dist)
    return x.astype(np.float32)


# Weights (C, n) with bounded float32 values; zeros and repeated values are common in hypothesis draws.
# Magnitudes below 1e-6 become 0: near float32's smallest normal the scale is clamped (tested apart).
weights = hnp.arrays(
    np.float32,
    st.tuples(st.integers(1, 4), st.integers(1, 24)),
    elements=st.floats(-100, 100, width=32, allow_subnormal=False).map(lambda x: 0.0 if abs(x) < 1e-6 else x),
)
method_st = st.sampled_from(METHODS)


def rows(w: np.ndarray) -> np.ndarray:
    return w.astype(np.float64).reshape(w.shape[0], -1)


# ----- structural properties ---------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(w=weights, method=method_st, per_tensor=st.booleans())
def test_result_structure(w, method, per_tensor):
    axis = None if per_tensor else 0
    r = ternarize(w, method, axis=axis)
    assert r.codes.dtype == np.int8 and r.codes.shape == w.shape
    assert set(np.unique(r.codes)) <= {-1, 0, 1}
    assert r.scale.dtype == np.float32
    assert r.scale.shape == (() if per_tensor else (w.shape[0],))
    assert r.threshold.shape == r.scale.shape
    assert np.all(np.isfinite(r.scale)) and np.all(r.scale > 0)
    assert np.all(r.threshold >= 0)
    deq = r.dequantize()
    assert deq.dtype == np.float32 and deq.shape == w.shape
    np.testing.assert_array_equal(deq, r.codes * (r.scale if per_tensor else r.scale[:, None]))
    assert r.sparsity == pytest.approx(np.mean(r.codes == 0))
    qp = r.qparams()
    assert isinstance(qp, QParams) and np.all(qp.zero_point == 0)
    assert qp.spec.bits == 2 and (qp.spec.qmin, qp.spec.qmax) == (-1, 1)
    assert qp.spec.axis == axis


@settings(max_examples=60, deadline=None)
@given(w=weights, method=method_st)
def test_codes_follow_threshold_with_ties_to_zero(w, method):
    r = ternarize(w, method)
    x = rows(w)
    expect = np.sign(x) * (np.abs(x) > r.threshold[:, None])
    np.testing.assert_array_equal(r.codes, expect)
    # Every group that is not all zero keeps at least one non-zero code.
    assert np.all(np.any(r.codes != 0, axis=1) == np.any(x != 0, axis=1))


@settings(max_examples=40, deadline=None)
@given(w=weights, method=method_st)
def test_deterministic_and_input_untouched(w, method):
    before = w.copy()
    a, b = ternarize(w, method), ternarize(w, method)
    np.testing.assert_array_equal(w, before)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scale, b.scale)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("axis", [0, 1, 3, -1])
def test_per_channel_equals_loop_over_channels(method, axis):
    w = sample("laplace", (5, 4, 3, 6), seed=3)
    r = ternarize(w, method, axis=axis)
    ax = axis % w.ndim
    assert r.axis == ax
    for c in range(w.shape[ax]):
        sub = np.take(w, c, axis=ax)
        one = ternarize(sub, method, axis=None)
        np.testing.assert_array_equal(np.take(r.codes, c, axis=ax), one.codes)
        assert r.scale[c] == one.scale
        assert r.threshold[c] == one.threshold
    np.testing.assert_array_equal(max_error(w, r, per_group=True),
                                  [max_error(np.take(w, c, axis=ax), ternarize(np.take(w, c, axis=ax), method,
                                                                               axis=None))
                                   for c in range(w.shape[ax])])


@pytest.mark.parametrize("method", METHODS)
def test_per_tensor_equals_flattened(method):
    w = sample("gauss", (6, 5, 2), seed=4)
    r = ternarize(w, method, axis=None)
    flat = ternarize(w.reshape(1, -1), method, axis=0)
    assert r.axis is None and r.scale.shape == ()
    np.testing.assert_array_equal(r.codes.reshape(1, -1), flat.codes)
    assert r.scale == flat.scale[0]
    assert r.qparams().spec.granularity is Granularity.TENSOR


def test_ternary_spec():
    pc, pt = ternary_spec(1), ternary_spec(None)
    assert pc.granularity is Granularity.CHANNEL and pc.axis == 1
    assert pt.granularity is Granularity.TENSOR and pt.axis is None
    for spec in (pc, pt):
        assert (spec.bits, spec.signed, spec.narrow, spec.qmin, spec.qmax) == (2, True, True, -1, 1)
    with pytest.raises(ValueError):
        QParams(np.array([1.0, 0.0]), np.zeros(2), pc)  # QParams still rejects a zero scale


@pytest.mark.parametrize("method", HALF_STEP_METHODS)
def test_quantizelinear_reproduces_codes_when_threshold_is_half_scale(method):
    w = sample("gauss", (8, 50), seed=5)
    r = ternarize(w, method)
    np.testing.assert_array_equal(quantize(w, r.qparams()), r.codes)


def test_twn_codes_are_not_round_of_w_over_s():
    # Delta = 0.7 * 0.9333 = 0.6533 > 0.6 > s/2 = 0.5: TWN zeroes 0.6, round(0.6 / 1) would not.
    w = np.array([1, 1, 1, 1, 1, 0.6], dtype=np.float32)
    r = ternary_twn(w, None)
    assert r.codes[-1] == 0 and quantize(w, r.qparams())[-1] == 1


# ----- TQuant vs RTN: max error ------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(w=weights)
def test_tquant_max_error_is_m_over_3(w):
    m = np.max(np.abs(rows(w)), axis=1)
    err = max_error(w, ternary_tquant(w, 0), per_group=True)
    assert np.all(err <= m / 3 + 1e-6 * m + 1e-30)
    # Reached at |w| = M (up to float32 rounding of the scale).
    np.testing.assert_allclose(err, m / 3, rtol=1e-6, atol=0)
    np.testing.assert_allclose(max_error(w, ternary_rtn(w, 0), per_group=True) <= m / 2 * (1 + 1e-6), True)


@settings(max_examples=80, deadline=None)
@given(w=weights)
def test_tquant_beats_rtn_whenever_a_weight_lies_in_the_middle_band(w):
    """RTN's max error reaches M/3 iff some |w| is in [M/3, 2M/3]; TQuant's is always M/3."""
    a = np.abs(rows(w))
    m = a.max(axis=1, keepdims=True)
    middle = np.any((a >= m / 3) & (a <= 2 * m / 3), axis=1) & (m[:, 0] > 0)
    tq = max_error(w, ternary_tquant(w, 0), per_group=True)
    rt = max_error(w, ternary_rtn(w, 0), per_group=True)
    assert np.all(tq[middle] <= rt[middle] * (1 + 1e-6))
    assert np.all(rt[~middle] <= m[~middle, 0] / 3 * (1 + 1e-6))


@pytest.mark.parametrize("dist", ["gauss", "laplace", "uniform", "t3", "skewed"])
def test_tquant_max_error_not_above_rtn_on_random_tensors(dist):
    for seed in range(10):
        w = sample(dist, (4096,), seed=seed) * np.float32(0.05)
        assert max_error(w, ternarize(w, "tquant", axis=None)) <= max_error(w, ternarize(w, "rtn", axis=None))
    # Per channel with 256 weights a group: every channel for light tails.
    w = sample(dist, (64, 256), seed=11)
    tq = max_error(w, ternary_tquant(w, 0), per_group=True)
    rt = max_error(w, ternary_rtn(w, 0), per_group=True)
    if dist != "t3":
        assert np.all(tq <= rt)
    else:
        # Heavy tails: a channel whose max is an outlier (no other |w| in [M/3, 2M/3]) has a lower
        # RTN max error. Such channels exist, and the middle-band condition explains every one.
        a = np.abs(rows(w))
        m = a.max(axis=1, keepdims=True)
        middle = np.any((a >= m / 3) & (a <= 2 * m / 3), axis=1)
        assert np.any(tq > rt)
        np.testing.assert_array_equal(tq > rt, ~middle)


def test_constant_channel_rtn_exact_tquant_m_over_3():
    w = np.full((2, 9), 0.5, dtype=np.float32)
    w[1] *= -1
    assert max_error(w, ternary_rtn(w)) == 0.0
    assert max_error(w, ternary_tquant(w)) == pytest.approx(0.5 / 3, rel=1e-6)


# ----- MQuant --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dist", ["gauss", "laplace", "uniform", "t3"])
@pytest.mark.parametrize("n", [9, 100, 1000])
def test_mquant_bins_hold_a_third_each(dist, n):
    w = sample(dist, (32, n), seed=n)
    for variant in ("a", "b"):
        r = ternary_mquant(w, 0, variant)
        zeros = np.sum(r.codes == 0, axis=1)
        np.testing.assert_array_equal(zeros, -(-n // 3))  # ceil(n/3): continuous data, no ties
        plus = np.sum(r.codes == 1, axis=1)
        nonzero = n - zeros
        # Symmetric data: plus ~ Binomial(nonzero, 1/2); 4.5 sigma per channel.
        assert np.all(np.abs(plus - nonzero / 2) <= 4.5 * np.sqrt(nonzero) / 2 + 0.5)
        assert r.sparsity == pytest.approx(-(-n // 3) / n)


@settings(max_examples=80, deadline=None)
@given(w=weights)
def test_mquant_b_mse_not_above_a(w):
    a, b = ternary_mquant(w, 0, "a"), ternary_mquant(w, 0, "b")
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.threshold, b.threshold)
    ma, mb = mse(w, a, per_group=True), mse(w, b, per_group=True)
    assert np.all(mb <= ma * (1 + 1e-5) + 1e-12)


def test_mquant_hand_computation_and_ties():
    w = np.array([-0.1, 0.2, -0.3, 0.4, -0.6, 0.9], dtype=np.float64)  # n = 6, k = 2 -> t = 0.2
    a, b = ternary_mquant(w, None, "a"), ternary_mquant(w, None, "b")
    assert a.threshold == 0.2
    np.testing.assert_array_equal(a.codes, [0, 0, -1, 1, -1, 1])  # |w| == t goes to 0
    assert a.scale == np.float32(0.4)
    assert b.scale == np.float32((0.3 + 0.4 + 0.6 + 0.9) / 4)
    # Repeated values at the quantile all go to zero: zeros 4 of 6.
    r = ternary_mquant(np.array([1, -1, 1, -1, 2, 3.0]), None, "b")
    assert r.threshold == 1.0 and r.sparsity == pytest.approx(4 / 6) and r.scale == 2.5


def test_twn_hand_computation():
    w = np.array([0.1, -0.5, 1.0, -2.0, 0.05, 0.3], dtype=np.float32)
    r = ternary_twn(w, None)
    delta = 0.7 * (0.1 + 0.5 + 1.0 + 2.0 + 0.05 + 0.3) / 6
    assert r.threshold == pytest.approx(delta, rel=1e-6)
    np.testing.assert_array_equal(r.codes, [0, -1, 1, -1, 0, 0])
    assert r.scale == pytest.approx((0.5 + 1.0 + 2.0) / 3, rel=1e-6)
    assert r.sparsity == 0.5
    # Tie: mean|w| = 1, Delta = 0.7 == |w0| -> code 0.
    t = ternary_twn(np.array([0.7, -1.3]), None)
    assert t.threshold == 0.7
    np.testing.assert_array_equal(t.codes, [0, -1])
    assert t.scale == np.float32(1.3)


def test_rtn_and_tquant_hand_computation_and_ties():
    w = np.array([0.0, 0.2, -0.4, 0.5, 0.6, -0.8, 1.0], dtype=np.float64)
    r = ternary_rtn(w, None)  # t = 0.5: the tie 0.5 -> 0, as round-half-even
    np.testing.assert_array_equal(r.codes, [0, 0, 0, 0, 1, -1, 1])
    assert (r.scale, r.threshold, r.sparsity) == (1.0, 0.5, pytest.approx(4 / 7))
    np.testing.assert_array_equal(quantize(w, r.qparams()), r.codes)
    t = ternary_tquant(np.array([3.0, 1.0, -1.0, -2.0]), None)  # t = 1 exactly: ties -> 0
    np.testing.assert_array_equal(t.codes, [1, 0, 0, -1])
    assert t.scale == 2.0 and t.threshold == 1.0 and t.sparsity == 0.5


# ----- edge cases ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_all_zero_constant_and_single_value_channels(method):
    w = np.zeros((4, 6), dtype=np.float32)
    w[1] = -0.25  # constant
    w[2, 3] = 2.0  # single non-zero value
    w[3] = [0, 0, 0, 0, 5, 5]
    r = ternarize(w, method)
    assert r.scale[0] == 1.0 and r.threshold[0] == 0.0 and np.all(r.codes[0] == 0)
    assert np.all(np.isfinite(r.dequantize()))
    np.testing.assert_array_equal(r.codes[2], [0, 0, 0, 1, 0, 0])
    assert np.all(r.codes[1] == -1)
    if method != "tquant":
        assert r.scale[2] == 2.0
        np.testing.assert_array_equal(r.dequantize(), w)  # these groups are exactly ternary
    else:
        assert r.scale[2] == np.float32(4 / 3)
    np.testing.assert_array_equal(r.codes[3], [0, 0, 0, 0, 1, 1])


def test_mquant_guard_when_zero_band_would_swallow_the_group():
    w = np.array([0, 0, 0, 5, 5, 5, 5, 5, 5, 5], dtype=np.float32)  # k = 4 -> quantile = 5 = M
    for variant in ("a", "b"):
        r = ternary_mquant(w, None, variant)
        assert r.threshold == 0.0 and r.scale == 5.0 and max_error(w, r) == 0.0
    r = ternary_mquant(np.array([2.0, -1.0, 0.0]), None, "a")  # t = 0 -> variant b's scale
    assert r.threshold == 0.0 and r.scale == 1.5


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int32])
@pytest.mark.parametrize("method", METHODS)
def test_input_dtypes_give_float32_scale(dtype, method):
    w = (sample("gauss", (3, 40), seed=7) * 10).astype(dtype)
    r = ternarize(w, method)
    ref = ternarize(w.astype(np.float64), method)
    assert r.scale.dtype == np.float32 and r.dequantize().dtype == np.float32
    np.testing.assert_array_equal(r.codes, ref.codes)
    np.testing.assert_array_equal(r.scale, ref.scale)


@pytest.mark.parametrize("method", METHODS)
def test_tiny_weights_keep_a_positive_normal_scale(method):
    w = np.array([[1.2e-38, -3e-39, 0.0], [1e-30, 2e-31, -5e-31]], dtype=np.float32)
    r = ternarize(w, method)
    assert np.all(r.scale >= np.finfo(np.float32).tiny) and np.all(np.isfinite(r.dequantize()))
    assert r.codes[0, 0] == 1 and r.codes[1, 0] == 1
    r.qparams()


def test_error_helpers():
    w = np.array([[0.0, 0.3, -1.0], [0.5, 0.5, 0.5]], dtype=np.float32)
    r = ternary_rtn(w)
    e = np.array([[0.0, 0.3, 0.0], [0.0, 0.0, 0.0]])
    assert max_error(w, r) == pytest.approx(0.3)
    assert mean_abs_error(w, r) == pytest.approx(0.05)
    assert mse(w, r) == pytest.approx(0.09 / 6)
    np.testing.assert_allclose(mean_abs_error(w, r, per_group=True), np.abs(e).mean(axis=1), rtol=1e-6)
    assert np.asarray(max_error(w, ternary_rtn(w, None), per_group=True)).shape == ()
    with pytest.raises(UserError, match="shape"):
        max_error(w[:1], r)


def test_user_errors():
    w = np.ones((2, 3), dtype=np.float32)
    with pytest.raises(UserError, match="rtn, twn, tquant, mquant-a, mquant-b"):
        ternarize(w, "ternary")
    with pytest.raises(UserError, match="variant"):
        ternary_mquant(w, 0, "c")
    with pytest.raises(UserError, match="axis 2"):
        ternarize(w, "rtn", axis=2)
    with pytest.raises(UserError, match="NaN"):
        ternarize(np.array([1.0, np.nan]), "twn")
    with pytest.raises(UserError, match="empty"):
        ternarize(np.zeros((0, 3)), "tquant")
    with pytest.raises(UserError, match="real-valued"):
        ternarize(np.ones(3, dtype=np.complex64), "rtn")
    with pytest.raises(UserError, match="float32 range"):
        ternarize(np.array([1e300, 1.0]), "rtn", axis=None)
    assert isinstance(ternarize(w, "rtn"), TernaryResult)
