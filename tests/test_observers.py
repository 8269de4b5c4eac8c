"""Tests of onnxq.core.observers and onnxq.core.histogram (numpy only, seeded, fast)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxq.core.histogram import StreamingHistogram, kl_divergences, lp_errors, slice_kl_divergences
from onnxq.core.observers import (
    EntropyObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    _exact_lp_errors,
    make_observer,
    weight_qparams,
)
from onnxq.core.spec import (
    INT4_WEIGHT_PC,
    INT8_ACT,
    INT8_WEIGHT_PC,
    UINT8_ACT,
    Granularity,
    QuantSpec,
    ScaleKind,
    fake_quantize,
    is_power_of_two,
    qparams_from_range,
)
from onnxq.errors import UserError

METHODS = ["minmax", "percentile", "mse", "entropy"]
INT4 = QuantSpec(bits=4)
UINT4_ASYM = QuantSpec(bits=4, signed=False, symmetric=False)
UINT8_SYM = QuantSpec(bits=8, signed=False, symmetric=True)
POW2_SPECS = [replace(INT8_ACT, scale_kind=ScaleKind.POW2), replace(UINT8_ACT, scale_kind=ScaleKind.POW2),
              replace(INT4, scale_kind=ScaleKind.POW2)]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def lp(x: np.ndarray, qp, p: float = 2.0) -> float:
    return float(np.mean(np.abs(x.astype(np.float64) - fake_quantize(x, qp)) ** p))


def observe(method: str, spec: QuantSpec, batches, **options):
    obs = make_observer(method, spec, **options)
    for b in batches:
        obs.update(b)
    return obs.qparams()


def check_valid(qp, spec: QuantSpec) -> None:
    s = np.asarray(qp.scale)
    assert np.all(np.isfinite(s)) and np.all(s > 0)
    assert np.all(qp.zero_point >= spec.qmin) and np.all(qp.zero_point <= spec.qmax)
    if spec.pow2:
        assert np.all(is_power_of_two(s))


# --- minmax ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [INT8_ACT, UINT8_ACT, UINT8_SYM, INT4, UINT4_ASYM])
def test_minmax_is_exact_and_streams(spec: QuantSpec) -> None:
    x = rng().normal(1.0, 3.0, size=(7, 300)).astype(np.float32)
    qp = observe("minmax", spec, [x[i] for i in range(7)])
    ref = qparams_from_range(np.float64(x.min()), np.float64(x.max()), spec)
    assert qp.scale == ref.scale and qp.zero_point == ref.zero_point
    if spec.symmetric and spec.signed:
        assert qp.scale == np.float32(np.abs(x).max() / spec.qmax)


def test_asymmetric_uint8_vs_symmetric_int8_on_relu_data() -> None:
    x = np.maximum(rng().normal(size=5000), 0).astype(np.float32)
    asym = weight_qparams(x, UINT8_ACT)
    sym = weight_qparams(x, INT8_ACT)
    usym = weight_qparams(x, UINT8_SYM)
    assert asym.zero_point == 0 and sym.zero_point == 0 and usym.zero_point == 128
    assert np.isclose(asym.scale, x.max() / 255) and np.isclose(sym.scale, x.max() / 127)
    assert lp(x, asym) < 0.3 * lp(x, sym)  # asymmetric uses the codes below 0 that sym wastes


@settings(max_examples=40, deadline=None)
@given(
    x=hnp.arrays(np.float32, st.integers(1, 200),
                 elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False)),
    spec=st.sampled_from([INT8_ACT, UINT8_ACT, UINT8_SYM, INT4, UINT4_ASYM,
                          replace(INT8_WEIGHT_PC, granularity=Granularity.TENSOR)]),
)
def test_minmax_error_at_most_half_step_inside_range(x: np.ndarray, spec: QuantSpec) -> None:
    qp = weight_qparams(x, spec)
    err = np.abs(x.astype(np.float64) - fake_quantize(x, qp))
    assert np.all(err <= qp.scale / 2 * (1 + 1e-5) + 1e-6 * np.abs(x).max())


# --- percentile ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [INT8_ACT, UINT8_ACT])
def test_percentile_clips_outlier(spec: QuantSpec) -> None:
    x = rng().normal(size=100_000).astype(np.float32)
    x[123] = 1000.0
    qp = observe("percentile", spec, np.array_split(x, 4), percentile=99.99)
    mm = weight_qparams(x, spec)
    assert qp.scale < 0.02 * mm.scale  # range ~4-5 sigma instead of 1000
    amax = qp.scale * (spec.qmax - qp.zero_point)
    assert 2.0 < amax < 12.0


def test_percentile_per_channel_exact() -> None:
    w = rng().laplace(size=(16, 4, 3, 3)).astype(np.float32)
    qp = weight_qparams(w, INT8_WEIGHT_PC.with_axis(0), "percentile", percentile=99.0)
    ref = np.percentile(np.abs(w).reshape(16, -1), 99.0, axis=1) / 127
    np.testing.assert_allclose(qp.scale, ref, rtol=1e-6)


def test_histogram_quantile_matches_numpy() -> None:
    x = rng().normal(size=200_000)
    h = StreamingHistogram(2048)
    h.update(x)
    for q in (0.001, 0.1, 0.5, 0.99, 0.9999):
        assert abs(h.quantile(q) - np.quantile(x, q)) < 2 * h.bin_width
    assert h.quantile(0.0) == x.min() and h.quantile(1.0) == x.max()


# --- mse ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [INT4, UINT4_ASYM])
def test_mse_beats_minmax_on_laplace_4bit(spec: QuantSpec) -> None:
    x = rng().laplace(size=50_000).astype(np.float32)
    mm = weight_qparams(x, spec)
    hist = observe("mse", spec, np.array_split(x, 5))  # histogram mode
    exact = weight_qparams(x, spec, "mse")  # exact mode
    assert lp(x, hist) < 0.5 * lp(x, mm)
    assert lp(x, exact) <= lp(x, hist) * (1 + 1e-6)
    assert hist.scale < mm.scale
    p24 = observe("mse", spec, [x], p=2.4)
    assert lp(x, p24, 2.4) < lp(x, mm, 2.4)


@pytest.mark.parametrize("dist", ["uniform", "normal", "laplace", "relu", "bimodal", "few_values"])
@pytest.mark.parametrize("spec", [INT8_ACT, UINT8_ACT, INT4, UINT4_ASYM, POW2_SPECS[2]])
def test_mse_never_worse_than_minmax(dist: str, spec: QuantSpec) -> None:
    g = rng(3)
    x = {
        "uniform": g.uniform(-1, 3, 20_000),
        "normal": g.normal(size=20_000),
        "laplace": g.laplace(size=20_000),
        "relu": np.maximum(g.normal(size=20_000), 0),
        "bimodal": np.concatenate([g.normal(-4, 0.3, 10_000), g.normal(5, 0.3, 10_000)]),
        "few_values": g.choice([-1.0, 0.0, 0.5, 2.0], 20_000),
    }[dist].astype(np.float32)
    mm = lp(x, weight_qparams(x, spec))
    assert lp(x, weight_qparams(x, spec, "mse")) <= mm * (1 + 1e-5) + 1e-12  # exact: argmin includes minmax
    assert lp(x, observe("mse", spec, [x])) <= mm * 1.02 + 1e-12  # histogram estimate


def test_lp_errors_integrates_exactly_within_bins() -> None:
    # Bins far wider than the grid step (16-bit-like) and far narrower: dense uniform samples per bin.
    g = rng(5)
    edges = np.linspace(-3.0, 5.0, 33)
    counts = g.integers(0, 50, 32).astype(np.float64)
    fine = np.concatenate([np.linspace(a, b, 4001)[:-1] + (b - a) / 8000
                           for a, b in zip(edges[:-1], edges[1:])])
    weights = np.repeat(counts, 4000)
    spec = UINT8_ACT
    for lo, hi in [(-3.0, 5.0), (-1.0, 2.0), (-0.02, 0.03)]:
        for p in (2.0, 2.4):
            qp = qparams_from_range(np.float64(lo), np.float64(hi), spec)
            got = lp_errors(edges, counts, qp.scale[None], qp.zero_point[None], spec.qmin, spec.qmax, p)[0]
            err = np.abs(fine - fake_quantize(fine, qp).astype(np.float64)) ** p
            ref = np.sum(err * weights) / weights.sum()
            assert got == pytest.approx(ref, rel=2e-3)


def test_exact_errors_match_fake_quantize() -> None:
    x = rng().normal(size=(5, 40)).astype(np.float32)
    spec = QuantSpec(bits=4, signed=False, symmetric=False)
    lo, hi = x.min(axis=1), x.max(axis=1)
    f = np.array([1.0, 0.7, 0.3])[:, None]
    cand = qparams_from_range(lo * f, hi * f, spec)
    got = _exact_lp_errors(x, cand.scale, cand.zero_point, spec.qmin, spec.qmax, 2.4)
    for i in range(3):
        for c in range(5):
            qp = qparams_from_range(lo[c] * f[i, 0], hi[c] * f[i, 0], spec)
            assert got[i, c] == pytest.approx(lp(x[c], qp, 2.4), rel=1e-5)


# --- power of two -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("spec", POW2_SPECS)
def test_pow2_scales_are_powers_of_two(method: str, spec: QuantSpec) -> None:
    x = rng().laplace(size=(4, 2000)).astype(np.float32) * 0.37
    check_valid(observe(method, spec, list(x)), spec)
    pc = replace(spec, granularity=Granularity.CHANNEL).with_axis(0)
    check_valid(weight_qparams(x, pc, method), pc)


@pytest.mark.parametrize("spec", POW2_SPECS)
def test_mse_pow2_no_worse_than_ceil(spec: QuantSpec) -> None:
    x = rng(1).laplace(size=(8, 3000)).astype(np.float32)
    ceil = weight_qparams(x.ravel(), spec)  # minmax: 2**ceil(log2 s), no overflow
    assert lp(x.ravel(), weight_qparams(x.ravel(), spec, "mse")) <= lp(x.ravel(), ceil) * (1 + 1e-6)
    assert lp(x.ravel(), observe("mse", spec, list(x))) <= lp(x.ravel(), ceil) * 1.02
    k = np.log2(weight_qparams(x.ravel(), spec, "mse").scale)
    assert np.log2(ceil.scale) - 6 <= k <= np.log2(ceil.scale)
    if spec.bits == 4:
        assert weight_qparams(x.ravel(), spec, "mse").scale < ceil.scale  # heavy tails: clipping pays off


# --- entropy ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [INT8_ACT, UINT8_ACT])
def test_entropy_threshold_below_max_with_outliers(spec: QuantSpec) -> None:
    g = rng(2)
    x = np.concatenate([g.normal(size=100_000), g.normal(size=20) * 30]).astype(np.float32)
    if not spec.symmetric:
        x = np.maximum(x, 0)
    qp = observe("entropy", spec, np.array_split(x, 8))
    t = qp.scale * (spec.qmax - qp.zero_point)
    assert 1.5 < t < 0.5 * np.abs(x).max()


def _naive_kl(h: np.ndarray, a: int, b: int, levels: int, eps: float) -> float:
    """KL(P || Q) of the slice [a, b) of h, written as the docstring of slice_kl_divergences says."""
    p = h[a:b].copy()
    p[0] += h[:a].sum()
    p[-1] += h[b:].sum()
    n, q = b - a, np.zeros(b - a)
    for grp in range(levels):
        lo, hi = grp * n // levels, (grp + 1) * n // levels
        supp = p[lo:hi] > 0
        if supp.any():
            q[lo:hi][supp] = h[a:b][lo:hi].sum() / supp.sum()
    p /= p.sum()
    q = (1 - eps) * q / q.sum() + eps * (p > 0) / (p > 0).sum()
    m = p > 0
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


def test_kl_vectorized_matches_naive_loop() -> None:
    g = rng(4)
    h = g.poisson(200 * np.exp(-np.linspace(0, 6, 96)))
    h[[10, 40]] = 0
    h = np.concatenate([h, [0, 0, 3, 0, 1, 0]]).astype(np.float64)
    levels, eps = 8, 1e-4
    i, kl = kl_divergences(h, levels, eps)
    assert list(i) == list(range(levels, int(np.flatnonzero(h)[-1]) + 2))
    for t, got in zip(i, kl):
        assert got == pytest.approx(_naive_kl(h, 0, t, levels, eps), rel=1e-9, abs=1e-12)
    # Two-sided slices, both tails folded; empty end bins that only the outliers fill.
    h = g.poisson(300 * np.exp(-np.abs(np.linspace(-5, 3, 120)))).astype(np.float64)
    h[[5, 50, 51, 119]] = 0
    start, stop = np.array([0, 5, 10, 30, 60, 0, 51]), np.array([120, 119, 60, 37, 90, 7, 113])
    for a, b, got in zip(start, stop, slice_kl_divergences(h, start, stop, 7, eps)):
        assert got == pytest.approx(_naive_kl(h, a, b, 7, eps), rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError):
        slice_kl_divergences(h, [0], [6], 7)


def _relu6_like(g: np.random.Generator, n: int = 200_000) -> np.ndarray:
    """Dense mass near 0 and a long tail up to 6 (no saturation spike): the positive part of ReLU6 outputs."""
    x = np.concatenate([g.exponential(0.4, size=n), g.exponential(1.0, size=n // 20)]).astype(np.float32)
    return x[x <= 6.0]


@pytest.mark.parametrize("zero_fraction", [0.0, 0.6, 0.9])
def test_entropy_relu6_zeros_do_not_shrink_the_range(zero_fraction: float) -> None:
    # Regression: exact zeros (60-90% of ReLU outputs) were histogrammed; Q smeared their spike over a
    # whole level, a cost growing with T, so the KL search shrank [0, 6] ranges to ~[0, 1.5].
    g = rng(13)
    pos = _relu6_like(g)
    x = g.permutation(np.concatenate([pos, np.zeros(int(pos.size * zero_fraction / (1 - zero_fraction)))]))
    amax, bins = float(pos.max()), 2048
    # Reference: the KL minimum (256 levels on [0, T]) of the zero-free data, one-shot histogram.
    counts = np.histogram(pos, bins, (0.0, amax))[0]
    i, kl = kl_divergences(counts, 256)
    t_ref = i[np.argmin(kl)] * amax / bins
    assert t_ref > 0.95 * amax  # the KL minimum on this data clips only its last few samples
    with_zeros = counts.astype(np.float64)
    with_zeros[0] += x.size - pos.size
    i0, kl0 = kl_divergences(with_zeros, 256)
    if zero_fraction > 0:  # what the old observer did: the zero spike drags T down to a few levels' width
        assert i0[np.argmin(kl0)] * amax / bins < 0.35 * amax
    per_channel = replace(UINT8_ACT, granularity=Granularity.CHANNEL).with_axis(0)
    streamed = observe("entropy", UINT8_ACT, np.array_split(x, 8))
    for qp in (streamed, weight_qparams(np.stack([x, x[::-1]]), per_channel, "entropy")):
        t = np.ravel(qp.scale * (UINT8_ACT.qmax - qp.zero_point))
        assert np.all(qp.zero_point == 0)
        assert np.all(t >= 0.9 * amax) and np.all(np.abs(t - t_ref) <= 0.04 * amax), (t, t_ref)
    assert lp(x, streamed) <= 1.25 * lp(x, qparams_from_range(0.0, amax, UINT8_ACT))


def test_entropy_two_signed_asymmetric() -> None:
    g = rng(14)
    # Skewed: short negative tail, long positive tail with rare outliers near 40.
    x = np.concatenate([-g.exponential(0.2, 20_000), g.exponential(1.0, 80_000), 40 + g.normal(size=10)])
    qp = observe("entropy", UINT8_ACT, np.array_split(g.permutation(x).astype(np.float32), 8))
    s, z = float(qp.scale), float(qp.zero_point)
    lo, hi = -z * s, (255 - z) * s
    assert abs(lo - x.min()) <= s  # the short tail is within T: not clipped
    assert np.quantile(x, 0.999) < hi < 0.5 * x.max()  # the outliers are clipped
    assert int(np.sum(x > hi)) < 100
    # Symmetric data: one threshold for both tails, 128 levels a side, as the symmetric int8 grid.
    y = np.concatenate([g.laplace(size=100_000), 30 * g.standard_t(1.5, 20)]).astype(np.float32)
    asym, sym = (observe("entropy", spec, np.array_split(y, 8)) for spec in (UINT8_ACT, INT8_ACT))
    s, z = float(asym.scale), float(asym.zero_point)
    assert abs(z - 128) <= 2 and 5 < (255 - z) * s < 0.2 * np.abs(y).max()
    assert float(asym.scale) * 255 == pytest.approx(float(sym.scale) * 254, rel=0.03)


# --- streaming histogram ------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("spec", [INT8_ACT, UINT8_ACT])
def test_one_batch_vs_ten_batches(method: str, spec: QuantSpec) -> None:
    g = rng(6)
    x = np.concatenate([g.normal(size=30_000), 15 * g.standard_t(2, size=30)]).astype(np.float32)
    one = observe(method, spec, [x]).scale
    assert observe(method, spec, np.array_split(g.permutation(x), 10)).scale == pytest.approx(one, rel=0.03)
    # Adversarial order (each batch grows the range): still close.
    grown = observe(method, spec, np.array_split(np.sort(np.abs(x)), 10)).scale
    assert grown == pytest.approx(observe(method, spec, [np.abs(x)]).scale, rel=0.1)


def test_histogram_growth_rebins_exactly_and_memory_is_bounded() -> None:
    g = rng(7)
    h = StreamingHistogram(256)
    seen = []
    for i in range(200):  # ranges grow on both sides, with constant-size state
        b = g.normal(size=300) * (1 + i) + (i % 7 - 3) * i
        h.update(b)
        seen.append(b)
        assert h.counts.shape == (256,)
    x = np.concatenate(seen)
    assert h.total == x.size and h.counts.sum() == x.size
    assert h.min == x.min() and h.max == x.max()
    edges = h.edges
    assert edges[0] <= x.min() and edges[-1] >= x.max()
    assert (x.max() - x.min()) / 256 <= h.bin_width < 4 * (x.max() - x.min()) / 256  # resolution kept
    ref, _ = np.histogram(x, edges)
    assert np.abs(ref - h.counts).sum() <= 4  # only float ties at bin edges may move


def _state_bytes(obs) -> int:
    parts = list(vars(obs).values())
    parts += [v for o in vars(obs).values() if isinstance(o, StreamingHistogram) for v in vars(o).values()]
    arrays = [a for p in parts for a in (p if isinstance(p, list) else [p]) if isinstance(a, np.ndarray)]
    return sum(a.nbytes for a in arrays)


@pytest.mark.parametrize("method", METHODS)
def test_per_tensor_state_does_not_grow_with_batches(method: str) -> None:
    g = rng(11)
    obs = make_observer(method, UINT8_ACT)
    sizes = []
    for i in range(40):
        obs.update(g.normal(size=(2, 500)) * (1 + i / 10))  # growing range: histogram re-bins
        sizes.append(_state_bytes(obs))
    assert sizes[5] == sizes[-1] and sizes[-1] < 100_000
    assert obs.num_updates == 40


def test_histogram_constant_then_spread() -> None:
    h = StreamingHistogram(16)
    h.update(np.zeros(10))
    assert h.degenerate and h.quantile(0.5) == 0.0
    h.update(np.array([1.0, 2.0]))
    assert not h.degenerate and h.counts.sum() == 12 and h.counts[0] == 10


# --- per channel ---------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("spec", [INT8_WEIGHT_PC, INT4_WEIGHT_PC, QuantSpec(
    bits=4, signed=False, symmetric=False, granularity=Granularity.CHANNEL),
    replace(INT4_WEIGHT_PC, scale_kind=ScaleKind.POW2)])
def test_per_channel_vectorized_matches_loop(axis: int, spec: QuantSpec) -> None:
    w = rng(8).laplace(size=(6, 5, 3, 3)).astype(np.float32) * np.linspace(0.1, 3, 5).reshape(1, 5, 1, 1)
    w[:, 2 if axis == 1 else 0] = 0.0  # one constant (all-zero) channel or slice
    spec = spec.with_axis(axis)
    channels = np.moveaxis(w, axis, 0)
    per_tensor = replace(spec, granularity=Granularity.TENSOR).with_axis(None)
    for method in ("minmax", "mse"):
        qp = weight_qparams(w, spec, method)
        assert qp.scale.shape == (w.shape[axis],) and qp.zero_point.shape == (w.shape[axis],)
        check_valid(qp, spec)
        for c, wc in enumerate(channels):
            ref = weight_qparams(wc, per_tensor, method)
            assert qp.scale[c] == ref.scale and qp.zero_point[c] == ref.zero_point
    for method in ("percentile", "entropy"):
        qp = weight_qparams(w, spec, method)
        assert qp.scale.shape == (w.shape[axis],)
        check_valid(qp, spec)


def test_per_channel_mse_beats_minmax_per_channel() -> None:
    w = rng(9).laplace(size=(32, 64)).astype(np.float32)
    spec = INT4_WEIGHT_PC.with_axis(0)
    mm, mse = weight_qparams(w, spec), weight_qparams(w, spec, "mse", p=2.4)
    err = lambda qp: np.mean((w - fake_quantize(w, qp)) ** 2, axis=1)  # noqa: E731
    assert np.all(err(mse) <= err(mm) * 1.05) and err(mse).mean() < 0.9 * err(mm).mean()


# --- edge cases and API ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("spec", [INT8_ACT, UINT8_ACT, UINT8_SYM, POW2_SPECS[0]])
def test_edge_cases(method: str, spec: QuantSpec) -> None:
    zeros = observe(method, spec, [np.zeros((2, 3), np.float32), np.zeros(5, np.float32)])
    check_valid(zeros, spec)
    assert np.all(fake_quantize(np.zeros(4, np.float32), zeros) == 0)
    relu = observe(method, spec, [np.abs(rng().normal(size=(3, 100))), np.arange(7.0)])  # dynamic shapes
    check_valid(relu, spec)
    if not spec.symmetric:
        assert relu.zero_point == 0
    ints = observe(method, spec, [np.arange(-50, 100, dtype=np.int32)])
    check_valid(ints, spec)
    obs = make_observer(method, spec)
    obs.update(np.zeros((0, 3)))
    assert obs.num_updates == 0
    with pytest.raises(RuntimeError, match="observer saw no data"):
        obs.qparams()
    with pytest.raises(ValueError):
        obs.update(np.array([1.0, np.nan]))
    obs.update(np.array([1.0, -2.0]))
    obs.update(np.array([3.0]))
    assert obs.num_updates == 2
    check_valid(obs.qparams(), spec)


def test_make_observer_api() -> None:
    assert isinstance(make_observer("minmax", INT8_ACT), MinMaxObserver)
    assert isinstance(make_observer("percentile", INT8_ACT, percentile=99.9), PercentileObserver)
    assert isinstance(make_observer("mse", INT8_ACT, p=2.4), MSEObserver)
    assert isinstance(make_observer("entropy", INT8_ACT), EntropyObserver)
    with pytest.raises(UserError, match="entropy.*minmax.*mse.*percentile"):
        make_observer("kl", INT8_ACT)
    with pytest.raises(UserError, match="percentile"):
        make_observer("mse", INT8_ACT, percentile=99.0)
    with pytest.raises(UserError):
        make_observer("percentile", INT8_ACT, percentile=0.0)
    with pytest.raises(ValueError, match="with_axis"):
        make_observer("minmax", INT8_WEIGHT_PC)  # CHANNEL spec without a resolved axis
    obs = make_observer("minmax", INT8_WEIGHT_PC.with_axis(0))
    obs.update(np.ones((4, 2)))
    with pytest.raises(ValueError, match="channel count"):
        obs.update(np.ones((5, 2)))
