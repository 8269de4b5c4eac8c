"""Mini-batches of cached block tensors, in the memory layout the torch kernels run fastest on.

A batch is ``tensor[idx]`` cast to float32 (caches may hold float16). 4-D float tensors (NCHW
activations) come out *channels-last* (NHWC strides, same shape and values): oneDNN's depthwise
convolution runs its forward and backward 2 to 3 times faster on them on a CPU (docs/defaults.md), and every
following op keeps the layout, so the block's elementwise work (ReLU6, fake quantization, the loss)
reads its operands in one order. The cast and the layout change are one copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["cache_layout", "dot", "take_batch"]


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


def take_batch(seq: Sequence[torch.Tensor], idx: torch.Tensor) -> list[torch.Tensor]:
    """``[t[idx] as float32, channels-last when 4-D]`` for float tensors; other dtypes only indexed."""
    out = []
    for t in seq:
        part = t[idx]
        if part.is_floating_point():
            layout = torch.channels_last if part.dim() == 4 else torch.contiguous_format
            part = part.to(dtype=torch.float32, memory_format=layout)
        out.append(part)
    return out
