"""Where a reconstruction's time goes: seconds per named phase, summed over a run.

On a CPU torch runs synchronously, so the wall time around a call is the call's work. On CUDA kernels
run asynchronously: the device's time lands in whichever phase next waits for a result.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Stopwatch"]


class Stopwatch:
    """Accumulated seconds per phase name (``with watch("forward"): ...``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def add(self, other: Stopwatch | dict[str, float]) -> None:
        """Add another watch's (or a dict's) seconds into this one."""
        for phase, value in (other.seconds if isinstance(other, Stopwatch) else other).items():
            self.seconds[phase] = self.seconds.get(phase, 0.0) + value

    def rounded(self, digits: int = 2) -> dict[str, float]:
        return {k: round(v, digits) for k, v in self.seconds.items()}
