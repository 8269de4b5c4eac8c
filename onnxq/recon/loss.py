"""Reconstruction objective: output error plus the AdaRound rounding regulariser.

Output error of one block output ``z`` (batch first) against the target ``z_fp``, ``dz = z - z_fp``::

    plain:   L_rec = mean_{n, spatial} sum_c |dz|^p
    Fisher:  L_rec = mean_{n, spatial} sum_c (|g| + 1)^2 * dz^2

i.e. the error is summed over the channel axis (dim 1) and averaged over the batch and every other
axis (for a 2-D ``(N, C)`` output: summed over C, averaged over N; a 1-D output is averaged). This is
BRECQ's normalisation, the one its regulariser weight lambda = 0.01 was tuned against. ``g`` is the
gradient of the task loss (BRECQ: KL(FP logits || quantized logits)) with respect to the block output,
computed by the caller; ``+1`` is BRECQ's damping, and the Fisher form is always quadratic. Several
block outputs add up.

Total: ``L = L_rec + lambda * sum_modules sum(1 - |2 h(V) - 1|^beta)`` where the regulariser is on only
after the warm-up and ``beta`` follows :class:`BetaSchedule`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from onnxq.recon.adaround import AdaRoundWeight

__all__ = ["BetaSchedule", "LossTerms", "ReconLoss", "output_error"]


@dataclass(frozen=True)
class BetaSchedule:
    """Temperature of the rounding regulariser over ``iters`` iterations.

    For ``it < warmup * iters`` the regulariser is off (``active(it)`` is False) and beta = ``start``.
    Afterwards beta falls linearly from ``start`` to ``end``:
    ``beta(it) = end + (start - end) * max(0, 1 - (it - w) / (iters - w))`` with ``w = warmup * iters``.
    The shape depends only on the fraction ``it / iters``, so it survives a shorter schedule.
    """

    iters: int
    start: float = 20.0
    end: float = 2.0
    warmup: float = 0.2

    @property
    def warmup_iters(self) -> float:
        return self.warmup * self.iters

    def active(self, it: int) -> bool:
        """Whether the regulariser counts at iteration ``it`` (0-based)."""
        return it >= self.warmup_iters

    def __call__(self, it: int) -> float:
        w = self.warmup_iters
        if it < w:
            return float(self.start)
        span = max(self.iters - w, 1e-12)
        rel = (it - w) / span
        return float(self.end + (self.start - self.end) * max(0.0, 1.0 - rel))


class _SquaredError(torch.autograd.Function):
    """``c * sum((pred - target)^2)`` in few passes over the output: the difference, its square summed
    (torch's cascade sum: a float32 dot product of 19M terms is off by 2e-4), and in backward
    ``2 c g dz``; ``F.mse_loss``'s backward runs 2 to 3 times longer on a channels-last CPU tensor. No
    gradient to the target."""

    @staticmethod
    def forward(ctx, pred, target, c):  # type: ignore[override]
        dz = pred - target
        ctx.save_for_backward(dz)
        ctx.c = c
        return (dz * dz).sum() * c

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (dz,) = ctx.saved_tensors
        return dz * (2.0 * ctx.c * grad), None, None


def output_error(pred: torch.Tensor, target: torch.Tensor, p: float = 2.0,
                 grad: torch.Tensor | None = None) -> torch.Tensor:
    """BRECQ-normalised error of one output (see the module docstring); Fisher-weighted if ``grad``."""
    if grad is None and p == 2 and pred.shape == target.shape:
        channels = pred.shape[1] if pred.dim() >= 2 else 1
        return _SquaredError.apply(pred, target, channels / max(pred.numel(), 1))
    dz = pred - target
    if grad is None:
        err = dz.abs().pow(p)
    else:
        err = (grad.abs() + 1.0).pow(2) * dz.pow(2)
    if err.dim() >= 2:
        return err.sum(dim=1).mean()
    return err.mean()


@dataclass(frozen=True)
class LossTerms:
    """One evaluation of :class:`ReconLoss`: ``total = rec + round_weight * reg`` (reg 0 in warm-up)."""

    total: torch.Tensor
    rec: torch.Tensor
    reg: torch.Tensor


class ReconLoss:
    """Callable reconstruction loss over a block's outputs.

    Args:
        rounding: the AdaRound modules whose regulariser is added (empty: no regulariser).
        p: the exponent of the plain output error (2 in the weight phase, 2.4 in BRECQ's act phase).
        round_weight: lambda.
        schedule: the beta schedule; None = no regulariser.
    """

    def __init__(self, rounding: Iterable[AdaRoundWeight] = (), *, p: float = 2.0, round_weight: float = 0.01,
                 schedule: BetaSchedule | None = None) -> None:
        self.rounding = list(rounding)
        self.p = p
        self.round_weight = round_weight
        self.schedule = schedule

    def regularizer(self, it: int) -> torch.Tensor | None:
        """lambda-free regulariser sum at iteration ``it``, or None while it is switched off."""
        if self.schedule is None or not self.rounding or self.round_weight == 0:
            return None
        if not self.schedule.active(it):
            return None
        beta = self.schedule(it)
        return torch.stack([m.regularizer(beta) for m in self.rounding]).sum()

    def __call__(self, preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], it: int = 0,
                 fisher: Sequence[torch.Tensor] | None = None) -> LossTerms:
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} outputs but {len(targets)} targets")
        grads: Sequence[torch.Tensor | None] = fisher if fisher is not None else [None] * len(preds)
        rec = sum((output_error(y, t, self.p, g) for y, t, g in zip(preds, targets, grads, strict=True)),
                  start=torch.zeros((), device=preds[0].device))
        reg = self.regularizer(it)
        if reg is None:
            return LossTerms(rec, rec, torch.zeros((), device=rec.device))
        return LossTerms(rec + self.round_weight * reg, rec, reg)
