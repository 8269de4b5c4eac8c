"""Observers: turn streamed data into :class:`~onnxq.core.spec.QParams` for a :class:`~onnxq.core.spec.QuantSpec`.

An observer is fed with :meth:`Observer.update` (any number of batches, shapes may vary for
per-tensor observers) and asked once for :meth:`Observer.qparams`. Per-tensor observers keep a
bounded state (running min/max and a fixed-size :class:`~onnxq.core.histogram.StreamingHistogram`), so
calibration memory does not depend on the number of batches.

``spec.axis`` set means per-channel along that axis; this is meant for weights, which are seen in
one call. Min/max is streamed per channel; the percentile, MSE and entropy observers evaluate the
weights exactly and so keep the observed tensor (memory = the weight size).

Methods (each class documents its math; ranges go through :func:`~onnxq.core.spec.qparams_from_range`,
which widens them to contain 0 and applies the power-of-two rounding): ``minmax``, ``percentile``,
``mse`` (BRECQ's L_p range search; power-of-two scale search for POW2 specs) and ``entropy``
(TensorRT's KL threshold, exact zeros left out). :func:`make_observer` builds one by name.
"""

from __future__ import annotations

import inspect
import logging
from abc import ABC, abstractmethod
from dataclasses import replace

import numpy as np

from onnxq.core.histogram import StreamingHistogram, kl_clip_bins, lp_errors
from onnxq.core.spec import Granularity, QParams, QuantSpec, ScaleKind, qparams_from_range
from onnxq.errors import UserError

logger = logging.getLogger(__name__)

_MSE_STEPS = 80  # candidate i = 0..79, range factor 1 - 0.01 i
_POW2_STEPS = 7  # k_max - 6 .. k_max
_EXACT_BLOCK = 1 << 18  # tensor elements per block in exact mode (fits in L2 cache)


class Observer(ABC):
    """Base class: input checks, running min/max, per-channel reshaping.

    Args:
        spec: target grid. ``spec.axis`` set selects per-channel statistics along that axis.

    Raises:
        ValueError: a CHANNEL spec whose axis is not resolved yet.
    """

    def __init__(self, spec: QuantSpec) -> None:
        if spec.granularity is Granularity.CHANNEL and spec.axis is None:
            raise ValueError(f"per-channel spec without an axis ({spec.describe()}): call spec.with_axis()")
        self.spec = spec
        self._num_updates = 0
        self._min: np.ndarray | None = None  # scalar, or (C,) per channel
        self._max: np.ndarray | None = None

    @property
    def per_channel(self) -> bool:
        return self.spec.axis is not None

    @property
    def num_updates(self) -> int:
        """Number of non-empty batches seen (empty arrays are skipped and not counted)."""
        return self._num_updates

    def update(self, x: np.ndarray) -> None:
        """Observe one batch. Integer inputs are cast to float; NaN or infinity raise ValueError."""
        a = np.asarray(x)
        if a.size == 0:
            return
        if a.dtype not in (np.float32, np.float64):
            a = a.astype(np.float64)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"observer input has NaN or infinite values (shape {a.shape})")
        if self.per_channel:
            a = self._channels(a)
            mn, mx = a.min(axis=1).astype(np.float64), a.max(axis=1).astype(np.float64)
        else:
            a = a.ravel()
            mn, mx = np.float64(a.min()), np.float64(a.max())
        self._min = mn if self._min is None else np.minimum(self._min, mn)
        self._max = mx if self._max is None else np.maximum(self._max, mx)
        self._observe(a)
        self._num_updates += 1

    def _channels(self, a: np.ndarray) -> np.ndarray:
        axis = self.spec.axis
        assert axis is not None
        if not -a.ndim <= axis < a.ndim:
            raise ValueError(f"channel axis {axis} out of range for a tensor of shape {a.shape}")
        c = a.shape[axis]
        if self._min is not None and np.shape(self._min) != (c,):
            raise ValueError(f"channel count changed from {np.shape(self._min)[0]} to {c} between updates")
        return np.moveaxis(a, axis, 0).reshape(c, -1)

    def qparams(self) -> QParams:
        """Scale and zero-point for the data seen (scalar, or ``(C,)`` per channel)."""
        if self._num_updates == 0:
            raise RuntimeError("observer saw no data")
        qp = self._compute()
        logger.debug("%s %s -> scale %s zp %s", type(self).__name__, self.spec.describe(),
                      np.ravel(qp.scale)[:4], np.ravel(qp.zero_point)[:4])
        return qp

    def _minmax_qparams(self) -> QParams:
        assert self._min is not None and self._max is not None
        return qparams_from_range(self._min, self._max, self.spec)

    @abstractmethod
    def _observe(self, a: np.ndarray) -> None:
        """Accumulate a finite float batch: flat ``(N,)`` per tensor, ``(C, K)`` per channel."""

    @abstractmethod
    def _compute(self) -> QParams: ...


class _KeepsChannels(Observer):
    """Observers that evaluate weights exactly keep a float32 copy of them (``(C, K)`` chunks)."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__(spec)
        self._chunks: list[np.ndarray] = []

    def _keep(self, a: np.ndarray) -> None:
        self._chunks.append(np.array(a if a.ndim == 2 else a.reshape(1, -1), dtype=np.float32))

    def _kept(self) -> np.ndarray:
        return np.concatenate(self._chunks, axis=1) if len(self._chunks) > 1 else self._chunks[0]


class MinMaxObserver(Observer):
    """Range = running ``[min, max]`` (per tensor, or per channel, vectorized)."""

    def _observe(self, a: np.ndarray) -> None:
        pass

    def _compute(self) -> QParams:
        return self._minmax_qparams()


class PercentileObserver(_KeepsChannels):
    """Clip at a percentile: of ``|x|`` for symmetric specs, ``100 - p`` / ``p`` of ``x`` otherwise.

    Per tensor the percentile is read from a streaming histogram (linear inside a bin, so its
    resolution is one bin = range / ``bins``); per channel it is exact (``np.percentile``).

    Args:
        spec: target grid.
        percentile: in (0, 100]; 100 gives minmax.
        bins: histogram bins (per tensor).
    """

    def __init__(self, spec: QuantSpec, percentile: float = 99.999, bins: int = 2048) -> None:
        super().__init__(spec)
        if not 0.0 < percentile <= 100.0:
            raise UserError(f"percentile must be in (0, 100], got {percentile}: use e.g. 99.99")
        self.percentile = float(percentile)
        self._hist = StreamingHistogram(bins, include_zero=spec.symmetric)

    def _observe(self, a: np.ndarray) -> None:
        if self.per_channel:
            self._keep(a)
        else:
            self._hist.update(np.abs(a) if self.spec.symmetric else a)

    def _compute(self) -> QParams:
        p = self.percentile
        if self.per_channel:
            a = self._kept()
            if self.spec.symmetric:
                amax = np.percentile(np.abs(a), p, axis=1)
                return qparams_from_range(-amax, amax, self.spec)
            lo, hi = np.percentile(a, [100.0 - p, p], axis=1)
            return qparams_from_range(lo, hi, self.spec)
        if self.spec.symmetric:
            amax = self._hist.quantile(p / 100.0)
            return qparams_from_range(-amax, amax, self.spec)
        lo, hi = self._hist.quantile(1.0 - p / 100.0), self._hist.quantile(p / 100.0)
        return qparams_from_range(lo, hi, self.spec)


class MSEObserver(_KeepsChannels):
    """``L_p`` range search: minimise the mean ``|x - fake_quant(x)|^p`` over candidate ranges.

    Candidates (``lo``/``hi`` widened to contain 0):

    * float scales: ``[lo (1 - 0.01 i), hi (1 - 0.01 i)]`` for ``i = 0..79`` (BRECQ's search);
    * power-of-two scales: ``s_k = 2^k`` for ``k = k_max .. k_max - 6`` where ``2^k_max`` is the minmax
      scale rounded up (no overflow); candidate ``k`` is the range ``[lo, hi] * 2^k / s_float`` so the
      zero-point stays that of minmax and both sides are clipped proportionally (AMD Quark's
      PowerOfTwoMethod.MinMSE idea). Ties go to the widest candidate (``i = 0`` / ``k_max`` = minmax).

    The error is integrated on the streaming histogram (per tensor, see :func:`~onnxq.core.histogram.lp_errors`)
    or computed exactly on the tensor (per channel, or ``exact=True``), vectorized over channels and
    candidates with the same float32 arithmetic as :func:`~onnxq.core.spec.fake_quantize`.

    Args:
        spec: target grid.
        p: error exponent (2 = MSE; 2.4 = LAPQ/BRECQ).
        bins: histogram bins (histogram mode).
        exact: keep the data and evaluate exactly; default: per-channel only.
    """

    def __init__(self, spec: QuantSpec, p: float = 2.0, bins: int = 2048, exact: bool | None = None) -> None:
        super().__init__(spec)
        if not p > 0:
            raise UserError(f"the L_p exponent must be positive, got p={p}: use 2.0 or 2.4")
        self.p = float(p)
        self.exact = self.per_channel if exact is None else bool(exact)
        self._hist = None if self.exact else StreamingHistogram(bins)

    def _observe(self, a: np.ndarray) -> None:
        if self._hist is not None:
            self._hist.update(a)
        else:
            self._keep(a)

    def _candidates(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate ranges ``(n, *lo.shape)``, widest first."""
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        factor: np.ndarray
        if self.spec.pow2:
            s_float = qparams_from_range(lo, hi, replace(self.spec, scale_kind=ScaleKind.FLOAT)).scale
            k_max = np.log2(qparams_from_range(lo, hi, self.spec).scale.astype(np.float64))
            k = k_max[None] - np.arange(_POW2_STEPS).reshape((-1,) + (1,) * np.ndim(lo))
            factor = np.exp2(k) / s_float.astype(np.float64)
        else:
            factor = (1.0 - 0.01 * np.arange(_MSE_STEPS)).reshape((-1,) + (1,) * np.ndim(lo))
        return lo * factor, hi * factor

    def _qparams(self, lo: np.ndarray, hi: np.ndarray) -> QParams:
        # "round" maps the pow2 candidates (2^k up to float error) exactly onto 2^k.
        return qparams_from_range(lo, hi, self.spec, pow2_mode="round")

    def _compute(self) -> QParams:
        assert self._min is not None and self._max is not None
        if np.all(self._min == self._max):
            return self._minmax_qparams()  # constant data: minmax is exact
        lo_c, hi_c = self._candidates(self._min, self._max)
        cand = self._qparams(lo_c, hi_c)
        if self._hist is not None:
            err = lp_errors(self._hist.edges, self._hist.counts, cand.scale, cand.zero_point,
                            self.spec.qmin, self.spec.qmax, self.p)
            best = int(np.argmin(err))
            return self._qparams(lo_c[best], hi_c[best])
        spec = self.spec
        err = _exact_lp_errors(self._kept(), cand.scale, cand.zero_point, spec.qmin, spec.qmax, self.p)
        best = np.argmin(err, axis=0)  # (C,), first = widest on ties
        cols = np.arange(err.shape[1])
        n = lo_c.shape[0]
        lo, hi = lo_c.reshape(n, -1)[best, cols], hi_c.reshape(n, -1)[best, cols]
        if not self.per_channel:
            lo, hi = lo[0], hi[0]
        return self._qparams(lo, hi)


def _exact_lp_errors(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int, p: float
) -> np.ndarray:
    """Mean ``|x - fq(x)|^p`` per candidate and channel: x ``(C, K)``, scale/zp ``(n, C)`` -> ``(n, C)``.

    ``fq(x) = (clip(rint(x / s) + z, qmin, qmax) - z) * s`` in float32, as ONNX QuantizeLinear. Channels
    are processed in cache-sized blocks, candidates one at a time into a reused buffer.
    """
    c, k = x.shape
    n = scale.shape[0]
    s = scale.reshape(n, c, 1).astype(np.float32)
    z = zero_point.reshape(n, c, 1).astype(np.float32)
    has_zp = bool(np.any(z))
    out = np.empty((n, c), dtype=np.float64)
    rows = max(1, _EXACT_BLOCK // k)
    buf = np.empty((min(c, rows), k), dtype=np.float32)
    for j in range(0, c, rows):
        xj = x[j : j + rows]
        b = buf[: xj.shape[0]]
        for i in range(n):
            sij, zij = s[i, j : j + rows], z[i, j : j + rows]
            np.divide(xj, sij, out=b)
            np.rint(b, out=b)
            if has_zp:
                b += zij
            np.clip(b, qmin, qmax, out=b)
            if has_zp:
                b -= zij
            b *= sij
            b -= xj
            if p == 2.0:
                out[i, j : j + rows] = np.einsum("ck,ck->c", b, b)
            else:
                np.abs(b, out=b)
                np.power(b, np.float32(p), out=b)
                out[i, j : j + rows] = b.sum(axis=1, dtype=np.float64)
    return out / k


class EntropyObserver(_KeepsChannels):
    """KL-divergence (TensorRT-style) clipping threshold ``T``, searched on a histogram split at 0.

    Histogram: exact zeros are left out; ``x > 0`` and ``-x`` for ``x < 0`` go to two streaming
    histograms (``2 * bins`` bins each, pinned at 0) that are re-binned at the end onto ``B = bins``
    bins of width ``w = max|x| / B``: a signed histogram of ``2B`` bins with 0 on a bin edge (per
    channel: the same, exact). Zeros are left out because 0 is on every candidate grid (integer
    zero-point), so they have no quantization error; kept, their spike (ReLU outputs are often 30-90%
    zeros) is smeared by ``Q`` over a whole level, a cost growing with ``T``, and the search shrinks
    ReLU6 ranges far under 6 (docs/defaults.md).

    Search (:func:`~onnxq.core.histogram.kl_clip_bins`): candidates ``T = i w`` keep the slice of the
    signed histogram that the grid covers; the reference ``P`` is that slice with the clipped tails
    added to its end bins, the candidate ``Q`` the slice without them merged into ``L`` equal groups
    of bins, each spread evenly over its non-empty bins, smoothed by ``eps = 1e-4`` on the support of
    ``P``; ``T`` = argmin ``KL(P || Q)`` (widest on ties), from the first slice of ``L`` bins to ``max|x|``:

    * symmetric specs: range and slice ``[-T, T]``, ``L = 2 (qmax - z + 1)`` (256 for int8: 128
      levels a side as TensorRT's ``|x|`` histogram; one-signed data get 128 levels on ``[0, T]``);
    * asymmetric specs (uint8 activations): range and slice ``[max(lo, -T), min(hi, T)]``,
      ``L = 2^bits`` over it. One-signed data (ReLU: ``lo = 0``) get all 256 codes on ``[0, T]``;
      two-signed data share one threshold, so a short tail is kept while a long one is clipped (a 2-D
      ``(lo, hi)`` search would cost ``B^2`` divergences); symmetric data get 128 levels a side.

    No clipping when no slice reaches ``L`` bins (e.g. 16-bit grids). Limitation of the criterion:
    other point masses (e.g. constant channels at a non-zero value) are still smeared by ``Q``, which
    biases ``T`` down. Per channel: a Python loop over channels (prefer ``mse`` for weights).

    Args:
        spec: target grid.
        bins: histogram bins per side over ``[0, max|x|]`` (2048 as TensorRT).
    """

    def __init__(self, spec: QuantSpec, bins: int = 2048) -> None:
        super().__init__(spec)
        if bins < 2:
            raise UserError(f"the entropy histogram needs at least 2 bins, got bins={bins}: use e.g. 2048")
        self.bins = bins
        # 2x bins: growth keeps the data in at least half the range, so the final re-binning onto
        # ``bins`` bins over [0, max|x|] has the resolution of a one-shot histogram.
        self._pos = StreamingHistogram(2 * bins, include_zero=True)
        self._neg = StreamingHistogram(2 * bins, include_zero=True)

    def _observe(self, a: np.ndarray) -> None:
        if self.per_channel:
            self._keep(a)
        else:
            self._pos.update(a[a > 0])
            self._neg.update(-a[a < 0])

    def _levels(self) -> int:
        spec = self.spec
        if spec.symmetric:
            center = 0 if spec.signed else (spec.qmax + spec.qmin + 1) // 2
            return 2 * (spec.qmax - center + 1)
        return spec.qmax - spec.qmin + 1

    def _range(self, t: np.ndarray | float, lo: np.ndarray, hi: np.ndarray) -> QParams:
        if self.spec.symmetric:
            return qparams_from_range(-t, t, self.spec)
        return qparams_from_range(np.maximum(lo, -t), np.minimum(hi, t), self.spec)

    def _compute(self) -> QParams:
        assert self._min is not None and self._max is not None
        lo, hi, levels, sym, big = self._min, self._max, self._levels(), self.spec.symmetric, self.bins
        if not self.per_channel:
            amax = max(-float(lo), float(hi))
            if amax == 0.0:
                return self._minmax_qparams()  # all zeros
            neg, pos = self._neg.rebinned(0.0, amax, big), self._pos.rebinned(0.0, amax, big)
            t = min(kl_clip_bins(neg, pos, levels, sym) * amax / big, amax)
            return self._range(np.float64(t), lo, hi)
        a = self._kept().astype(np.float64)
        amax = np.abs(a).max(axis=1)
        c = a.shape[0]
        width = np.where(amax > 0, amax / big, 1.0)
        idx = np.clip(np.floor(np.abs(a) / width[:, None]), 0, big - 1).astype(np.int64)
        idx += (np.arange(c) * 2 * big)[:, None] + np.where(a > 0, big, 0)  # [neg | pos] per channel
        counts = np.bincount(idx[a != 0], minlength=2 * c * big).reshape(c, 2, big)
        per_channel = np.array([min(kl_clip_bins(counts[ch, 0], counts[ch, 1], levels, sym) * width[ch], amax[ch])
                                if amax[ch] > 0 else 0.0 for ch in range(c)])
        return self._range(per_channel, lo, hi)


_OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


def make_observer(method: str, spec: QuantSpec, **options: object) -> Observer:
    """Build the observer called ``method`` ("minmax", "percentile", "mse", "entropy") for ``spec``.

    Raises:
        UserError: unknown method or option.
    """
    cls = _OBSERVERS.get(method)
    if cls is None:
        choices = ", ".join(sorted(_OBSERVERS))
        raise UserError(f"unknown calibration method '{method}': choose one of {choices}")
    allowed = [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "spec")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(
            f"calibration method '{method}' has no option(s) {unknown}: valid options are {allowed or 'none'}"
        )
    return cls(spec, **options)


def weight_qparams(w: np.ndarray, spec: QuantSpec, method: str = "minmax", **options: object) -> QParams:
    """One-shot QParams of a weight tensor (``mse`` is exact on the tensor unless ``exact=False``)."""
    if method == "mse":
        options.setdefault("exact", True)
    obs = make_observer(method, spec, **options)
    obs.update(w)
    return obs.qparams()
