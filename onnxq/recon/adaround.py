"""Weight quantizers for reconstruction: AdaRound (learned rounding) and round-to-nearest.

AdaRound (Nagel et al., ICML 2020). With ``b = floor(W / s)`` (a fixed integer base) and one free
variable ``V`` per weight, the rectified sigmoid

    h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),     zeta = 1.1, gamma = -0.1

picks a point between rounding down (h = 0) and up (h = 1). The quantized weight is

    soft:  W_hat = s * (clamp(b + h(V) + z, qmin, qmax) - z)           (training)
    hard:  W_hat = s * (clamp(b + 1[V >= 0] + z, qmin, qmax) - z)      (final, = DequantizeLinear(codes))

and the regulariser ``sum(1 - |2 h(V) - 1| ** beta)`` pushes every h to 0 or 1. Only ``V`` is an
``nn.Parameter``; ``W``, ``s``, ``z`` and ``b`` are buffers (AdaRound never changes the grid).

Initialisation: ``V = logit((frac - gamma) / (zeta - gamma))`` with ``frac = W/s - b``, the inverse of h,
so the soft weight starts at the float weight (wherever it is inside the grid). ``W/s`` is a float32
division, as in ONNX. Exact ties (frac == 0.5) are put on the side ONNX rounds to (half to even), so
the hard codes at initialisation equal the round-to-nearest codes exactly.

``init_codes`` (e.g. codes of a ternary operator, or any earlier solution) starts from given integer
codes ``c`` instead. With ``t = c - z`` and ``f = floor(W/s)`` the base becomes ``b = clamp(f, t - 1, t)``
(so ``t`` is one of the two choices ``b``, ``b + 1``, and ``b = f`` whenever ``t`` is ``f`` or ``f + 1``),
and ``h`` starts at ``W/s - b`` clipped to [0, 1] and then to the side of 1/2 that yields ``t`` (``V >= 0``
for up, ``V <= -1e-4`` for down; disagreeing weights start at the boundary h ~ 1/2). The hard codes at
initialisation then equal ``init_codes``.

Learned scale (``learn_scale=True``; off by default, then nothing below exists). The per-channel (or
per-tensor) scale becomes an ``nn.Parameter`` ``learned_scale`` initialised from ``scale`` (e.g. a
ternary operator's), used as ``max(s, MIN_SCALE)`` in both forwards. Its gradient is LSQ's with the
codes held by V: ``d W_hat / d s = clamp(b + h(V) + z, qmin, qmax) - z`` (the code itself), summed
over the channel. :func:`weight_optimizer` trains it with Adam at ``scale_lr`` times the channel
mean of the initial scale (a relative rate, like the activation step sizes). The base ``b`` stays
the one of the initial scale, so V keeps choosing between the same two codes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from onnxq.recon.fake_quant import MIN_SCALE

__all__ = ["GAMMA", "WEIGHT_SCALE_LR", "ZETA", "AdaRoundWeight", "RoundToNearestWeight", "rectified_sigmoid",
           "weight_optimizer"]

#: Relative Adam rate of learned weight scales (times the initial scale's mean).
WEIGHT_SCALE_LR = 1e-3
ZETA = 1.1
GAMMA = -0.1
# V given to "round down" weights sitting exactly at (or beyond) the 1/2 boundary: h(V) = 1/2 - 3e-5.
_DOWN_EPS = 1e-4


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = h`` for h in [0, 1] (finite: sigmoid stays inside (1/12, 11/12))."""
    p = (h - GAMMA) / (ZETA - GAMMA)
    return torch.log(p / (1.0 - p))


def _grid_tensors(weight: np.ndarray | torch.Tensor, scale, zero_point, axis: int | None):
    if isinstance(weight, np.ndarray):  # a copy: the weight may be a read-only map (onnxq.core.mapped)
        w = torch.from_numpy(np.array(weight, dtype=np.float32))
    else:
        w = weight.detach().to(torch.float32).clone()
    s = torch.as_tensor(np.asarray(scale) if not isinstance(scale, torch.Tensor) else scale)
    s = s.detach().to(torch.float32).clone()
    z = torch.as_tensor(np.asarray(zero_point) if not isinstance(zero_point, torch.Tensor) else zero_point)
    z = z.detach().to(torch.float32).clone()
    if s.numel() == 1 and (axis is None or s.dim() == 0):
        s, z, axis = s.reshape(()), z.reshape(()), None
    if z.shape != s.shape or s.dim() > 1:
        raise ValueError(f"scale {tuple(s.shape)}, zero_point {tuple(z.shape)}: need 0-d or one 1-D shape")
    if not bool(torch.all(s > 0)):
        raise ValueError("weight scales must be positive")
    if s.dim() == 1:
        if axis is None:
            raise ValueError("a per-channel scale needs an axis")
        axis = axis % w.dim()
        if w.shape[axis] != s.numel():
            raise ValueError(f"{s.numel()} scales for axis {axis} of a weight of shape {tuple(w.shape)}")
        shape = [1] * w.dim()
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return w, s, z, axis


class _WeightQuantizer(nn.Module):
    """Shared grid handling: buffers ``weight``, ``scale``, ``zero_point`` (broadcast shapes)."""

    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, weight, scale, zero_point, qmin: int, qmax: int, axis: int | None) -> None:
        super().__init__()
        if qmin >= qmax:
            raise ValueError(f"empty grid [{qmin}, {qmax}]")
        w, s, z, axis = _grid_tensors(weight, scale, zero_point, axis)
        if bool(torch.any(z < qmin)) or bool(torch.any(z > qmax)):
            raise ValueError(f"zero-point outside [{qmin}, {qmax}]")
        self.register_buffer("weight", w)
        self.register_buffer("scale", s)
        self.register_buffer("zero_point", z)
        self.qmin = int(qmin)
        self.qmax = int(qmax)
        self.axis = axis

    def nearest_codes(self) -> torch.Tensor:
        """Round-to-nearest codes ``clamp(round_half_even(W/s) + z, qmin, qmax)`` (int64)."""
        q = torch.round(self.weight / self.scale) + self.zero_point
        return torch.clamp(q, self.qmin, self.qmax).to(torch.int64)

    def _dequant(self, q: torch.Tensor) -> torch.Tensor:
        return (q - self.zero_point) * self.scale


class RoundToNearestWeight(_WeightQuantizer):
    """Fixed round-to-nearest weight: ``forward() = DequantizeLinear(codes())``; nothing trains.

    ``soft`` exists for API symmetry with :class:`AdaRoundWeight` and has no effect. ``codes``
    (integers in [qmin, qmax], the weight's shape) replaces round-to-nearest, e.g. a ternary
    operator's codes that are not ``round(W / s)``.
    """

    def __init__(self, weight: np.ndarray | torch.Tensor, scale, zero_point, qmin: int, qmax: int,
                 axis: int | None = None, *, codes: torch.Tensor | np.ndarray | None = None) -> None:
        super().__init__(weight, scale, zero_point, qmin, qmax, axis)
        fixed = self.nearest_codes() if codes is None else _checked_codes(codes, self.weight, qmin, qmax)
        self.register_buffer("_codes", fixed.to(torch.float32))
        self.soft = False

    def forward(self) -> torch.Tensor:
        return self._dequant(self._codes)

    def codes(self) -> torch.Tensor:
        return self._codes.to(torch.int64)


class AdaRoundWeight(_WeightQuantizer):
    """AdaRound weight quantizer (see the module docstring for the math).

    Args:
        weight: the float weight.
        scale, zero_point: 0-d (per tensor) or 1-D along ``axis`` (per channel).
        qmin, qmax: the integer grid, e.g. [-8, 7] for int4 or [-1, 1] for ternary.
        axis: channel axis of per-channel parameters.
        init_codes: optional integer codes (in [qmin, qmax], the weight's shape) to start from.
        learn_scale: make the scale a trainable ``learned_scale`` parameter (module docstring).
        scale_lr: its relative Adam rate (see :func:`weight_optimizer`).

    Attributes:
        soft: True = soft rounding h(V) (training), False = hard ``1[V >= 0]``.
        v: the rounding variables (``nn.Parameter``, the weight's shape).
        learned_scale: the trainable scale (``scale``'s broadcast shape), or None.
    """

    base: torch.Tensor

    def __init__(self, weight: np.ndarray | torch.Tensor, scale, zero_point, qmin: int, qmax: int,
                 axis: int | None = None, *, init_codes: torch.Tensor | np.ndarray | None = None,
                 learn_scale: bool = False, scale_lr: float = WEIGHT_SCALE_LR) -> None:
        super().__init__(weight, scale, zero_point, qmin, qmax, axis)
        ws = self.weight / self.scale
        floor = torch.floor(ws)
        if init_codes is None:
            frac = ws - floor
            up = torch.round(ws) > floor  # ONNX's half-to-even choice, decides exact ties
            base = floor
        else:
            codes = _checked_codes(init_codes, self.weight, qmin, qmax)
            target = codes - self.zero_point
            base = torch.minimum(torch.maximum(floor, target - 1.0), target)
            frac = ws - base
            up = target > base
        v = _inverse_rectified_sigmoid(frac.clamp(0.0, 1.0))
        # Put V on the side that gives the chosen code; only ties and init_codes that disagree with the
        # fraction move, to the boundary (h = 1/2 when rounding up, just below 1/2 when rounding down).
        v = torch.where(up, v.clamp_min(0.0), v.clamp_max(-_DOWN_EPS))
        self.register_buffer("base", base)
        self.v = nn.Parameter(v)
        self.soft = True
        self.scale_lr = float(scale_lr)
        if learn_scale:
            self.learned_scale = nn.Parameter(self.scale.clone())
        else:
            self.register_parameter("learned_scale", None)

    def current_scale(self) -> torch.Tensor:
        """The scale in use (broadcast shape): the learned one (at least MIN_SCALE) or the fixed one."""
        if self.learned_scale is None:
            return self.scale
        return self.learned_scale.clamp_min(MIN_SCALE)

    def scale_values(self) -> np.ndarray:
        """The current scale as float32 numpy: shape () per tensor, (C,) per channel."""
        s = self.current_scale().detach().cpu().to(torch.float32)
        return s.reshape(-1).numpy().copy() if self.axis is not None else s.reshape(()).numpy().copy()

    def _dequant(self, q: torch.Tensor) -> torch.Tensor:
        return (q - self.zero_point) * self.current_scale()

    def h(self) -> torch.Tensor:
        """The soft rounding offsets h(V) in [0, 1]."""
        return rectified_sigmoid(self.v)

    def hard_offsets(self) -> torch.Tensor:
        """``1[V >= 0]`` as float."""
        return (self.v >= 0).to(self.weight.dtype)

    def forward(self) -> torch.Tensor:
        offset = self.h() if self.soft else self.hard_offsets()
        q = torch.clamp(self.base + offset + self.zero_point, self.qmin, self.qmax)
        return self._dequant(q)

    def regularizer(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2 h(V) - 1| ** beta)``: 0 when every h is 0 or 1, largest at h = 1/2."""
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()

    def codes(self) -> torch.Tensor:
        """Hard integer codes ``clamp(b + 1[V >= 0] + z, qmin, qmax)`` (int64, the weight's shape)."""
        q = torch.clamp(self.base + self.hard_offsets() + self.zero_point, self.qmin, self.qmax)
        return q.detach().to(torch.int64)

    def extra_repr(self) -> str:
        return (f"shape={tuple(self.weight.shape)}, [{self.qmin}, {self.qmax}], axis={self.axis}, "
                f"soft={self.soft}" + (", learned scale" if self.learned_scale is not None else ""))


def weight_optimizer(rounding: list[AdaRoundWeight], round_lr: float) -> torch.optim.Adam:
    """Adam over the rounding variables V at ``round_lr`` and, for weights with a learned scale, over
    each ``learned_scale`` at ``scale_lr * mean(initial scale)`` (exactly ``Adam([V...], round_lr)``
    when no weight learns its scale)."""
    scaled = [w for w in rounding if w.learned_scale is not None]
    if not scaled:
        return torch.optim.Adam([w.v for w in rounding], lr=round_lr)
    groups = [{"params": [w.v for w in rounding], "lr": round_lr}]
    groups += [{"params": [w.learned_scale], "lr": w.scale_lr * float(w.scale.mean())} for w in scaled]
    return torch.optim.Adam(groups, lr=round_lr)


def _checked_codes(codes, weight: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``codes`` as a float tensor, checked: the weight's shape, integers in [qmin, qmax]."""
    c = torch.as_tensor(np.asarray(codes) if not isinstance(codes, torch.Tensor) else codes).detach()
    c = c.to(torch.float32)
    if c.shape != weight.shape:
        raise ValueError(f"init_codes {tuple(c.shape)} must have the weight's shape {tuple(weight.shape)}")
    if bool(torch.any((c != torch.round(c)) | (c < qmin) | (c > qmax))):
        raise ValueError(f"init_codes must be integers in [{qmin}, {qmax}]")
    return c
