"""The integer codes of a Conv / Gemm / MatMul weight: nearest or GPTQ rounding, fitted to the CPU kernels.

:func:`rounded_weight` is the one place that turns a weight and its QParams into codes (InsertQDQPass
writes them, CorrectBiasPass corrects for exactly them). With the weight as its GEMM matrix ``W``
(:mod:`onnxq.core.gemm_layout`), per-row scale ``s`` and zero-point ``z``, real codes ``u = W / s + z``:

* ``rtn`` (the default method): ``q = clip(round(u))``.
* ``gptq`` (:class:`~onnxq.config.rounding.GPTQ`): :func:`onnxq.core.gptq.gptq_round` against the op's
  input second moment ``H`` (``ctx.layer_hessians``, per group), which minimises
  ``(q - u)^T H (q - u)``, the layer's output error on the calibration inputs.

**Fitted to the kernels.** When the op runs onnxruntime's saturating 8-bit kernels
(:func:`~onnxq.targets.ort_kernels.constrained_layout`: 8-bit codes, quantized input, ``Config.kernels``
saturating), every pair ``(2j, 2j + 1)`` must keep ``|q_2j| + |q_2j+1| <= 128`` if one-signed. The pair
constraint goes into the rounding itself (:func:`~onnxq.core.gptq.gptq_round` chooses each violating
pair jointly; without ``H`` that is nearest rounding with each violating pair trimmed optimally), and
each output channel may also take a coarser grid: scale ``alpha * s`` and zero-point ``round(z / alpha)``,
``alpha`` in ``SCALE_STEPS`` values from 1 to 2 (1 or 2 for power-of-two scales): the one with the least
loss ``s_alpha^2 (q - u_alpha)^T H (q - u_alpha)`` wins (with a per-tensor scale, the least total loss).
A row whose nearest codes already keep the limit keeps alpha = 1 unless a coarser grid rounds better.

:class:`RoundingStats` records what it cost against plain nearest rounding: the squared weight error
``sum (s q - w)^2`` and, where ``H`` is known, the output error ``sum (s q - w) H (s q - w)^T``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.core.context import QuantContext
from onnxq.core.gemm_layout import Layout, gemm_layout
from onnxq.core.gptq import gptq_round, inverse_factor
from onnxq.core.spec import QParams, quantize
from onnxq.targets.ort_kernels import PAIR_LIMIT, constrained_layout, pair_violations

#: Scales tried per output channel when the pair limit applies (alpha = 1, 1.125, ..., 2).
SCALE_STEPS = 9
#: Real codes rounded in one call at most (the scales are tried in chunks of this size).
_ELEMENTS = 1 << 24
#: Real codes of one block of independent rows (over all scales tried): a few float64 copies of it at once.
_BLOCK_ELEMENTS = 1 << 21


@dataclass
class RoundingStats:
    """Totals over the weights rounded: layers, layers under the pair limit, channels given a coarser
    scale, pairs the nearest codes had over the limit, and the weight / output errors of nearest
    rounding and of the codes written."""

    layers: int = 0
    constrained: int = 0
    channels_rescaled: int = 0
    pairs_over_limit: int = 0
    weight_error_nearest: float = 0.0
    weight_error: float = 0.0
    output_error_nearest: float = 0.0
    output_error: float = 0.0

    def to_dict(self) -> dict:
        def ratio(a: float, b: float) -> float | None:
            return round(float(a / b), 4) if b > 0 else None

        return {"layers": self.layers, "layers_fitted_to_kernels": self.constrained,
                "channels_rescaled": self.channels_rescaled, "pairs_over_limit_nearest": self.pairs_over_limit,
                "weight_error_vs_nearest": ratio(self.weight_error, self.weight_error_nearest),
                "output_error_vs_nearest": ratio(self.output_error, self.output_error_nearest)}


def weight_layout(node: gs.Node, weight_shape: tuple[int, ...]) -> Layout | None:
    """The GEMM layout GPTQ rounds ``node``'s weight in (None: not a 2-D GEMM weight)."""
    return gemm_layout(node.op, node.attrs, weight_shape)


def rounded_weight(node: gs.Node, values: np.ndarray, qp: QParams, ctx: QuantContext, *,
                   stats: RoundingStats | None = None) -> tuple[QParams, np.ndarray]:
    """The QParams (a channel's scale may grow, see the module docstring) and integer codes of ``node``'s
    weight ``values``, in the weight's shape (int64 from :func:`quantize`; int16 when fitted or GPTQ-rounded).

    With a scale per row and one ``H`` (or none) for all rows, the rows are rounded independently, a
    block of rows at a time (at most ``_BLOCK_ELEMENTS`` real codes over all scales tried; ``H``'s
    inverse factor computed once), so a large weight never has its float64 copies in memory at once."""
    spec = qp.spec
    bits = spec.store_bits
    kernel_layout = constrained_layout(node, values.shape, bits, ctx.config.kernels,
                                       node.inputs[0].name in ctx.qparams)
    if 2 * max(-spec.qmin, spec.qmax) <= PAIR_LIMIT:
        kernel_layout = None  # a narrow grid in an 8-bit container (INT2, 7-bit) cannot break the limit
    gptq = ctx.config.rounding.method == "gptq"
    hessian = ctx.layer_hessians.get(node.outputs[0].name) if gptq else None
    layout = kernel_layout or (weight_layout(node, values.shape) if hessian is not None else None)
    if layout is None:
        return qp, quantize(values, qp)
    w32 = layout.to_matrix(np.asarray(values, dtype=np.float32))
    rows, cols = w32.shape
    scale = _per_row(qp.scale, rows)
    zero = _per_row(qp.zero_point, rows)
    limit = PAIR_LIMIT if kernel_layout is not None else None
    alphas = _alphas(qp, rows, limit)
    per_row = qp.scale.size == rows
    groups = hessian.shape[0] if hessian is not None else 1
    damping = float(getattr(ctx.config.rounding, "damping", 0.01))
    factor = inverse_factor(hessian, damping) if hessian is not None else None  # once for all rows
    block = rows if groups > 1 or not per_row else max(1, _BLOCK_ELEMENTS // (cols * len(alphas)))
    codes = np.empty((rows, cols), dtype=np.int16 if spec.store_bits <= 8 else np.int64)
    best_alpha = np.ones(rows)
    if stats is not None:
        s32 = np.asarray(qp.scale, dtype=np.float32).reshape(-1)  # the stored scales (one, or one a row)
        s32 = np.broadcast_to(s32, (rows,)) if s32.size == 1 else s32
        stats.layers += 1
        stats.constrained += int(kernel_layout is not None)
    for r0 in range(0, rows, block):
        part = slice(r0, min(rows, r0 + block))
        codes[part], best_alpha[part] = _best_codes(w32[part], scale[part], zero[part], alphas, spec, groups,
                                                    factor, limit, per_row)
        if stats is not None:
            nearest = np.clip(np.rint(w32[part] / s32[part, None])
                              + zero[part, None], spec.qmin, spec.qmax)  # quantize(), in the matrix layout
            _record(stats, w32[part].astype(np.float64), nearest.astype(np.int64), codes[part], scale[part],
                    scale[part] * best_alpha[part], zero[part],
                    np.clip(np.rint(zero[part] / best_alpha[part]), spec.qmin, spec.qmax), hessian,
                    kernel_layout is not None)
    new_qp = qp
    if np.any(best_alpha != 1.0):
        best_zero = np.clip(np.rint(zero / best_alpha), spec.qmin, spec.qmax)

        def shaped(values: np.ndarray, like: np.ndarray, dtype) -> np.ndarray:
            flat = values if like.size == rows else values[:1]
            return np.asarray(flat, dtype=dtype).reshape(like.shape)

        new_qp = QParams(shaped(scale * best_alpha, qp.scale, np.float32),
                         shaped(best_zero, np.asarray(qp.zero_point), np.asarray(qp.zero_point).dtype), spec)
    return new_qp, layout.from_matrix(codes)


def _best_codes(w32: np.ndarray, scale: np.ndarray, zero: np.ndarray, alphas: np.ndarray, spec, groups: int,
                factor: np.ndarray | None, limit: int | None, per_row: bool) -> tuple[np.ndarray, np.ndarray]:
    """Codes ``(M, K)`` of the rows ``w32`` and each row's ``alpha``: the least loss over ``alphas`` (per
    row, or in total with one scale for all rows)."""
    rows = w32.shape[0]
    best_loss, best_codes, best_alpha = np.full(rows, np.inf), np.zeros(w32.shape, dtype=np.int64), np.ones(rows)
    chunk = max(1, _ELEMENTS // w32.size)
    for start in range(0, len(alphas), chunk):
        part = alphas[start:start + chunk]
        s = (scale[None, :] * part[:, None]).astype(np.float32)  # (A, M) as stored; u as QuantizeLinear divides
        z = _zero_points(zero, part, spec)  # (A, M)
        u = (w32[None] / s[..., None]).astype(np.float64) + z[..., None]  # (A, M, K)
        q, loss = gptq_round(_by_group(u, groups), spec.qmin, spec.qmax, factor=factor, pair_limit=limit)
        del u
        q, loss = _by_alpha(q, len(part)), _by_alpha(loss[..., None], len(part))[..., 0] * s.astype(np.float64) ** 2
        for i, alpha in enumerate(part):
            better = loss[i] < best_loss if per_row else np.full(rows, loss[i].sum() < best_loss.sum())
            best_loss = np.where(better, loss[i], best_loss)
            best_codes[better] = q[i][better]
            best_alpha = np.where(better, alpha, best_alpha)
    return best_codes, best_alpha


def _by_group(u: np.ndarray, groups: int) -> np.ndarray:
    """``(A, M, K)`` -> ``(G, A * M / G, K)``: the rows of each group (contiguous in M) for every scale."""
    a, m, k = u.shape
    return u.reshape(a, groups, m // groups, k).transpose(1, 0, 2, 3).reshape(groups, -1, k)


def _by_alpha(x: np.ndarray, alphas: int) -> np.ndarray:
    """The inverse of :func:`_by_group`: ``(G, A * M / G, K)`` -> ``(A, M, K)``."""
    g, _, k = x.shape
    return x.reshape(g, alphas, -1, k).transpose(1, 0, 2, 3).reshape(alphas, -1, k)


def _alphas(qp: QParams, rows: int, limit: int | None) -> np.ndarray:
    zero = np.asarray(qp.zero_point)
    if limit is None or qp.scale.size not in (1, rows) or (zero.size != qp.scale.size and np.any(zero)):
        return np.ones(1)
    return np.array([1.0, 2.0]) if qp.spec.pow2 else np.linspace(1.0, 2.0, SCALE_STEPS)


def _zero_points(zero: np.ndarray, alphas: np.ndarray, spec) -> np.ndarray:
    """``(A, M)``: each row's zero-point on the grid ``alpha`` times coarser, ``round(z / alpha)`` (the real
    zero stays on the grid; 0 stays 0)."""
    return np.clip(np.rint(zero[None, :] / np.asarray(alphas)[:, None]), spec.qmin, spec.qmax)


def _per_row(values: np.ndarray, rows: int) -> np.ndarray:
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    return np.broadcast_to(flat, (rows,)).copy() if flat.size == 1 else flat


def _record(stats: RoundingStats, w, nearest, codes, scale, new_scale, zero, new_zero, hessian, constrained
            ) -> None:
    """Add one block of rows (``w``, the nearest codes and the codes written) to the totals."""
    err_n = (nearest - zero[:, None]) * scale[:, None] - w
    err = (codes - np.broadcast_to(new_zero, zero.shape)[:, None]) * new_scale[:, None] - w
    stats.channels_rescaled += int(np.sum(new_scale != scale))
    stats.pairs_over_limit += int(pair_violations(nearest).sum()) if constrained else 0
    stats.weight_error_nearest += float(np.sum(err_n ** 2))
    stats.weight_error += float(np.sum(err ** 2))
    if hessian is not None:
        groups = hessian.shape[0]
        for before, after in ((err_n, "output_error_nearest"), (err, "output_error")):
            e = before.reshape(groups, -1, before.shape[-1])
            setattr(stats, after, getattr(stats, after) + float(np.sum((e @ hessian) * e)))
