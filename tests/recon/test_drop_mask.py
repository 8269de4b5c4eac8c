"""QDrop's packed drop masks: fair seeded bits, unpacked in the masked tensor's memory order."""

from __future__ import annotations

import pytest
import torch

from onnxq.recon.drop_mask import bernoulli_like, drop_keep, random_bits, unpack
from onnxq.recon.fake_quant import fake_quant


def test_random_bits_are_fair_seeded_and_sized() -> None:
    a = random_bits(100_001, generator=torch.Generator().manual_seed(0))
    b = random_bits(100_001, generator=torch.Generator().manual_seed(0))
    c = random_bits(100_001, generator=torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == (12_501,) and torch.equal(a, b) and not torch.equal(a, c)
    ones = unpack(a, torch.empty(100_001))
    assert abs(float(ones.mean()) - 0.5) < 0.01
    per_bit = torch.stack([(a >> k) & 1 for k in range(8)]).float().mean(dim=1)  # no biased bit position
    assert bool((per_bit - 0.5).abs().lt(0.02).all())


def test_unpack_follows_memory_order() -> None:
    bits = torch.tensor([0b0000_0101, 0b1000_0000, 0b1], dtype=torch.uint8)  # elements 0, 2, 15, 16 set
    nchw = torch.empty(1, 3, 2, 3)
    m = unpack(bits, nchw)
    assert m.is_contiguous() and m.reshape(-1).nonzero().flatten().tolist() == [0, 2, 15, 16]
    cl = nchw.contiguous(memory_format=torch.channels_last)
    m = unpack(bits, cl)
    assert m.is_contiguous(memory_format=torch.channels_last)
    nhwc = m.permute(0, 2, 3, 1).reshape(-1)  # memory order of a channels-last tensor
    assert nhwc.nonzero().flatten().tolist() == [0, 2, 15, 16]
    with pytest.raises(ValueError, match="cannot mask"):
        unpack(bits[:2], cl)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_packed_keep_is_the_float_mask(layout: str) -> None:
    """fake_quant with the packed bits equals fake_quant with their unpacked floats (the same draw)."""
    x = torch.randn(3, 5, 7, 9, generator=torch.Generator().manual_seed(2)) * 3
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    packed = drop_keep(x, 0.5, generator=torch.Generator().manual_seed(9))
    floats = bernoulli_like(x, 0.5, generator=torch.Generator().manual_seed(9))
    assert packed.dtype == torch.uint8 and torch.equal(unpack(packed, x), floats)
    a = fake_quant(x, 0.2, 3, 0, 15, keep=packed)
    b = fake_quant(x, 0.2, 3, 0, 15, keep=floats)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert drop_keep(x, 0.3, generator=torch.Generator().manual_seed(9)).dtype == x.dtype  # other p: floats
    with pytest.raises(ValueError, match="packed keep bytes"):
        fake_quant(x, 0.2, 3, 0, 15, keep=packed[:10])
