"""Fake quantization with the exact numerics of ONNX ``QuantizeLinear -> DequantizeLinear``.

Forward (float32; bit-identical to onnxruntime's CPU kernels, which the tests check)::

    v     = x / s                                   (a division, not x * (1/s): the results differ)
    q     = clamp(round_half_even(v) + z, qmin, qmax)
    x_hat = (q - z) * s

``s`` and ``z`` are scalars (per tensor) or 1-D along ``axis`` (per channel). ``torch.round`` rounds
half to even, as ONNX does.

Backward (straight-through estimator for ``x``, LSQ for ``s``; Esser et al., ICLR 2020). With the
continuous position ``u = x / s + z``::

    d x_hat / d x = 1                    if qmin <= u <= qmax,   else 0
    d x_hat / d s = round(x / s) - x / s if qmin <= u <= qmax
                    qmin - z             if u < qmin
                    qmax - z             if u > qmax

The range test uses the unrounded ``u`` (LSQ's convention), so an element whose ``u`` lies within half
a step outside the grid already counts as clipped. The scale gradient is summed over every element
that shares the scale and multiplied by an optional gradient scale ``g``. LSQ recommends
``g = 1 / sqrt(N * qmax)`` (``N`` = elements per scale, see :func:`lsq_grad_scale`); the default is
``g = 1``, the convention of BRECQ's activation phase, for which its learning rates were tuned. The
zero-point gets no gradient (it stays fixed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from onnxq.recon import drop_mask, native
from onnxq.recon.batching import dot

__all__ = ["MIN_SCALE", "FakeQuant", "fake_quant", "lsq_grad_scale",
           "round_ste"]

#: Smallest step size a learnable scale may take (the forward clamps to it).
MIN_SCALE = 1e-8


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``torch.round`` (half to even, like ONNX) in the forward pass, identity gradient."""
    return _RoundSTE.apply(x)


def lsq_grad_scale(numel: int, qmax: int) -> float:
    """LSQ's gradient scale ``1 / sqrt(numel * qmax)`` (``numel`` = elements sharing one scale)."""
    return 1.0 / math.sqrt(max(numel, 1) * max(qmax, 1))


def _shape_for(p: torch.Tensor, ndim: int, axis: int | None) -> torch.Tensor:
    """Reshape a scale/zero-point so that it broadcasts against an ``ndim`` tensor along ``axis``."""
    if axis is None or p.dim() == 0:
        return p
    shape = [1] * ndim
    shape[axis] = -1
    return p.reshape(shape)


class _FakeQuantFn(torch.autograd.Function):
    """Few full-size passes: the CPU cost of fake quantization is memory traffic, not arithmetic.

    Forward: ``v = x / s``, ``t = clamp(v, qmin - z, qmax - z)``, ``c = round(t)`` (for integer bounds
    equal to ``clamp(round(v) + z, qmin, qmax) - z``, the ONNX value), ``out = c * s``. Saved for backward,
    only when a gradient needs it, as float tensors (no bool conversions): ``inside = 1[t == v]`` (the
    in-range mask) and ``local = c - v * inside`` (= round(v) - v inside, qmin - z / qmax - z outside),
    the LSQ derivative d out / d s. With one scale on a float32 CPU tensor the forward is one pass of
    :mod:`onnxq.recon.native`'s kernel where it runs: the same operations, the same bits.

    ``clip = (lo, hi)`` fuses a clip before the quantizer (a ReLU6: ``Clip -> Q -> DQ``): ``x`` becomes
    ``clamp(x, lo, hi) + 0`` (the ``+ 0`` makes a zero +0 whichever way a max of zeros picks) and ``inside``
    is multiplied by ``1[lo < x < hi]``, the clip's own gradient (torch's hardtanh backward). Saves the
    clip's forward and backward passes and its saved input.

    ``pad = ((top, bottom), (left, right))`` returns ``out`` zero-padded for the convolution that reads it
    (asymmetric "same" padding, which torch's convolutions cannot do themselves): the kernel writes into the
    padded tensor's interior, saving the pad's fill and copy passes; the backward copies the gradient's
    interior, as the pad's own backward does (the same bits).
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, grad_scale, keep, clip, pad):  # type: ignore[override]
        s = _shape_for(scale, x.dim(), axis)
        z = _shape_for(zero_point, x.dim(), axis)
        need_x, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        fused = None
        if axis is None:  # one scale: the one-pass kernel where it runs (same bits as the torch path)
            zf = float(z)  # an integer: qmin - z and qmax - z are exact in float32 as in the torch path
            fused = native.fake_quant_forward(x, keep, float(s), qmin - zf, qmax - zf, need_x, need_s, clip, pad)
        if fused is None and keep is not None and keep.dtype == torch.uint8:
            keep = drop_mask.unpack(keep, x)  # packed bits, for the torch operators
        if fused is None:
            out, inside, local = _forward_ops(x, s, z, qmin, qmax, keep, need_x, need_s, clip)
            if pad is not None:
                out = F.pad(out, _pad_list(pad))
        else:
            out, inside, local = fused
        ctx.save_for_backward(inside, local)
        ctx.params = (axis, grad_scale, tuple(scale.shape), pad, tuple(x.shape))
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        inside, local = ctx.saved_tensors
        axis, grad_scale, scale_shape, pad, shape = ctx.params
        if pad is not None:  # the interior, as the pad's own backward: a copy in the gradient's layout
            layout = torch.channels_last if drop_mask.channels_last_order(grad) else torch.contiguous_format
            grad = grad[:, :, pad[0][0]:pad[0][0] + shape[2], pad[1][0]:pad[1][0] + shape[3]]
            grad = grad.contiguous(memory_format=layout)
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            if axis is None:
                grad_s = dot(grad, local).reshape(scale_shape)
            else:
                dims = [d for d in range(grad.dim()) if d != axis]
                grad_s = (grad * local).sum(dim=dims).reshape(scale_shape)
            if grad_scale is not None:
                grad_s = grad_s * grad_scale
        return grad_x, grad_s, None, None, None, None, None, None, None, None


def _pad_list(pad: tuple[tuple[int, int], tuple[int, int]]) -> list[int]:
    """``((top, bottom), (left, right))`` as ``F.pad`` takes it (the last axis first)."""
    (top, bottom), (left, right) = pad
    return [left, right, top, bottom]


def _forward_ops(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int,
                 keep: torch.Tensor | None, need_inside: bool, need_local: bool,
                 clip: tuple[float, float] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(out, inside, local)`` of :class:`_FakeQuantFn`'s forward in torch operators (any scale shape,
    dtype or device); ``inside`` and ``local`` only where asked for."""
    clip_mask = None
    if clip is not None:
        if need_inside:
            clip_mask = ((x > clip[0]) & (x < clip[1])).to(x.dtype)
        x = torch.clamp(x, clip[0], clip[1]).add_(0.0)
    v = x / s
    t = torch.clamp(v, qmin - z, qmax - z)
    c = torch.round(t)
    out = c * s
    if keep is not None:  # QDrop: exactly x where keep == 1, exactly the quantized value where 0
        out = out.lerp_(x, keep)
    inside = local = None
    if need_inside or need_local:
        inside = t.eq_(v)  # t is not needed any more: reuse its memory for the 0/1 mask
    if need_local:
        local = c.sub_(v.mul_(inside))
        if keep is not None:
            local = local.addcmul_(local, keep, value=-1.0)  # kept-float elements do not depend on s
    if need_inside and keep is not None:
        inside = torch.maximum(inside, keep, out=inside)  # d out / d x = 1 where kept float
    if clip_mask is not None and inside is not None:
        inside = inside.mul_(clip_mask)
    return out, inside if need_inside else None, local


def _as_tensor(p: float | int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(p, dtype=like.dtype, device=like.device)


def fake_quant(x: torch.Tensor, scale: float | torch.Tensor, zero_point: int | torch.Tensor,
               qmin: int, qmax: int, axis: int | None = None, *,
               grad_scale: float | None = None, keep: torch.Tensor | None = None,
               clip: tuple[float, float] | None = None,
               pad: tuple[tuple[int, int], tuple[int, int]] | None = None) -> torch.Tensor:
    """ONNX ``DequantizeLinear(QuantizeLinear(x))`` with STE/LSQ gradients (see the module docstring).

    Args:
        x: float tensor.
        scale: positive step size, 0-d (per tensor) or 1-D of length ``x.shape[axis]``.
        zero_point: integer zero-point(s), same shape rules as ``scale`` (any dtype; integral values).
        qmin, qmax: the integer grid, e.g. [-128, 127], [0, 255], [-8, 7], or [-1, 1] (ternary).
        axis: channel axis for per-channel parameters (negative allowed); ignored for per-tensor ones.
        grad_scale: multiplies the scale gradient (LSQ's ``g``); None means 1.
        keep: optional 0/1 mask of ``x``'s shape and dtype (QDrop): where 1 the output is ``x`` itself
            (gradient 1 to ``x``, none to the scale), where 0 the quantized value. Fused into one pass.
            Or the same mask as packed bits (uint8, 1-D, in ``x``'s memory order; :mod:`.drop_mask`).
        clip: ``(lo, hi)`` of a clip (ReLU6) applied to ``x`` before the quantizer, fused into its pass:
            the same values and gradients as ``fake_quant(F.hardtanh(x, lo, hi), ...)``.
        pad: ``((top, bottom), (left, right))``: a 4-D ``x``'s output comes zero-padded (H, W), fused into
            the pass: the same values and gradients as ``F.pad(fake_quant(x, ...), ...)``.

    Returns:
        The fake-quantized tensor, same shape and dtype as ``x``.
    """
    s = _as_tensor(scale, x)
    z = _as_tensor(zero_point, x)
    if s.numel() == 1 and axis is None:
        s = s.reshape(())
        z = z.reshape(())
    if s.dim() > 1 or z.shape != s.shape:
        raise ValueError(f"scale {tuple(s.shape)}, zero_point {tuple(z.shape)}: need 0-d or one 1-D shape")
    ax = None
    if s.dim() == 1:
        if axis is None:
            raise ValueError("a per-channel scale needs an axis")
        ax = axis % x.dim()
        if x.shape[ax] != s.numel():
            raise ValueError(f"{s.numel()} scales for axis {axis} of a tensor of shape {tuple(x.shape)}")
    if keep is not None and keep.dtype == torch.uint8:
        if keep.dim() != 1 or keep.numel() * 8 < x.numel():
            raise ValueError(f"{keep.numel()} packed keep bytes cannot mask a tensor of {x.numel()} elements")
    elif keep is not None and (keep.shape != x.shape or keep.dtype != x.dtype):
        raise ValueError(f"keep mask {tuple(keep.shape)} {keep.dtype} != x {tuple(x.shape)} {x.dtype}")
    if clip is not None and not clip[0] <= clip[1]:
        raise ValueError(f"clip bounds {clip}: need lo <= hi")
    clip = None if clip is None else (float(clip[0]), float(clip[1]))
    if pad is not None:
        pad = ((int(pad[0][0]), int(pad[0][1])), (int(pad[1][0]), int(pad[1][1])))
        if x.dim() != 4 or min(min(pad[0]), min(pad[1])) < 0:
            raise ValueError(f"pad {pad}: needs a 4-D tensor and non-negative (top, bottom), (left, right)")
    return _FakeQuantFn.apply(x, s, z, int(qmin), int(qmax), ax, grad_scale, keep, clip, pad)


class FakeQuant(nn.Module):
    """Activation quantizer: an ONNX ``QuantizeLinear -> DequantizeLinear`` pair with explicit modes.

    Modes (plain attributes, set by the caller; nothing is initialised lazily):
        enabled: quantize (True) or pass ``x`` through unchanged (False).
        drop_prob: QDrop's random drop, used only in training mode. Per forward and per element,
            ``out = x`` (*left in float*) with probability ``drop_prob`` and ``x_hat`` otherwise, i.e.
            ``where(rand < drop_prob, x, x_hat)``. So ``drop_prob`` = 1 - p for the "quantized with
            probability p" of the QDrop description; at QDrop's default 0.5 the two readings coincide.
            0.0 (the default) = always quantize, as at export.
        learn_scale: the scale is an ``nn.Parameter`` whose ``requires_grad`` this flag mirrors (LSQ).
            The forward uses ``max(scale, MIN_SCALE)``, so a learned scale stays positive.
        trainable: whether a reconstruction may learn this step size at all (False for power-of-two or
            shared scales); the engine switches ``learn_scale`` on only where this is True.
        generator: optional ``torch.Generator`` for the drop masks (the engine sets one for
            reproducible runs); None uses torch's global generator.

    The zero-point is a fixed int64 buffer. ``fuses_clip`` / ``fuses_pad``: a
    :class:`~onnxq.torchify.BlockModule` may hand it the clip (ReLU6) before it and the zero padding of the
    convolution after it, ``forward(x, clip=(lo, hi), pad=((top, bottom), (left, right)))``, instead of
    running them.
    """

    fuses_clip = True
    fuses_pad = True

    def __init__(self, scale: float | torch.Tensor, zero_point: int | torch.Tensor, qmin: int, qmax: int,
                 axis: int | None = None, *, learn_scale: bool = False,
                 grad_scale: float | None = None) -> None:
        super().__init__()
        s = torch.as_tensor(scale, dtype=torch.float32).detach().clone()
        z = torch.as_tensor(zero_point).detach().clone().to(torch.int64)
        if s.numel() == 1 and axis is None:
            s, z = s.reshape(()), z.reshape(())
        if z.shape != s.shape or s.dim() > 1:
            raise ValueError(f"scale {tuple(s.shape)}, zero_point {tuple(z.shape)}: need 0-d or 1-D")
        if s.dim() == 1 and axis is None:
            raise ValueError("a per-channel scale needs an axis")
        if not bool(torch.all(s > 0)):
            raise ValueError("scales must be positive")
        if qmin >= qmax or bool(torch.any(z < qmin)) or bool(torch.any(z > qmax)):
            raise ValueError(f"bad grid [{qmin}, {qmax}] or zero-point outside it")
        self.scale = nn.Parameter(s, requires_grad=learn_scale)
        self.register_buffer("zero_point", z)
        self.qmin = int(qmin)
        self.qmax = int(qmax)
        self.axis = axis
        self.grad_scale = grad_scale
        self.enabled = True
        self.trainable = True
        self.drop_prob = 0.0
        self.generator: torch.Generator | None = None

    @property
    def learn_scale(self) -> bool:
        return self.scale.requires_grad

    @learn_scale.setter
    def learn_scale(self, value: bool) -> None:
        self.scale.requires_grad_(bool(value))

    def current_scale(self) -> torch.Tensor:
        """The step size the forward uses (clamped to ``MIN_SCALE``), detached: write this back."""
        return self.scale.detach().clamp_min(MIN_SCALE)

    def quantize(self, x: torch.Tensor, keep: torch.Tensor | None = None,
                 clip: tuple[float, float] | None = None,
                 pad: tuple[tuple[int, int], tuple[int, int]] | None = None) -> torch.Tensor:
        """Fake-quantize ``x`` regardless of ``enabled`` and training mode (``keep``, ``clip``, ``pad``: see
        fake_quant)."""
        s = self.scale.clamp_min(MIN_SCALE)
        return fake_quant(x, s, self.zero_point.to(x.dtype), self.qmin, self.qmax, self.axis,
                          grad_scale=self.grad_scale, keep=keep, clip=clip, pad=pad)

    def forward(self, x: torch.Tensor, clip: tuple[float, float] | None = None,
                pad: tuple[tuple[int, int], tuple[int, int]] | None = None) -> torch.Tensor:
        """``x`` fake-quantized (see the modes); ``clip``: a clip (ReLU6) before the quantizer, ``pad``: the
        zero padding of the convolution after it, both fused (see fake_quant)."""
        if not self.enabled:
            y = x if clip is None else F.hardtanh(x, clip[0], clip[1])
            return y if pad is None else F.pad(y, _pad_list(pad))
        keep = None
        if self.training and self.drop_prob > 0.0:
            keep = drop_mask.drop_keep(x, self.drop_prob, generator=self.generator)
        return self.quantize(x, keep, clip, pad)

    def extra_repr(self) -> str:
        kind = "per-tensor" if self.scale.dim() == 0 else f"per-channel axis={self.axis}"
        return (f"[{self.qmin}, {self.qmax}], {kind}, enabled={self.enabled}, drop_prob={self.drop_prob}, "
                f"learn_scale={self.learn_scale}")
