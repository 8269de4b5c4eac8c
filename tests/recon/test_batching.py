"""Mini-batches in channels-last layout: same values as NCHW, masks and dot products in memory order."""

from __future__ import annotations

import pytest
import torch

from onnxq.recon.batching import cache_layout, dot, take_batch
from onnxq.recon.drop_mask import bernoulli_like, bernoulli_mask
from onnxq.recon.fake_quant import FakeQuant


def _channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def test_take_batch_values_dtype_and_layout() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(10, 3, 5, 7, generator=gen).half()
    vectors = torch.randn(10, 4, generator=gen)
    labels = torch.arange(10)
    idx = torch.tensor([7, 2, 2, 9])
    for cached in (images, cache_layout(images)):
        x, v, lab = take_batch([cached, vectors, labels], idx)
        assert x.dtype == torch.float32 and _channels_last(x)
        torch.testing.assert_close(x, images[idx].float(), rtol=0, atol=0)
        assert v.dtype == torch.float32 and v.is_contiguous()
        torch.testing.assert_close(v, vectors[idx], rtol=0, atol=0)
        assert lab.dtype == torch.int64 and lab.tolist() == [7, 2, 2, 9]
    assert _channels_last(cache_layout(images)) and cache_layout(vectors) is vectors


@pytest.mark.parametrize("layouts", [("cl", "cl"), ("cl", "nchw"), ("nchw", "nchw")])
def test_dot_in_any_layout(layouts: tuple[str, str]) -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 4, 5, generator=gen), torch.randn(2, 3, 4, 5, generator=gen)
    expected = float((a.double() * b.double()).sum())
    pair = [t.contiguous(memory_format=torch.channels_last) if kind == "cl" else t
            for t, kind in zip((a, b), layouts, strict=True)]
    assert float(dot(*pair)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="dot of shapes"):
        dot(a, b[:1])


def test_bernoulli_like_follows_the_layout() -> None:
    x = torch.zeros(4, 6, 8, 9).contiguous(memory_format=torch.channels_last)
    m1 = bernoulli_like(x, 0.5, generator=torch.Generator().manual_seed(3))
    m2 = bernoulli_like(x, 0.5, generator=torch.Generator().manual_seed(3))
    assert m1.shape == x.shape and _channels_last(m1) and torch.equal(m1, m2)
    assert set(m1.unique().tolist()) == {0.0, 1.0} and 0.4 < float(m1.mean()) < 0.6
    plain = bernoulli_like(x.contiguous(), 0.3, generator=torch.Generator().manual_seed(3))
    assert plain.is_contiguous()
    assert torch.equal(plain, bernoulli_mask(x.shape, 0.3, generator=torch.Generator().manual_seed(3)))


def test_fake_quant_gradients_do_not_depend_on_the_layout() -> None:
    """The per-tensor LSQ gradient (a dot product over the whole tensor) and the drop mask's effect are
    the same for an NCHW and a channels-last input: only the memory order differs."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 6, 6, generator=gen) * 2
    g = torch.randn(2, 3, 6, 6, generator=gen)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        fq = FakeQuant(0.1, 3, 0, 15)
        fq.learn_scale = True
        xi = x.clone(memory_format=layout).requires_grad_()
        (fq(xi) * g.contiguous(memory_format=layout)).sum().backward()
        results.append((fq.scale.grad.clone(), xi.grad.contiguous()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
