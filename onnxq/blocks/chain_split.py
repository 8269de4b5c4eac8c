"""How a run of plain layers (no shortcut between them) is split into chain blocks.

A run of ``n`` weighted ops becomes ``ceil(n / max_chain)`` chains of at most ``max_chain`` ops
(MQBench's rule, 3). Both rules return the group sizes in units (a unit: one plain region with the
weight-free regions attached to it, usually one weighted op):

* :func:`narrowest_split`: the cuts whose tensors hold the fewest elements per sample in all, so an
  inverted residual without a shortcut ends at its narrow projection, not at the next block's wide
  expansion (BRECQ's blocks; the engine computes a block's loss and carries its inputs there);
* :func:`even_split`: the groups as even as the units allow, larger first (5 -> 3 + 2, 4 -> 2 + 2,
  7 -> 3 + 2 + 2), where a cut tensor's size is unknown.
"""

from __future__ import annotations

import functools
import math


def even_split(weights: list[int], max_chain: int) -> list[int]:
    """Group sizes of the even split of units with ``weights`` weighted ops each."""
    sizes: list[int] = []
    i = 0
    while i < len(weights):
        remaining = sum(weights[i:])
        target = math.ceil(remaining / math.ceil(remaining / max_chain))
        count, size = 1, weights[i]
        while i + count < len(weights) and size + weights[i + count] <= target:
            size += weights[i + count]
            count += 1
        sizes.append(count)
        i += count
    return sizes


def narrowest_split(weights: list[int], cut_sizes: list[int], max_chain: int) -> list[int] | None:
    """Group sizes of the split into ``ceil(sum(weights) / max_chain)`` consecutive groups of at most
    ``max_chain`` weighted ops whose cut tensors hold the fewest elements in all; ties go to the
    smallest largest group, then to the smallest sum of squared group weights (the most even), then to
    larger groups first (so equal sizes give :func:`even_split`'s answer). ``cut_sizes[k]``: the tensor
    between unit ``k`` and ``k + 1``. None where no such split exists (a unit heavier than
    ``max_chain``)."""
    n = len(weights)
    groups = math.ceil(sum(weights) / max_chain)

    @functools.cache
    def best(start: int, left: int) -> tuple | None:  # (cut elements, max weight, sum sq, -sizes)
        if start == n:
            return (0, 0, 0, ()) if left == 0 else None
        if left == 0:
            return None
        found = None
        weight = 0
        for end in range(start + 1, n + 1):
            weight += weights[end - 1]
            if weight > max_chain:
                break
            rest = best(end, left - 1)
            if rest is None:
                continue
            cuts, top, squares, order = rest
            cost = (cuts + (cut_sizes[end - 1] if end < n else 0), max(top, weight), squares + weight * weight,
                    (-(end - start), *order))
            if found is None or cost < found:
                found = cost
        return found

    result = best(0, groups)
    return [-size for size in result[3]] if result is not None else None
