"""GPTQ rounding (onnxq.core.gptq): its loss identity, its gain over nearest rounding, the pair limit."""

from __future__ import annotations

import numpy as np

from onnxq.core.gptq import gptq_round, inverse_factor
from onnxq.targets.ort_kernels import PAIR_LIMIT, pair_violations, repair_pairs


def _problem(seed: int = 0, rows: int = 32, k: int = 40, spread: float = 50.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4000, k)) @ rng.normal(size=(k, k))  # correlated inputs
    h = x.T @ x / len(x)
    return rng.normal(size=(rows, k)) * spread, h


def _cost(q: np.ndarray, u: np.ndarray, h: np.ndarray) -> float:
    d = q - u
    return float(np.sum((d @ h) * d))


def test_inverse_factor_is_the_cholesky_of_the_damped_inverse() -> None:
    _, h = _problem()
    u_factor = inverse_factor(h[None], 0.01)[0]
    damped = h + 0.01 * np.mean(np.diag(h)) * np.eye(len(h))
    assert np.allclose(u_factor.T @ u_factor, np.linalg.inv(damped))
    assert np.allclose(np.tril(u_factor, -1), 0)


def test_loss_is_the_damped_quadratic_form() -> None:
    u, h = _problem()
    q, loss = gptq_round(u[None], -127, 127, hessian=h[None], damping=0.01)
    damped = h + 0.01 * np.mean(np.diag(h)) * np.eye(len(h))
    expect = np.sum(((q[0] - u) @ damped) * (q[0] - u), axis=1)
    assert np.allclose(loss[0], expect, rtol=1e-6)


def test_gptq_beats_nearest_rounding_on_correlated_inputs() -> None:
    u, h = _problem()
    nearest = np.clip(np.rint(u), -127, 127)
    q, _ = gptq_round(u[None], -127, 127, hessian=h[None])
    assert _cost(q[0], u, h) < 0.75 * _cost(nearest, u, h)
    assert q.min() >= -127 and q.max() <= 127


def test_without_hessian_it_is_nearest_rounding() -> None:
    u, _ = _problem()
    q, loss = gptq_round(u[None], -127, 127)
    nearest = np.clip(np.rint(u), -127, 127)
    assert np.array_equal(q[0], nearest)
    assert np.allclose(loss[0], np.sum((nearest - u) ** 2, axis=1))


def test_pair_limit_holds_and_costs_little_with_error_feedback() -> None:
    u, h = _problem(spread=90.0)
    nearest = np.clip(np.rint(u), -127, 127).astype(np.int64)
    assert pair_violations(nearest).any()
    q, _ = gptq_round(u[None], -127, 127, hessian=h[None], pair_limit=PAIR_LIMIT)
    assert not pair_violations(q[0]).any()
    trimmed = repair_pairs(nearest, u)
    assert _cost(q[0], u, h) < _cost(trimmed, u, h)


def test_without_hessian_the_pair_limit_is_the_optimal_trim() -> None:
    u, _ = _problem(spread=90.0)
    q, _ = gptq_round(u[None], -127, 127, pair_limit=PAIR_LIMIT)
    assert np.array_equal(q[0], repair_pairs(np.clip(np.rint(u), -127, 127).astype(np.int64), u))


def test_groups_round_independently() -> None:
    u1, h1 = _problem(1)
    u2, h2 = _problem(2)
    both, loss = gptq_round(np.stack([u1, u2]), -127, 127, hessian=np.stack([h1, h2]), pair_limit=PAIR_LIMIT)
    one, l1 = gptq_round(u1[None], -127, 127, hessian=h1[None], pair_limit=PAIR_LIMIT)
    two, l2 = gptq_round(u2[None], -127, 127, hessian=h2[None], pair_limit=PAIR_LIMIT)
    assert np.array_equal(both[0], one[0]) and np.array_equal(both[1], two[0])
    assert np.allclose(loss, np.concatenate([l1, l2]))


def test_dead_inputs_and_odd_k_are_handled() -> None:
    u, h = _problem(k=41)
    h[5, :] = h[:, 5] = 0  # an input that is always zero
    q, loss = gptq_round(u[None], -127, 127, hessian=h[None], pair_limit=PAIR_LIMIT)
    assert np.isfinite(loss).all() and not pair_violations(q[0]).any()


def test_without_hessian_each_violating_pair_gets_its_least_error_valid_pair() -> None:
    """Against every valid pair of a narrow grid: the trimmed pair's error is the least one, codes of
    opposite signs (or a zero) are never limited, even when one code alone passes the limit."""
    rng = np.random.default_rng(3)
    qmin, qmax, limit = -8, 7, 6
    u = rng.uniform(-9, 8, size=(2, 30, 21))
    q, loss = gptq_round(u, qmin, qmax, pair_limit=limit)
    grid = np.arange(qmin, qmax + 1)
    a, b = np.meshgrid(grid, grid, indexing="ij")
    valid = ~((a * b > 0) & (np.abs(a) + np.abs(b) > limit))
    for g, r, j in np.ndindex(2, 30, 10):
        u0, u1 = u[g, r, 2 * j], u[g, r, 2 * j + 1]
        best = np.min(np.where(valid, (u0 - a) ** 2 + (u1 - b) ** 2, np.inf))
        got = (u0 - q[g, r, 2 * j]) ** 2 + (u1 - q[g, r, 2 * j + 1]) ** 2
        assert valid[q[g, r, 2 * j] - qmin, q[g, r, 2 * j + 1] - qmin]
        assert np.isclose(got, best)
    assert np.array_equal(q[..., -1], np.clip(np.rint(u[..., -1]), qmin, qmax))  # odd K: the last alone
    assert np.allclose(loss, np.sum((u - q) ** 2, axis=-1))
