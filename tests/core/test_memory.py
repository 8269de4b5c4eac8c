"""core.memory: freed engine tensors are reused from the heap, not mapped and faulted in anew."""

from __future__ import annotations

import resource

import pytest
import torch

from onnxq.core import memory

pytestmark = pytest.mark.skipif(memory._libc() is None, reason="glibc's mallopt/malloc_trim are absent")

_MB = 1 << 20


def _touch(count: int, size: int) -> list[torch.Tensor]:
    # torch tensors, as the engine's (numpy asks for transparent huge pages on large arrays)
    arrays = [torch.empty(size, dtype=torch.uint8) for _ in range(count)]
    for a in arrays:
        a.fill_(1)  # every page written, as a training tensor is
    return arrays


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_freed_tensors_are_reused_without_page_faults() -> None:
    # A step's working set: three 96 MB tensors, more than glibc's trim threshold could keep if free()
    # trimmed (256 MB then: each step faulted them all in again). After a step or two of settling
    # (a small allocation may land between them), steps find their pages resident.
    faulted = []
    with memory.reuse_freed():
        for _ in range(4):
            before = _faults()
            arrays = _touch(3, 96 * _MB)
            faulted.append(_faults() - before)
            del arrays
    assert faulted[-1] < (96 * _MB // 4096) // 10, f"page faults per step: {faulted}"


def test_trim_hands_the_pages_back() -> None:
    with memory.reuse_freed():
        arrays = _touch(2, 96 * _MB)
        del arrays
        memory.trim()
        before = _faults()
        arrays = _touch(1, 96 * _MB)
        faulted = _faults() - before
        del arrays
    assert faulted > (96 * _MB // 4096) // 2  # given back: the next tensor faults its pages in again


def test_thresholds_are_set_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []

    class FakeLibc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

        def malloc_trim(self, pad: int) -> int:
            calls.append(("trim", pad))
            return 1

    monkeypatch.setattr(memory, "_libc", lambda: FakeLibc())
    with memory.reuse_freed(limit=100 * _MB):
        assert calls == [(memory._M_MMAP_THRESHOLD, 100 * _MB), (memory._M_TRIM_THRESHOLD, memory._NEVER_TRIM)]
    assert calls[2:] == [(memory._M_MMAP_THRESHOLD, memory._AFTER_MMAP),
                         (memory._M_TRIM_THRESHOLD, memory._AFTER_TRIM), ("trim", 0)]
