"""Giving freed memory back to the operating system between the steps of a run.

glibc's allocator keeps freed heap memory for reuse, and after a large block is freed it raises its
``mmap`` threshold, so later arrays of up to 32 MB come from the heap too: a run that builds and drops
large arrays (weights, their codes, serialized models) keeps their pages resident long after use and
its peak grows by whatever the next step allocates. :func:`trim` (``malloc_trim``, well under a
millisecond) returns the free pages at the end of each pass and before onnxruntime sessions are built;
:func:`collect` first runs the garbage collector (graphsurgeon graphs are reference cycles: a dropped
graph's arrays are freed only then; about 0.1 s), where a run drops a whole graph. Elsewhere than glibc
only the collection runs.

The torch engine is the opposite case: every training step allocates and frees the same activation
tensors, tens of MB each. Above the ``mmap`` threshold each one is a fresh mapping whose pages fault in
one by one when first written: on a 2-core AVX2 machine a clamp over a 100 MB tensor takes 44 ms that
way and 7 ms on reused pages, a depthwise convolution 46 ms against 9 ms. :func:`reuse_freed` raises the
threshold for the engine's duration, so freed tensors are reused from the heap, and turns off glibc's
trimming on ``free``: a 112x112 block's step frees several 77 MB tensors at the top of the heap, more
than any trim threshold a step's working set stays under, and each trim made the next step fault those
pages in again (1.7 million faults in 60 steps of EfficientNet-Lite0's first block; its step 1.3x
slower). The caller gives the pages back where a unit of work ends (:func:`trim` between blocks); on
exit :func:`reuse_freed` trims and sets the thresholds where glibc's dynamic ones settle.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Iterator
from contextlib import contextmanager

#: Tensors below this size come from the heap while :func:`reuse_freed` is on (the largest training
#: tensors of a CNN block at batch 16 are under 100 MB; larger arrays still get their own mapping).
REUSE_BELOW_BYTES = 256 << 20
# mallopt parameters (glibc malloc.h). Setting one ends glibc's dynamic threshold, so the exit values
# are where the dynamic one settles once large blocks have been freed (32 MB, trim at twice that).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_AFTER_MMAP, _AFTER_TRIM = 32 << 20, 64 << 20
#: the largest trim threshold mallopt takes (an int): ``free`` then never trims a heap this size
_NEVER_TRIM = (1 << 31) - 1


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def trim() -> None:
    """Return the allocator's free memory to the operating system (glibc; elsewhere nothing)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def collect() -> None:
    """Free unreachable cycles (a dropped graph), then :func:`trim`."""
    gc.collect()
    trim()


@contextmanager
def reuse_freed(limit: int = REUSE_BELOW_BYTES) -> Iterator[None]:
    """Within the block, freed allocations below ``limit`` bytes stay in the heap for reuse and ``free``
    does not trim the heap (glibc; elsewhere nothing): call :func:`trim` where a unit of work ends. On
    exit the free pages go back to the system and the thresholds are set where glibc's dynamic ones
    settle."""
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, int(limit))
    libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP)
        libc.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM)
        trim()
