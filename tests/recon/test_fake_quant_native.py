"""The one-pass fake-quantization kernel: the same bits as the torch operators, or no kernel at all."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
import torch

from onnxq.recon import fake_quant, native
from onnxq.recon.batching import cache_layout, take_batch, take_mixed
from onnxq.recon.drop_mask import bernoulli_like, drop_keep
from tests.recon.test_fake_quant import _test_data

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the torch path is all there is")

# (qmin, qmax, zero point)
GRIDS = {"uint4": (0, 15, 3), "int4": (-8, 7, 0), "uint8": (0, 255, 128), "int8": (-128, 127, 0)}


def _run(x: torch.Tensor, keep: torch.Tensor | None, scale: float, zp: int, qmin: int, qmax: int,
         grad_x: bool, grad_s: bool, seed: int):
    """Output, and the gradients of a fixed random loss, for a fresh leaf copy of x and the scale."""
    xl = x.detach().clone().requires_grad_(grad_x)
    if x.dim() == 4:
        xl = xl.detach().contiguous(memory_format=torch.channels_last).requires_grad_(grad_x)
    s = torch.tensor(scale, dtype=torch.float32, requires_grad=grad_s)
    out = fake_quant(xl, s, zp, qmin, qmax, keep=keep)
    if grad_x or grad_s:
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
        (out * weights).sum().backward()
    return out.detach(), xl.grad, s.grad


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("shape", [(3, 40, 33, 35), (5, 300), (70001,)])
@pytest.mark.parametrize("qdrop", ["none", "float", "bits"])
@pytest.mark.parametrize("grads", [(True, True), (True, False), (False, True), (False, False)])
def test_kernel_gives_the_torch_paths_bits(grid: str, shape: tuple[int, ...], qdrop: str,
                                          grads: tuple[bool, bool], monkeypatch: pytest.MonkeyPatch) -> None:
    qmin, qmax, zp = GRIDS[grid]
    scale = 0.0371
    rng = np.random.default_rng(7)
    x = torch.from_numpy(_test_data(rng, shape, np.array(scale, np.float32), np.array(zp), None, qmin, qmax))
    keep = _keep(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x, qdrop)
    fused = _run(x, keep, scale, zp, qmin, qmax, *grads, seed=11)
    monkeypatch.setenv("ONNXQ_NATIVE", "0")
    plain = _run(x, keep, scale, zp, qmin, qmax, *grads, seed=11)
    for a, b in zip(fused, plain):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.stride() == b.stride()
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))  # bits, signed zeros included


def test_kernel_runs_and_declines_what_it_cannot_do() -> None:
    x = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    out, inside, local = native.fake_quant_forward(x, None, 0.05, -8.0, 7.0, True, False)
    assert out.is_contiguous(memory_format=torch.channels_last) and inside is not None and local is None
    assert native.fake_quant_forward(x[:, :, ::2], None, 0.05, -8.0, 7.0, True, True) is None  # strided view
    assert native.fake_quant_forward(x.double(), None, 0.05, -8.0, 7.0, True, True) is None
    plain_keep = torch.ones(4, 8, 5, 5)  # row-major mask for a channels-last tensor
    assert native.fake_quant_forward(x, plain_keep, 0.05, -8.0, 7.0, True, True) is None
    assert native.fake_quant_forward(x, torch.zeros(99, dtype=torch.uint8), 0.05, -8.0, 7.0, True, True) is None
    assert native.fake_quant_forward(x, torch.zeros(100, dtype=torch.uint8), 0.05, -8.0, 7.0, True, True) is not None


def _halves(rng: np.random.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """float16 values with the cases a conversion gets wrong: signed zeros, subnormals, infinities, the extremes."""
    x = rng.standard_normal(shape).astype(np.float16)
    flat = x.reshape(-1)
    special = np.array([0.0, -0.0, 6e-8, -6e-8, 3e-5, np.inf, -np.inf, 65504.0, -65504.0], np.float16)
    flat[: special.size] = special
    return torch.from_numpy(x)


@pytest.mark.parametrize("shape", [(9, 3, 5, 7), (9, 13), (9, 40, 4, 4)])
@pytest.mark.parametrize("dtypes", [("f16", "f16"), ("f32", "f32"), ("f16", "f32")])
def test_take_rows_gives_the_torch_paths_bits(shape: tuple[int, ...], dtypes: tuple[str, str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Gather + cast (+ QDrop's mix of two caches) in one pass equals index, cast and torch.where, bit for bit,
    for rows whose length is not a multiple of 8 and bits that start mid-byte."""
    rng = np.random.default_rng(5)
    q, f = _halves(rng, shape), _halves(rng, shape)
    q = q.float() if dtypes[0] == "f32" else q
    f = f.float() if dtypes[1] == "f32" else f
    q, f = cache_layout(q), cache_layout(f)
    idx = torch.tensor([8, 0, 3, 3, 7])
    gen = torch.Generator().manual_seed(1)
    fused_take = take_batch([q], idx)[0]
    fused_mix = take_mixed([q], [f], idx, 0.5, gen)[0]
    assert native.take_rows(q, idx) is not None
    monkeypatch.setenv("ONNXQ_NATIVE", "0")
    gen = torch.Generator().manual_seed(1)
    plain_take = take_batch([q], idx)[0]
    plain_mix = take_mixed([q], [f], idx, 0.5, gen)[0]
    for a, b in ((fused_take, plain_take), (fused_mix, plain_mix)):
        assert a.stride() == b.stride() and a.dtype == b.dtype == torch.float32
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert torch.equal(plain_take.view(torch.int32), q[idx].float().view(torch.int32))
    from_fp = (plain_mix.view(torch.int32) == f[idx].float().view(torch.int32))
    from_q = (plain_mix.view(torch.int32) == plain_take.view(torch.int32))
    assert bool((from_fp | from_q).all()) and 0.3 < float((from_fp & ~from_q).float().mean()) < 0.7


def test_take_rows_declines_and_refuses() -> None:
    q = torch.randn(6, 4, 3, 3).half()  # a row-major 4-D cache: the batch must come out channels-last
    idx = torch.tensor([1, 2])
    assert native.take_rows(q, idx) is None
    cl = cache_layout(q)
    assert native.take_rows(cl.double(), idx) is None and native.take_rows(cl, idx.int()) is None
    with pytest.raises(IndexError, match="out of range"):
        native.take_rows(cl, torch.tensor([6]))
    with pytest.raises(ValueError, match="cannot mask"):
        native.take_rows(cl, idx, cl, torch.zeros(1, dtype=torch.uint8))


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNXQ_NATIVE", "0")
    assert not native.available()
    assert native.fake_quant_forward(torch.randn(10), None, 0.1, 0.0, 15.0, True, True) is None


def test_compiled_once_into_the_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNXQ_CACHE_DIR", str(tmp_path))
    first = native._compile(native.compiler(), native._flags())
    stamp = first.stat().st_mtime_ns
    assert first.parent == tmp_path / "native" and first.suffix == ".so"
    assert native._compile(native.compiler(), native._flags()) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary file left behind


def _quantize_in_child(queue) -> None:
    # numpy only besides the kernel: torch's own OpenMP threads do not survive a fork either
    x = np.linspace(-3.0, 3.0, 300_000, dtype=np.float32)
    out, _, _ = native.fake_quant_forward(torch.from_numpy(x), None, 0.5, -8.0, 7.0, False, False)
    expected = np.clip(np.round(x / np.float32(0.5)), -8, 7) * np.float32(0.5)
    queue.put(bool(np.array_equal(out.numpy(), expected)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_gets_its_own_threads() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # chunks on two threads: the parent has a pool for the child to inherit
    try:
        x = torch.from_numpy(np.linspace(-1.0, 1.0, 300_000, dtype=np.float32))
        assert native.fake_quant_forward(x, None, 0.5, -8.0, 7.0, False, False) is not None
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_quantize_in_child, args=(queue,))
        child.start()
        child.join(timeout=60)
    finally:
        torch.set_num_threads(threads)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung on its parent's thread pool")
    assert child.exitcode == 0 and queue.get(timeout=5)


def _keep(x: torch.Tensor, qdrop: str) -> torch.Tensor | None:
    """QDrop's keep mask for x: none, floats, or packed bits (read by the kernel as they are, unpacked for
    the torch path), the same draw."""
    if qdrop == "float":
        return bernoulli_like(x, 0.5, generator=torch.Generator().manual_seed(3))
    if qdrop == "bits":
        return drop_keep(x, 0.5, generator=torch.Generator().manual_seed(3))
    return None


def _fused_against_unfused(x: torch.Tensor, keep: torch.Tensor | None, fused, unfused,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Output, input gradient and scale gradient of ``fused(x, s, keep)``: the kernel's bits equal the torch
    path's, and their values equal ``unfused(x, s, keep)``'s (zeros of either sign compare equal)."""
    shape = fused(x, torch.tensor(0.03), keep).shape
    weights = torch.randn(shape, generator=torch.Generator().manual_seed(1))

    def run(fn):
        xl = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        s = torch.tensor(0.03, requires_grad=True)
        out = fn(xl, s, keep)
        (out * weights).sum().backward()
        return out.detach(), xl.grad, s.grad

    kernel, reference = run(fused), run(unfused)
    monkeypatch.setenv("ONNXQ_NATIVE", "0")
    plain = run(fused)
    for a, b, c in zip(kernel, plain, reference, strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
        assert torch.equal(a, c)


def _test_input(layout: str) -> torch.Tensor:
    x = torch.randn(3, 16, 9, 11, generator=torch.Generator().manual_seed(8)) * 4
    x.view(-1)[:6] = torch.tensor([0.0, -0.0, 6.0, -1e-30, 6.0000005, float("inf")])
    return x.contiguous(memory_format=torch.channels_last) if layout == "cl" else x


@pytest.mark.parametrize("qdrop", ["none", "float", "bits"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_fused_clip_is_the_clips_numbers_on_both_paths(qdrop: str, layout: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """fake_quant(x, clip=(0, 6)) is fake_quant(hardtanh(x, 0, 6))."""
    x = _test_input(layout)
    _fused_against_unfused(
        x, _keep(x, qdrop), lambda t, s, k: fake_quant(t, s, 7, 0, 255, keep=k, clip=(0.0, 6.0)),
        lambda t, s, k: fake_quant(torch.nn.functional.hardtanh(t, 0.0, 6.0), s, 7, 0, 255, keep=k), monkeypatch)
    with pytest.raises(ValueError, match="clip bounds"):
        fake_quant(x, 0.03, 7, 0, 255, clip=(6.0, 0.0))


@pytest.mark.parametrize("qdrop", ["none", "float", "bits"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("pad", [((0, 1), (0, 1)), ((1, 2), (2, 0))])
def test_fused_pad_is_the_pads_numbers_on_both_paths(qdrop: str, layout: str, pad: tuple,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """fake_quant(x, pad=...) is F.pad(fake_quant(x), ...), a fused clip too (the kernel writes into the
    padded tensor by rows); the gradient bits are those of the pad's own backward."""
    x = _test_input(layout)
    (top, bottom), (left, right) = pad
    _fused_against_unfused(
        x, _keep(x, qdrop), lambda t, s, k: fake_quant(t, s, 7, 0, 255, keep=k, clip=(0.0, 6.0), pad=pad),
        lambda t, s, k: torch.nn.functional.pad(fake_quant(t, s, 7, 0, 255, keep=k, clip=(0.0, 6.0)),
                                                [left, right, top, bottom]), monkeypatch)
    assert fake_quant(x, 0.03, 7, 0, 255, pad=pad).shape == (3, 16, 9 + top + bottom, 11 + left + right)
    with pytest.raises(ValueError, match="non-negative"):
        fake_quant(x, 0.03, 7, 0, 255, pad=((0, -1), (0, 1)))
