"""Ternary weight quantization: w ~= s * q with codes q in {-1, 0, 1} and one scale s > 0 per group.

A *group* is one output channel (a slice along ``axis``, the default ``axis=0``) or the whole
tensor (``axis=None``). Every method picks, per group, a threshold ``t >= 0`` and a scale ``s > 0``:

    q = sign(w) if |w| > t else 0          w_hat = q * s

Ties go to zero: ``|w| == t`` gives code 0 (the zero band ``|w| <= t`` is closed). For the methods
whose threshold is half the scale (rtn, tquant, mquant-a) this is exactly ONNX ``QuantizeLinear``
with round-half-to-even (``round(0.5) = 0``), so ``quantize(w, result.qparams())`` reproduces the
codes up to float32 rounding at the boundary. For twn and mquant-b the threshold is *not* s/2, so
the codes are not ``round(w / s)``: export ``result.codes`` directly, never re-quantize the float
weights with ``result.qparams()``.

Methods (M = max|w| over the group; see ``docs/algorithms.md`` section 6):

    rtn       t = M/2,                 s = M             (round to nearest on the grid {-M, 0, M})
    twn       t = 0.7 * mean|w|,       s = mean{|w| : |w| > t}      (Li & Liu 2016)
    tquant    t = M/3,                 s = 2M/3          (minimax, "support equalization")
    mquant-a  t = Q_{1/3}(|w|),        s = 2t            ("mass equalization", variant a)
    mquant-b  t = Q_{1/3}(|w|),        s = mean{|w| : |w| > t}      (variant b, MSE-optimal given t)

The paper (Yvinec et al., arXiv 2306.17442) was not read in full: the closed forms of TQuant and
MQuant are our derivation, and which MQuant scale the paper uses is unknown, hence the two
labelled variants. Everything is computed in float64 (scales returned as float32, thresholds as
the float64 values the codes were compared against); the result is deterministic.

Degenerate groups: an all-zero group gets codes 0 and scale 1 (any scale is exact). A group whose
non-zero codes would get a zero or undefined scale falls back as documented per function.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from onnxq.config.choices import TERNARY_ALIASES, TERNARY_METHODS
from onnxq.core.spec import TERNARY_WEIGHT, Granularity, QParams, QuantSpec
from onnxq.errors import UserError

logger = logging.getLogger(__name__)

METHODS = TERNARY_METHODS
ALIASES = TERNARY_ALIASES
#: What the alias "mquant" means (docs/defaults.md says why).
MQUANT_DEFAULT = TERNARY_ALIASES["mquant"]

TWN_DELTA_FACTOR = 0.7  # Li & Liu 2016: Delta = 0.7 * E|w| approximates the optimal threshold.


def ternary_spec(axis: int | None) -> QuantSpec:
    """The 2-bit narrow signed grid [-1, 1]: per channel along ``axis``, or per tensor for None."""
    if axis is None:
        return replace(TERNARY_WEIGHT, granularity=Granularity.TENSOR, axis=None)
    return TERNARY_WEIGHT.with_axis(axis)


@dataclass(frozen=True, eq=False)
class TernaryResult:
    """Ternary codes of one tensor and their per-group scale.

    Attributes:
        codes: int8 array in {-1, 0, 1}, same shape as the weight.
        scale: float32, shape () per tensor or (C,) per channel along ``axis``; all > 0.
        threshold: float64, same shape as ``scale``; codes are 0 where |w| <= threshold.
        axis: the (non-negative) channel axis, or None for one group per tensor.
    """

    codes: np.ndarray
    scale: np.ndarray
    threshold: np.ndarray
    axis: int | None

    def dequantize(self) -> np.ndarray:
        """w_hat = codes * scale (broadcast along ``axis``), float32."""
        return (self.codes.astype(np.float32) * _expand(self.scale, self.codes.ndim, self.axis)).astype(
            np.float32
        )

    @property
    def sparsity(self) -> float:
        """Fraction of codes equal to 0."""
        return float(np.mean(self.codes == 0))

    def qparams(self) -> QParams:
        """QParams on :func:`ternary_spec` with zero-point 0 (the scales are already positive)."""
        return QParams(self.scale, np.zeros(self.scale.shape, dtype=np.int64), ternary_spec(self.axis))


def canonical_method(method: str) -> str:
    """``method`` with the alias "mquant" replaced by :data:`MQUANT_DEFAULT` (other names unchanged)."""
    return ALIASES.get(method, method)


def ternarize(w: np.ndarray, method: str, *, axis: int | None = 0) -> TernaryResult:
    """Ternarize ``w`` with one of :data:`METHODS`, per channel along ``axis`` or per tensor (None)."""
    if method == "rtn":
        return ternary_rtn(w, axis)
    if method == "twn":
        return ternary_twn(w, axis)
    if method == "tquant":
        return ternary_tquant(w, axis)
    if method in ("mquant-a", "mquant-b"):
        return ternary_mquant(w, axis, variant=method[-1])
    if method in ALIASES:
        return ternarize(w, ALIASES[method], axis=axis)
    raise UserError(f"unknown ternary method {method!r}: use one of {', '.join(METHODS)}")


def ternary_rtn(w: np.ndarray, axis: int | None = 0) -> TernaryResult:
    """Naive round-to-nearest on the grid {-M, 0, M}.

    s = M = max|w|, q = clip(round(w / s), -1, 1), i.e. threshold t = M/2 (ties |w| = M/2 -> 0,
    as round-half-even). Worst-case error M/2 over the support [-M, M]; exact on groups whose
    values are all in {-M, 0, M} (e.g. constant groups). All-zero group: s = 1, t = 0.
    """
    g, ax = _groups(w, axis)
    m = np.max(np.abs(g), axis=1)
    return _finish(w, g, ax, threshold=m / 2.0, scale=m)


def ternary_twn(w: np.ndarray, axis: int | None = 0) -> TernaryResult:
    """Ternary Weight Networks (Li & Liu, 2016).

    Delta = 0.7 * mean|w| over the group; q = sign(w) where |w| > Delta (ties -> 0), else 0;
    s = mean{|w| : |w| > Delta}, the least-squares scale for those codes. Some |w| exceeds Delta
    whenever the group is not all zero (max|w| >= mean|w| > 0.7 mean|w|). All-zero group: s = 1.
    """
    g, ax = _groups(w, axis)
    t = TWN_DELTA_FACTOR * np.mean(np.abs(g), axis=1)
    return _finish(w, g, ax, threshold=t, scale=_mean_above(g, t))


def ternary_tquant(w: np.ndarray, axis: int | None = 0) -> TernaryResult:
    """TQuant, minimax ("support equalization"): the three levels split [-M, M] into equal bins.

    s = 2M/3 and t = M/3 = s/2, so q = clip(round(w / s), -1, 1) (ties |w| = M/3 -> 0). For
    |w| <= M/3 the error is |w| <= M/3; for M/3 < |w| <= M it is ||w| - 2M/3| <= M/3. So the max
    error is exactly M/3 (reached at |w| = M), the optimum of min_s max_{|x|<=M} |x - s q(x)|.
    On a finite group RTN can do better (its error is < M/3 when no |w| lies in [M/3, 2M/3], e.g.
    a constant group, which RTN represents exactly). All-zero group: s = 1, t = 0.
    """
    g, ax = _groups(w, axis)
    m = np.max(np.abs(g), axis=1)
    return _finish(w, g, ax, threshold=m / 3.0, scale=2.0 * m / 3.0)


def ternary_mquant(w: np.ndarray, axis: int | None = 0, variant: str = "b") -> TernaryResult:
    """MQuant ("mass equalization"): each of the three codes holds about a third of the weights.

    t = Q_{1/3}(|w|), the k-th smallest |w| of the n values of the group with k = ceil(n/3) (the
    inverted-CDF quantile, no interpolation), and q = sign(w) where |w| > t (ties -> 0). With no
    ties the zero bin holds exactly ceil(n/3) weights; for symmetric data the +1 and -1 bins split
    the rest about evenly.

    Variant ``"a"``: s = 2t, so RTN with scale s has its boundary at t (codes = round(w / s)).
    Variant ``"b"``: s = mean{|w| : |w| > t}, the MSE-optimal scale for the given codes:
    d/ds sum_{|w|>t} (|w| - s)^2 = 0. Which variant the paper uses is unknown (open point).

    Guards (ours, for degenerate groups): if the closed zero band would swallow a group that is
    not all zero (t = M, i.e. more than 2/3 of |w| equal the max, e.g. a constant group), t is
    lowered to the largest |w| below M (0 if none), keeping the non-zero weights. If variant a's
    2t is 0 while some codes are non-zero (t = 0: at least a third of the group is exactly 0), that
    group uses variant b's scale instead. All-zero group: s = 1, t = 0.
    """
    if variant not in ("a", "b"):
        raise UserError(
            f"unknown MQuant variant {variant!r}: use 'a' (s = 2t) or 'b' (s = mean|w| above t)"
        )
    g, ax = _groups(w, axis)
    a = np.sort(np.abs(g), axis=1)
    n = a.shape[1]
    k = (n + 2) // 3
    t = a[:, k - 1].copy()
    m = a[:, -1]
    swallowed = (t >= m) & (m > 0)
    if np.any(swallowed):
        below = np.where(a < m[:, None], a, 0.0).max(axis=1)
        t = np.where(swallowed, below, t)
        logger.debug("mquant: %d group(s) with >2/3 of |w| at the max: threshold lowered",
                     int(swallowed.sum()))
    s_b = _mean_above(g, t)
    if variant == "b":
        scale = s_b
    else:
        scale = np.where((t > 0) | (m == 0), 2.0 * t, s_b)
    return _finish(w, g, ax, threshold=t, scale=scale)


# ----- error helpers -----------------------------------------------------------------------------


def max_error(w: np.ndarray, result: TernaryResult, *, per_group: bool = False) -> float | np.ndarray:
    """max |w - w_hat| over the tensor, or per group (shape of ``result.scale``)."""
    return _reduce_error(w, result, lambda e: np.max(np.abs(e), axis=1), per_group)


def mean_abs_error(w: np.ndarray, result: TernaryResult, *, per_group: bool = False) -> float | np.ndarray:
    """mean |w - w_hat| over the tensor, or per group."""
    return _reduce_error(w, result, lambda e: np.mean(np.abs(e), axis=1), per_group)


def mse(w: np.ndarray, result: TernaryResult, *, per_group: bool = False) -> float | np.ndarray:
    """mean (w - w_hat)^2 over the tensor, or per group."""
    return _reduce_error(w, result, lambda e: np.mean(e * e, axis=1), per_group)


def _reduce_error(w, result: TernaryResult, fn, per_group: bool):
    w = np.asarray(w)
    if w.shape != result.codes.shape:
        raise UserError(f"weight shape {w.shape} differs from the codes' shape {result.codes.shape}")
    err = w.astype(np.float64) - result.dequantize().astype(np.float64)
    if not per_group:
        return float(fn(err.reshape(1, -1))[0])
    g, _ = _groups(err, result.axis)
    out = fn(g)
    return out[0] if result.axis is None else out


# ----- internals ---------------------------------------------------------------------------------


def _groups(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, int | None]:
    """Validate ``w`` and view it as float64 rows (C, n): one row per group."""
    w = np.asarray(w)
    if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
        raise UserError(f"ternarize needs a real-valued weight array, got dtype {w.dtype}")
    if w.size == 0:
        raise UserError(f"cannot ternarize an empty weight (shape {w.shape}): pass a non-empty array")
    x = w.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise UserError("weight contains NaN or inf: fix the model's weights before ternarizing")
    if axis is None:
        return x.reshape(1, -1), None
    if not -w.ndim <= axis < w.ndim:
        raise UserError(
            f"axis {axis} is out of range for a weight of shape {w.shape}: use 0..{w.ndim - 1} or None"
        )
    ax = axis % w.ndim
    return np.moveaxis(x, ax, 0).reshape(w.shape[ax], -1), ax


def _mean_above(g: np.ndarray, t: np.ndarray) -> np.ndarray:
    """mean{|w| : |w| > t} per row; 0 where no |w| exceeds t."""
    a = np.abs(g)
    mask = a > t[:, None]
    cnt = mask.sum(axis=1)
    tot = np.where(mask, a, 0.0).sum(axis=1)
    return np.divide(tot, cnt, out=np.zeros_like(tot), where=cnt > 0)


def _finish(
    w: np.ndarray, g: np.ndarray, ax: int | None, *, threshold: np.ndarray, scale: np.ndarray
) -> TernaryResult:
    """Codes sign(w) * [|w| > t], scales made positive (1 for groups with no non-zero code)."""
    q = (np.sign(g) * (np.abs(g) > threshold[:, None])).astype(np.int8)
    nonzero = np.any(q != 0, axis=1)
    scale = np.where(nonzero & (scale > 0), scale, 1.0)
    if np.any(scale > np.finfo(np.float32).max):
        raise UserError("weight magnitudes exceed the float32 range: rescale the weights before ternarizing")
    s32 = scale.astype(np.float32)
    # A float32 underflow (|w| ~ 1e-46) would give 0: clamp to the smallest normal float32.
    s32 = np.maximum(s32, np.finfo(np.float32).tiny)
    shape = np.asarray(w).shape
    if ax is None:
        codes = q.reshape(shape)
        return TernaryResult(codes, s32.reshape(()), threshold.reshape(()).astype(np.float64), None)
    moved = (shape[ax],) + tuple(d for i, d in enumerate(shape) if i != ax)
    codes = np.moveaxis(q.reshape(moved), 0, ax)
    return TernaryResult(np.ascontiguousarray(codes), s32, threshold.astype(np.float64), ax)


def _expand(p: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or p.ndim == 0:
        return p
    shape = [1] * ndim
    shape[axis] = -1
    return p.reshape(shape)
