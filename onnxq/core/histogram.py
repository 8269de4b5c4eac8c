"""A streaming fixed-size histogram and the range statistics computed on it.

Calibration streams many batches through an observer, so the histogram keeps a constant number of
bins ``B`` whatever the number of batches. Its range starts at the first batch's ``[min, max]`` and
grows when a later batch falls outside it:

* the new bin width is ``w' = 2**k * w`` with the smallest integer ``k >= 1`` that fits the data;
* the new lower edge is ``lo' = lo - j * w`` for an integer ``j``, so every old bin lies inside exactly
  one new bin and the counts are re-binned by plain summation (no interpolation, no smearing);
* the slack ``B * w' - (needed width)`` goes to the side that grew (both sides when both grew).

When the range grows on one side only (e.g. a histogram of ``|x|`` pinned at 0), the data always
fills more than half of the range, so the bins are less than 2x wider than those of a histogram
built in one go; growth on both sides may keep some earlier slack. Exact min/max are tracked apart.

While all values seen so far are equal (a constant tensor, e.g. all zeros) the histogram stays
*degenerate*: it only counts them, and the bins are laid out when a second distinct value arrives.

Statistics (pure functions of the counts):

* :meth:`StreamingHistogram.quantile`: inverse CDF, linear inside a bin.
* :func:`lp_errors`: mean ``|x - fq(x)|**p`` for many candidate grids, integrated exactly per bin
  assuming the mass of a bin is spread uniformly over it.
* :func:`slice_kl_divergences` / :func:`kl_clip_bins`: TensorRT-style entropy (KL) calibration on a
  histogram split at 0, vectorized over all thresholds (:func:`kl_divergences` and
  :func:`entropy_threshold`: the one-sided special case).
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20  # elements binned at a time, to bound temporary memory


class StreamingHistogram:
    """Histogram with a fixed number of bins and a range that grows by power-of-two factors.

    Args:
        bins: number of bins ``B`` (constant for the lifetime of the histogram).
        include_zero: keep 0 inside the range (used for histograms of ``|x|``, whose bins must
            start at 0 so that bin ``i`` ends at threshold ``(i + 1) * w``).
    """

    def __init__(self, bins: int = 2048, include_zero: bool = False) -> None:
        if bins < 2:
            raise ValueError(f"a histogram needs at least 2 bins, got {bins}")
        self._bins = bins
        self._include_zero = include_zero
        self._counts: np.ndarray | None = None  # float64 (exact integers below 2**53)
        self._lo = 0.0
        self._width = 0.0  # bin width w
        self._min = np.inf
        self._max = -np.inf
        self._total = 0.0

    # --- state -------------------------------------------------------------------------------
    @property
    def bins(self) -> int:
        return self._bins

    @property
    def total(self) -> float:
        return self._total

    @property
    def min(self) -> float:
        return float(self._min)

    @property
    def max(self) -> float:
        return float(self._max)

    @property
    def degenerate(self) -> bool:
        """True while every value seen is the same (or nothing was seen): no bins yet."""
        return self._counts is None

    @property
    def bin_width(self) -> float:
        return self._width

    @property
    def counts(self) -> np.ndarray:
        if self._counts is None:
            raise ValueError("degenerate histogram (all values equal) has no bins")
        return self._counts.copy()

    @property
    def edges(self) -> np.ndarray:
        if self._counts is None:
            raise ValueError("degenerate histogram (all values equal) has no bins")
        return self._lo + self._width * np.arange(self._bins + 1, dtype=np.float64)

    # --- updates -----------------------------------------------------------------------------
    def update(self, x: np.ndarray) -> None:
        """Add the finite values of ``x`` (any shape; empty arrays are ignored)."""
        x = np.asarray(x).ravel()
        if x.size == 0:
            return
        bmin, bmax = float(np.min(x)), float(np.max(x))
        if not (np.isfinite(bmin) and np.isfinite(bmax)):
            raise ValueError("histogram input contains NaN or infinity")
        earlier_total, earlier_value = self._total, self._min  # all earlier values equal while degenerate
        self._min, self._max = min(self._min, bmin), max(self._max, bmax)
        self._total += x.size
        if self._counts is None:
            lo, hi = self._min, self._max
            if self._include_zero:
                lo, hi = min(lo, 0.0), max(hi, 0.0)
            if hi <= lo:
                return  # still a single distinct value: only counted in _total
            self._lo, self._width = lo, (hi - lo) / self._bins
            self._counts = np.zeros(self._bins, dtype=np.float64)
            if earlier_total > 0:
                self._counts[self._index(np.array([earlier_value]))[0]] += earlier_total
        else:
            self._grow(bmin, bmax)
        for start in range(0, x.size, _CHUNK):
            idx = self._index(x[start : start + _CHUNK])
            self._counts += np.bincount(idx, minlength=self._bins)

    def _index(self, x: np.ndarray) -> np.ndarray:
        idx = np.floor((x.astype(np.float64) - self._lo) / self._width)
        return np.clip(idx, 0, self._bins - 1).astype(np.int64)

    def _grow(self, bmin: float, bmax: float) -> None:
        """Widen the range by ``2**k`` so that ``[bmin, bmax]`` fits, re-binning exactly."""
        B, w, lo = self._bins, self._width, self._lo
        hi = lo + B * w
        grow_lo, grow_hi = bmin < lo, bmax > hi
        if not (grow_lo or grow_hi):
            return
        # Extents in units of old bins, measured from the old lower edge.
        left = int(np.ceil((lo - bmin) / w)) if grow_lo else 0  # bins needed below lo
        right = int(np.ceil((bmax - lo) / w)) if grow_hi else B  # bins needed above lo
        need = left + right
        k = max(1, int(np.ceil(np.log2(need / B))))
        while B * 2**k < need:
            k += 1
        factor = 2.0**k
        j_min, j_max = left, int(B * factor) - right  # j = old bins added below lo
        if grow_lo and not grow_hi:
            j = j_max
        elif grow_hi and not grow_lo:
            j = j_min
        else:
            j = (j_min + j_max) // 2
        new_idx = np.floor((j + np.arange(B, dtype=np.float64) + 0.5) / factor)
        new_idx = np.clip(new_idx, 0, B - 1).astype(np.int64)
        assert self._counts is not None
        self._counts = np.bincount(new_idx, weights=self._counts, minlength=B)
        self._lo, self._width = lo - j * w, w * factor
        logger.debug("histogram grew x%g to [%g, %g]", factor, self._lo, self._lo + B * self._width)

    # --- statistics --------------------------------------------------------------------------
    def quantile(self, q: float) -> float:
        """Value below which a fraction ``q`` of the mass lies (linear within a bin), in [min, max]."""
        if self._total == 0:
            raise ValueError("empty histogram")
        if self._counts is None:
            return float(self._min)
        q = float(np.clip(q, 0.0, 1.0))
        cum = np.cumsum(self._counts)
        target = q * cum[-1]
        b = int(np.searchsorted(cum, target, side="left"))
        b = min(b, self._bins - 1)
        before = cum[b - 1] if b > 0 else 0.0
        frac = (target - before) / self._counts[b] if self._counts[b] > 0 else 0.0
        value = self._lo + (b + frac) * self._width
        return float(np.clip(value, self._min, self._max))

    def rebinned(self, lo: float, hi: float, bins: int) -> np.ndarray:
        """Counts re-distributed onto ``bins`` equal bins over ``[lo, hi]`` (mass uniform inside a bin).

        The cumulative count is interpolated linearly at the new edges; mass outside ``[lo, hi]``
        is added to the first / last new bin. An empty histogram gives zeros; a degenerate one (all
        values equal) puts its whole count in the new bin holding that value.
        """
        if self._counts is None:
            out = np.zeros(bins)
            if self._total > 0:
                k = np.floor((self._min - lo) / (hi - lo) * bins) if hi > lo else 0
                out[int(np.clip(k, 0, bins - 1))] = self._total
            return out
        cum = np.concatenate([[0.0], np.cumsum(self._counts)])
        new_edges = np.linspace(lo, hi, bins + 1)
        new_cum = np.interp(new_edges, self.edges, cum)
        new_cum[0], new_cum[-1] = 0.0, cum[-1]
        return np.diff(new_cum)


def lp_errors(
    edges: np.ndarray, counts: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
    qmin: int, qmax: int, p: float,
) -> np.ndarray:
    """Mean ``|x - fq(x)|**p`` of histogrammed data for each candidate grid.

    The grid of a candidate is ``{(q - z) s : qmin <= q <= qmax}``, all integer multiples of ``s``
    from ``g_lo = (qmin - z) s`` to ``g_hi = (qmax - z) s``. The error ``e(x)`` is periodic inside
    ``[g_lo, g_hi]`` (distance to the nearest multiple of ``s``) and grows as ``|x - g|`` outside.
    With the antiderivative ``F`` of ``e`` (closed form below) the mean error of a bin ``[a, b]``
    holding uniformly spread mass is ``(F(b) - F(a)) / (b - a)``, so narrow and wide bins are both
    handled exactly, even when a bin spans many grid steps.

        G(u) = n C + sgn(r) |r|^(p+1) / (p+1),  u = n s + r, |r| <= s/2,  C = 2 (s/2)^(p+1) / (p+1)
        F(x) = G(x)                                 for g_lo <= x <= g_hi
        F(x) = G(g_hi) + (x - g_hi)^(p+1) / (p+1)   above
        F(x) = G(g_lo) - (g_lo - x)^(p+1) / (p+1)   below

    Args:
        edges: ``(B + 1,)`` bin edges.
        counts: ``(B,)`` bin counts.
        scale, zero_point: ``(n,)`` candidate grids.
        qmin, qmax: integer grid limits.
        p: error exponent.

    Returns:
        ``(n,)`` mean errors.
    """
    s = np.asarray(scale, dtype=np.float64).reshape(-1, 1)
    z = np.asarray(zero_point, dtype=np.float64).reshape(-1, 1)
    g_lo, g_hi = (qmin - z) * s, (qmax - z) * s
    c_period = 2.0 * (s / 2.0) ** (p + 1) / (p + 1)

    def periodic(u: np.ndarray) -> np.ndarray:
        n = np.round(u / s)
        r = u - n * s
        return n * c_period + np.sign(r) * np.abs(r) ** (p + 1) / (p + 1)

    x = np.asarray(edges, dtype=np.float64).reshape(1, -1)
    inside = periodic(np.clip(x, g_lo, g_hi))
    above = np.maximum(x - g_hi, 0.0) ** (p + 1) / (p + 1)
    below = np.maximum(g_lo - x, 0.0) ** (p + 1) / (p + 1)
    antiderivative = inside + above - below
    widths = np.diff(x, axis=1)
    per_bin = np.diff(antiderivative, axis=1) / widths
    total = float(np.sum(counts))
    return per_bin @ np.asarray(counts, dtype=np.float64) / total


def _xlogx(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0)), 0.0)


def _prefix(a: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(a, dtype=np.float64)])


def slice_kl_divergences(
    counts: np.ndarray, start: np.ndarray, stop: np.ndarray, levels: int, eps: float = 1e-4
) -> np.ndarray:
    """KL(P || Q) of clipping a histogram ``h`` to bins ``[start, stop)`` and quantizing them on ``levels``.

    For each candidate slice of ``n = stop - start >= levels`` bins:

    * ``P`` (reference) = ``h[start:stop]`` with the outliers ``sum(h[:start])`` added to its first bin and
      ``sum(h[stop:])`` to its last bin, normalised: the clipped data;
    * ``Q`` (candidate) = ``h[start:stop]`` (outliers *not* added) merged into ``L = levels`` groups of
      consecutive bins (group ``g`` = slice bins ``floor(g n / L) .. floor((g + 1) n / L) - 1``), each
      group's mass spread evenly over its bins where ``P > 0`` (empty bins stay empty), normalised;
    * ``Q`` is smoothed as ``(1 - eps) Q + eps / |supp P|`` on the support of ``P``, so KL stays finite
      where the folded outliers land in a group that ``Q`` leaves empty.

    ``Q`` is constant over the support inside a group, so with prefix sums
    ``KL = sum_b P_b log P_b - sum_g P(g) log Q_g`` costs ``O(L)`` per candidate (vectorized, in chunks).

    Returns:
        ``(len(start),)`` divergences.
    """
    h = np.asarray(counts, dtype=np.float64)
    start = np.asarray(start, dtype=np.int64).ravel()
    stop = np.asarray(stop, dtype=np.int64).ravel()
    n = stop - start
    if levels < 2 or start.size and (n.min() < levels or start.min() < 0 or stop.max() > h.size):
        raise ValueError("each slice needs at least `levels` >= 2 bins inside the histogram")
    total = h.sum()
    if total <= 0:
        raise ValueError("empty histogram")
    cum, cum_nz, cum_xlogx = _prefix(h), _prefix(h > 0), _prefix(_xlogx(h))
    out = np.empty(start.size)
    rows = max(1, (1 << 19) // levels)  # bounds the (candidates, levels) temporaries
    g = np.arange(levels)
    for c in range(0, start.size, rows):
        a, b, m = start[c : c + rows], stop[c : c + rows], n[c : c + rows]
        left, right = cum[a], total - cum[b]
        first, last = h[a] + left, h[b - 1] + right  # folded end bins of P (distinct bins: n >= 2)
        p_log_p = (cum_xlogx[b - 1] - cum_xlogx[a + 1] + _xlogx(first) + _xlogx(last)) / total - np.log(total)
        gs = a[:, None] + (g * m[:, None]) // levels
        ge = a[:, None] + ((g + 1) * m[:, None]) // levels
        group_sum = cum[ge] - cum[gs]
        group_nz = cum_nz[ge] - cum_nz[gs]
        group_nz[:, 0] += (first > 0).astype(np.float64) - (h[a] > 0)
        group_nz[:, -1] += (last > 0).astype(np.float64) - (h[b - 1] > 0)
        support = group_nz.sum(axis=1, keepdims=True)
        q_total = (cum[b] - cum[a])[:, None]
        q = np.where((group_nz > 0) & (q_total > 0),
                     group_sum / np.maximum(group_nz, 1.0) / np.maximum(q_total, 1e-300), 0.0)
        q = np.where(q_total > 0, (1.0 - eps) * q + eps / support, 1.0 / support)
        p_mass = group_sum
        p_mass[:, 0] += left
        p_mass[:, -1] += right
        p_mass /= total
        cross = np.sum(np.where(p_mass > 0, p_mass * np.log(np.where(p_mass > 0, q, 1.0)), 0.0), axis=1)
        out[c : c + rows] = p_log_p - cross
    return out


def kl_divergences(counts: np.ndarray, levels: int, eps: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """KL of every threshold of a one-sided histogram (bins from 0): slices ``[0, i)``, ``levels <= i <= n``.

    ``n`` = last non-empty bin + 1; see :func:`slice_kl_divergences` for ``P`` and ``Q``.

    Returns:
        ``(i, kl)``: candidate bin counts and their divergences (empty arrays when ``n <= levels``).
    """
    h = np.asarray(counts, dtype=np.float64)
    nonzero = np.flatnonzero(h)
    n = int(nonzero[-1]) + 1 if nonzero.size else 0
    if n <= levels:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    i = np.arange(levels, n + 1)
    return i, slice_kl_divergences(h[:n], np.zeros_like(i), i, levels, eps)


def kl_clip_bins(neg: np.ndarray, pos: np.ndarray, levels: int, symmetric: bool, eps: float = 1e-4) -> int:
    """Bins ``i`` per side (threshold ``T = i w``) minimising KL on a histogram split at 0.

    ``neg[k]`` / ``pos[k]`` count the values in ``[k w, (k + 1) w)`` of ``-x`` / ``x`` (same width ``w``,
    same length ``B``); the signed histogram ``h = [neg reversed, pos]`` has 0 at edge ``B``. Candidate
    ``i`` keeps the slice of ``h`` the grid covers, quantized onto ``levels`` groups:

    * ``symmetric`` grid (range ``[-T, T]`` whatever the data): slice ``[B - i, B + i)``;
    * asymmetric grid (range ``[max(lo, -T), min(hi, T)]``): slice ``[B - min(i, n-), B + min(i, n+))``
      with ``n-``/``n+`` the bins the data occupies on each side, so a side is clipped only where its
      tail exceeds ``T``.

    Candidates run from the first slice of at least ``levels`` bins to ``i = max(n-, n+)`` (no clipping);
    the widest candidate wins ties. No slice reaching ``levels`` bins means no clipping.
    """
    neg, pos = np.asarray(neg, dtype=np.float64), np.asarray(pos, dtype=np.float64)
    if neg.shape != pos.shape:
        raise ValueError(f"both sides need the same bins, got {neg.shape} and {pos.shape}")
    big = pos.size
    n_neg, n_pos = (int(np.flatnonzero(s)[-1]) + 1 if np.any(s) else 0 for s in (neg, pos))
    i_max = max(n_neg, n_pos)
    i = np.arange(1, i_max + 1)
    if symmetric:
        start, stop = big - i, big + i
    else:
        start, stop = big - np.minimum(i, n_neg), big + np.minimum(i, n_pos)
    ok = stop - start >= levels
    if np.count_nonzero(ok) <= 1:
        return i_max
    kl = slice_kl_divergences(np.concatenate([neg[::-1], pos]), start[ok], stop[ok], levels, eps)
    best = np.flatnonzero(kl <= kl.min() + 1e-12)[-1]  # widest of the (numerically) tied minima
    return int(i[ok][best])


def entropy_threshold(counts: np.ndarray, bin_width: float, amax: float, levels: int) -> float:
    """Threshold ``T = i * w`` minimising KL on a histogram of ``x >= 0`` (``amax`` when nothing to search).

    Same as :func:`kl_clip_bins` with no negative side (slices ``[0, i)``, widest on ties).
    """
    pos = np.asarray(counts, dtype=np.float64)
    i = kl_clip_bins(np.zeros_like(pos), pos, levels, symmetric=False)
    return float(min(i * bin_width, amax))
