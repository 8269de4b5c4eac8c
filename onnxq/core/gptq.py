"""GPTQ rounding (Frantar et al. 2023, "OPTQ"), optionally with a limit on pairs of adjacent codes.

For one weight matrix in its GEMM layout (:mod:`onnxq.core.gemm_layout`), rows ``m`` and real codes
``u = w / s + z`` (stored-code units), GPTQ picks integer codes ``q`` in ``[qmin, qmax]`` that make the
layer's output error small on the calibration inputs ``x`` (rows of the im2col'd input)::

    min_q  (q - u)^T H (q - u),     H = E[x x^T] + lambda I,   lambda = damping * mean(diag E[x x^T])

one row at a time (the rows share ``H``). With ``H^-1 = U^T U`` (``U`` upper triangular, the Cholesky
factor of the inverse), the columns are rounded in order and each rounding error is spread over the
columns not yet rounded::

    q_k = round(u_k),   e_k = (u_k - q_k) / U_kk,   u_j <- u_j - e_k U_kj  (j > k)

and then ``(q - u)^T H (q - u) = sum_k e_k^2`` exactly (the loss returned per row). The updates are
applied lazily, one block of columns at a time (the block's own columns eagerly, the rest with one
matrix product per block), which gives the same result.

**Pair limit** ``P`` (onnxruntime's saturating CPU kernels, :mod:`onnxq.targets.ort_kernels`): columns
``(2j, 2j + 1)`` of one sign must keep ``|q_2j| + |q_2j+1| <= P``. Where the nearest pair (``round(u_2j)``
then ``round`` of the updated ``u_2j+1``) breaks it, the pair is chosen jointly: for every candidate
``q_2j`` from ``round(u_2j) + sign`` down to 0, ``q_2j+1`` is the nearest code in the range ``q_2j``
leaves, and the pair with the least ``e_2j^2 + e_2j+1^2`` wins (the exact minimum of the pair's share
of the loss given the columns before it). Without ``H`` (``hessian=None``: identity, no error
feedback) this is round-to-nearest with each violating pair trimmed optimally.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg.lapack

#: Columns whose updates are applied eagerly; the rest of the matrix is updated once per block.
BLOCK = 128
#: Violating pairs whose candidates are tried at once without ``H`` (bounds the candidate table).
_PAIR_CHUNK = 1 << 14


def inverse_factor(hessian: np.ndarray, damping: float) -> np.ndarray:
    """``U`` upper triangular with ``U^T U = (H + lambda I)^-1`` for each of ``(G, K, K)`` matrices (dead
    inputs, ``H_kk = 0``, get ``H_kk = 1``). The damping grows tenfold until every ``H`` factors.

    With ``J`` the order reversal and ``J H J = L L^T`` (Cholesky), ``H^-1 = (J L^-1 J)^T (J L^-1 J)`` and
    ``J L^-1 J`` is upper triangular: one factorisation and one triangular inverse per matrix."""
    h = np.array(hessian, dtype=np.float64)
    k = h.shape[-1]
    idx = np.arange(k)
    h[:, idx, idx] = np.where(h[:, idx, idx] <= 0, 1.0, h[:, idx, idx])
    mean = np.mean(h[:, idx, idx], axis=1)[:, None, None]
    flipped = h[:, ::-1, ::-1]
    for attempt in range(6):
        damped = flipped + (damping * 10 ** attempt) * mean * np.eye(k)
        try:
            return _reversed_inverse_cholesky(damped)
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("the input second moment matrix does not factor even with heavy damping")


def _reversed_inverse_cholesky(damped: np.ndarray) -> np.ndarray:
    """``J chol(damped)^-1 J`` per matrix: numpy's batched routines for many small matrices, LAPACK's
    ``potrf`` and ``trtri`` one matrix at a time for large ones."""
    if damped.shape[-1] <= 64:
        return np.linalg.inv(np.linalg.cholesky(damped))[:, ::-1, ::-1]
    out = np.empty_like(damped)
    for g, matrix in enumerate(damped):
        lower, info = scipy.linalg.lapack.dpotrf(matrix, lower=1, clean=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"not positive definite (potrf info {info})")
        inverse, info = scipy.linalg.lapack.dtrtri(lower, lower=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"singular factor (trtri info {info})")
        out[g] = inverse[::-1, ::-1]
    return out


def gptq_round(u: np.ndarray, qmin: int, qmax: int, *, hessian: np.ndarray | None = None,
               damping: float = 0.01, pair_limit: int | None = None, factor: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes ``(G, R, K)`` for the real codes ``u`` (G, R, K): ``G`` groups of ``R`` rows, each group
    with its own ``hessian`` (G, K, K) (None: the identity), and each row's loss ``sum_k e_k^2`` (G, R)
    (see the module docstring). ``factor``: :func:`inverse_factor` of the hessian, when the caller rounds
    several blocks of rows against one ``H`` (rows never interact)."""
    u = np.array(u, dtype=np.float64)
    groups, rows, k = u.shape
    if factor is None:
        if hessian is None:  # no error feedback: every column (pair) independent, all rounded at once
            return _round_independent(u, qmin, qmax, pair_limit)
        factor = inverse_factor(hessian, damping)
    q = np.zeros(u.shape, dtype=np.int64)
    loss = np.zeros((groups, rows))
    for b0 in range(0, k, BLOCK):
        b1 = min(k, b0 + BLOCK)
        errors = np.zeros((groups, rows, b1 - b0))
        col = b0
        while col < b1:
            if pair_limit is not None and col + 1 < b1:
                _round_pair(u, q, col, b1, factor, qmin, qmax, pair_limit, errors[..., col - b0:col - b0 + 2])
                col += 2
            else:
                _round_column(u, q, col, b1, factor, qmin, qmax, errors[..., col - b0])
                col += 1
        loss += np.sum(errors ** 2, axis=-1)
        if factor is not None and b1 < k:
            u[..., b1:] -= errors @ factor[:, b0:b1, b1:]
    return q, loss


def _round_independent(u: np.ndarray, qmin: int, qmax: int, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`gptq_round` without ``H``: the nearest codes, each violating pair ``(2j, 2j + 1)`` trimmed
    to its least squared error (the column loop's result, computed for all pairs at once)."""
    q = np.clip(np.rint(u), qmin, qmax)
    pairs = u.shape[-1] // 2 * 2
    if limit is not None and pairs:
        first, second = q[..., 0:pairs:2], q[..., 1:pairs:2]
        bad = (first * second > 0) & (np.abs(first) + np.abs(second) > limit)
        idx = np.nonzero(bad)
        for start in range(0, len(idx[0]), _PAIR_CHUNK):  # a bounded candidate table at a time
            part = tuple(i[start:start + _PAIR_CHUNK] for i in idx)
            u0, u1 = u[..., 0:pairs:2][part][:, None], u[..., 1:pairs:2][part][:, None]
            f = first[part]
            sign = np.sign(f)[:, None]
            steps = np.arange(-1, int(np.max(np.abs(f))) + 1)[None, :]
            cand = np.clip(f[:, None] - sign * steps, qmin, qmax)
            cand = np.where(sign * cand < 0, 0, cand)  # never past zero
            lo, hi = _pair_range(cand, limit, qmin, qmax)
            cost = (u0 - cand) ** 2 + (u1 - np.clip(np.rint(u1), lo, hi)) ** 2
            best = cand[np.arange(len(f)), np.argmin(cost, axis=1)]
            lo, hi = _pair_range(best, limit, qmin, qmax)
            first[part] = best
            second[part] = np.clip(np.rint(u1[:, 0]), lo, hi)
        q[..., 0:pairs:2], q[..., 1:pairs:2] = first, second
    return q.astype(np.int64), np.sum((u - q) ** 2, axis=-1)


def _entry(factor: np.ndarray | None, i: int, j: int, groups: int) -> np.ndarray:
    """``U_ij`` per group, ``(G, 1)`` to broadcast over rows (the identity's without ``factor``)."""
    if factor is None:
        return np.full((groups, 1), 1.0 if i == j else 0.0)
    return factor[:, i, j][:, None]


def _spread(u: np.ndarray, factor: np.ndarray | None, col: int, end: int, err: np.ndarray) -> None:
    if factor is not None and col + 1 < end:
        u[..., col + 1:end] -= err[..., None] * factor[:, None, col, col + 1:end]


def _round_column(u, q, col, end, factor, qmin, qmax, err_out) -> None:
    q[..., col] = np.clip(np.rint(u[..., col]), qmin, qmax)
    err = (u[..., col] - q[..., col]) / _entry(factor, col, col, u.shape[0])
    err_out[:] = err
    _spread(u, factor, col, end, err)


def _pair_range(first: np.ndarray, limit: int, qmin: int, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """The range of the second code of a pair given the first: one sign may not pass ``limit`` in sum (a
    code of the other sign, or 0, is always allowed)."""
    lo = np.where(first < 0, np.maximum(qmin, np.minimum(0, -limit - first)), qmin)
    hi = np.where(first > 0, np.minimum(qmax, np.maximum(0, limit - first)), qmax)
    return lo, hi


def _round_pair(u, q, col, end, factor, qmin, qmax, limit, err_out) -> None:
    groups = u.shape[0]
    d0, d1 = _entry(factor, col, col, groups), _entry(factor, col + 1, col + 1, groups)
    cross = _entry(factor, col, col + 1, groups)
    first = np.clip(np.rint(u[..., col]), qmin, qmax)
    e0 = (u[..., col] - first) / d0
    second = np.clip(np.rint(u[..., col + 1] - e0 * cross), qmin, qmax)
    bad = (first * second > 0) & (np.abs(first) + np.abs(second) > limit)
    if bad.any():
        g, r = np.nonzero(bad)
        pick_d0, pick_d1, pick_cross = d0[g], d1[g], cross[g]
        sign = np.sign(first[g, r])[:, None]
        steps = np.arange(-1, int(np.max(np.abs(first[g, r]))) + 1)[None, :]
        cand = np.clip(first[g, r, None] - sign * steps, qmin, qmax)
        cand = np.where(sign * cand < 0, 0, cand)  # never past zero
        ce0 = (u[g, r, col, None] - cand) / pick_d0
        ctarget = u[g, r, col + 1, None] - ce0 * pick_cross
        lo, hi = _pair_range(cand, limit, qmin, qmax)
        cost = ce0 ** 2 + ((ctarget - np.clip(np.rint(ctarget), lo, hi)) / pick_d1) ** 2
        best = np.argmin(cost, axis=1)
        pick = np.arange(len(g))
        first[g, r] = cand[pick, best]
        e0[g, r] = ce0[pick, best]
    q[..., col] = first
    err_out[..., 0] = e0
    _spread(u, factor, col, end, e0)
    lo, hi = _pair_range(first, limit, qmin, qmax)
    q[..., col + 1] = np.clip(np.rint(u[..., col + 1]), lo, hi)
    e1 = (u[..., col + 1] - q[..., col + 1]) / d1
    err_out[..., 1] = e1
    _spread(u, factor, col + 1, end, e1)
