"""Mini-batches of cached block tensors, in the memory layout the torch kernels run fastest on.

A batch is ``tensor[idx]`` cast to float32 (caches may hold float16). 4-D float tensors (NCHW
activations) come out *channels-last* (NHWC strides, same shape and values): oneDNN's depthwise
convolution runs its forward and backward 2 to 3 times faster on them on a CPU (docs/defaults.md), and every
following op keeps the layout, so the block's elementwise work (ReLU6, fake quantization, the loss)
reads its operands in one order. The cast and the layout change are one copy, and on a CPU the native
kernel (:func:`onnxq.recon.native.take_rows`) makes the index and the cast one pass too.

QDrop's block input mixes two caches element by element: the float model's input with probability ``p``,
else the input quantized so far (:func:`take_mixed`); at ``p = 1/2`` the choice is packed random bits
(:mod:`onnxq.recon.drop_mask`), which the native kernel reads while it gathers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from onnxq.recon import drop_mask, native

__all__ = ["cache_layout", "dot", "take_batch", "take_mixed"]


def cache_layout(t: torch.Tensor) -> torch.Tensor:
    """A cached tensor laid out as :func:`take_batch` hands it out (channels-last when 4-D float), so
    that taking a batch is an index and a cast, not a transposing copy every step."""
    if t.is_floating_point() and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum(a * b)`` over all elements of two same-shape tensors, without the copy that
    ``reshape(-1)`` makes of a channels-last tensor: both are read in memory order when they share
    their strides (the common case: a gradient laid out like the activation it belongs to)."""
    if a.shape != b.shape:
        raise ValueError(f"dot of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() == 4 and a.stride() == b.stride() and a.is_contiguous(memory_format=torch.channels_last):
        return torch.dot(a.permute(0, 2, 3, 1).reshape(-1), b.permute(0, 2, 3, 1).reshape(-1))
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    fast = native.take_rows(t, idx) if t.is_floating_point() else None
    if fast is not None:
        return fast
    part = t[idx]
    if part.is_floating_point():
        layout = torch.channels_last if part.dim() == 4 else torch.contiguous_format
        part = part.to(dtype=torch.float32, memory_format=layout)
    return part


def take_batch(seq: Sequence[torch.Tensor], idx: torch.Tensor) -> list[torch.Tensor]:
    """``[t[idx] as float32, channels-last when 4-D]`` for float tensors; other dtypes only indexed."""
    return [_take(t, idx) for t in seq]


def take_mixed(quantized: Sequence[torch.Tensor], floating: Sequence[torch.Tensor], idx: torch.Tensor, p: float,
               generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """QDrop's block inputs: per element of each float pair, ``floating[idx]`` with probability ``p``, else
    ``quantized[idx]`` (float32, laid out as :func:`take_batch`); integer inputs (token ids, masks) carry no
    quantization error and are taken from ``quantized`` as they are. One draw from ``generator`` per float
    pair, in order."""
    out = []
    for q, f in zip(quantized, floating, strict=True):
        if not f.is_floating_point():
            out.append(_take(q, idx))
            continue
        if p != 0.5:
            qb = _take(q, idx)
            out.append(torch.lerp(qb, _take(f, idx), drop_mask.bernoulli_like(qb, p, generator=generator)))
            continue
        numel = int(idx.numel()) * (q.numel() // max(int(q.shape[0]), 1))
        bits = drop_mask.random_bits(numel, generator=generator, device=q.device)
        mixed = native.take_rows(q, idx, f, bits)
        if mixed is None:
            qb = _take(q, idx)
            mixed = torch.where(drop_mask.unpack(bits, qb).bool(), _take(f, idx), qb)
        out.append(mixed)
    return out
