"""Giving freed memory back to the operating system between the steps of a run.

glibc's allocator keeps freed heap memory for reuse, and after a large block is freed it raises its
``mmap`` threshold, so later arrays of up to 32 MB come from the heap too: a run that builds and drops
large arrays (weights, their codes, serialized models) keeps their pages resident long after use and
its peak grows by whatever the next step allocates. :func:`trim` (``malloc_trim``, well under a
millisecond) returns the free pages at the end of each pass and before onnxruntime sessions are built;
:func:`collect` first runs the garbage collector (graphsurgeon graphs are reference cycles: a dropped
graph's arrays are freed only then; about 0.1 s), where a run drops a whole graph. Elsewhere than glibc
only the collection runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def trim() -> None:
    """Return the allocator's free memory to the operating system (glibc; elsewhere nothing)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def collect() -> None:
    """Free unreachable cycles (a dropped graph), then :func:`trim`."""
    gc.collect()
    trim()
