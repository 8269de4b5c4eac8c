"""QDrop's random drop masks as packed bits.

At QDrop's drop probability of 1/2 every element of a mask is one fair random bit. They are drawn as
full-range 64-bit integers from a seeded ``torch.Generator`` (one draw per 64 elements, about 4x cheaper
on a CPU than a byte per 8 elements and 30x cheaper than ``rand(shape) < p``) and kept packed: element
``i`` of a tensor, counted in its memory order (NHWC for a channels-last 4-D tensor, row-major otherwise),
is bit ``i % 8`` (least significant first) of byte ``i // 8``. The native kernels
(:mod:`onnxq.recon.native`) read the bits as they are; the torch path unpacks them into a 0/1 float
tensor laid out like the tensor it masks, by one table lookup per byte. Both see the same bits, so a
run's results do not depend on which path ran.
"""

from __future__ import annotations

import torch

__all__ = ["bernoulli_like", "bernoulli_mask", "channels_last_order", "drop_keep", "random_bits", "unpack"]

_BIT_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def random_bits(numel: int, *, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """``ceil(numel / 8)`` bytes (uint8, 1-D) of independent fair random bits."""
    words = torch.empty((numel + 63) // 64, dtype=torch.int64, device=device)
    words.random_(-(2 ** 63), None, generator=generator)  # the full 64-bit range
    return words.view(torch.uint8)[: (numel + 7) // 8]


def _bit_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(256, 8): row ``b`` holds the 8 bits of byte ``b`` as 0/1 values, least significant first."""
    table = _BIT_TABLES.get((device, dtype))
    if table is None:
        bits = torch.bitwise_right_shift(torch.arange(256).unsqueeze(1), torch.arange(8)).bitwise_and_(1)
        table = _BIT_TABLES[(device, dtype)] = bits.to(device=device, dtype=dtype)
    return table


def channels_last_order(x: torch.Tensor) -> bool:
    """Whether ``x``'s memory order is NHWC (a channels-last 4-D tensor that is not also row-major)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def unpack(bits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The 0/1 mask of ``bits`` with ``like``'s shape, dtype and device, laid out like ``like`` (see the
    module docstring for the order)."""
    n = like.numel()
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() * 8 < n:
        raise ValueError(f"{bits.numel()} packed {bits.dtype} bytes cannot mask {n} elements")
    flat = _bit_table(like.device, like.dtype).index_select(0, bits.to(like.device).long()).reshape(-1)[:n]
    if channels_last_order(like):
        b, c, h, w = like.shape
        return flat.reshape(b, h, w, c).permute(0, 3, 1, 2)
    return flat.reshape(like.shape)


def bernoulli_mask(shape: torch.Size | tuple[int, ...], p: float, *, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 0/1 float tensor with ``P(1) = p`` per element (independent), row-major.

    ``p = 0.5`` (QDrop's default) unpacks :func:`random_bits` (several times cheaper
    on a CPU than ``rand(shape) < p``, which every other ``p`` uses; float masks, because torch's CPU
    kernels mixing float and bool operands are 2 to 6 times slower than float ones). Deterministic for a
    seeded ``generator``.
    """
    device = torch.device(device)
    if p != 0.5:
        return torch.rand(shape, generator=generator, device=device, dtype=dtype).lt_(p)
    like = torch.empty(shape, device=device, dtype=dtype)
    return unpack(random_bits(like.numel(), generator=generator, device=device), like)


def bernoulli_like(x: torch.Tensor, p: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """:func:`bernoulli_mask` with ``x``'s shape, dtype and device, laid out like ``x``: for a channels-last
    4-D ``x`` the mask is drawn in NHWC order and viewed as NCHW, so elementwise ops on the pair run in one
    memory order (a mixed-layout ``lerp`` is several times slower on a CPU)."""
    if p == 0.5:
        return unpack(random_bits(x.numel(), generator=generator, device=x.device), x)
    if channels_last_order(x):
        n, c, h, w = x.shape
        nhwc = bernoulli_mask((n, h, w, c), p, generator=generator, device=x.device, dtype=x.dtype)
        return nhwc.permute(0, 3, 1, 2)
    return bernoulli_mask(x.shape, p, generator=generator, device=x.device, dtype=x.dtype)


def drop_keep(x: torch.Tensor, p: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """QDrop's keep mask for ``x`` as :func:`fake_quant` takes it: packed bits at ``p = 0.5`` (what the
    one-pass kernel reads; :mod:`onnxq.recon.drop_mask`), else the float mask of :func:`bernoulli_like`.
    Both draw the same bits from ``generator`` as :func:`bernoulli_like`."""
    if p == 0.5:
        return random_bits(x.numel(), generator=generator, device=x.device)
    return bernoulli_like(x, p, generator=generator)
