"""Re-batching calibration feeds: count the samples of batched feeds and regroup them into batches of
a given size (consecutive feeds of one shape are concatenated; a feed crossing a limit is cut).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

ENGINE_BATCH = 32  # samples per feed the torch engine's passes regroup the calibration data into


def engine_batch(input_shapes) -> int:
    """Samples per re-batched feed for a model whose graph inputs have ``input_shapes``:
    :data:`ENGINE_BATCH` when every input's leading dimension is free, else 1 (the data's own
    batches are kept: they already fit a fixed batch dimension)."""
    free = all(shape is None or (len(shape) > 0 and (not isinstance(shape[0], int) or shape[0] <= 0))
               for shape in input_shapes)
    return ENGINE_BATCH if free else 1


def count_samples(feeds) -> int:
    """Samples in a sequence of batched feeds (each feed's first input's leading dimension; an
    input-less feed is one sample)."""
    return sum(next(iter(feed.values())).shape[0] if feed else 1 for feed in feeds)


def rebatch(feeds, size: int, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Concatenate consecutive feeds into batches of up to ``size`` samples where shapes allow,
    handing out at most ``limit`` samples (the feed that crosses it is cut)."""
    pending: list[Mapping[str, np.ndarray]] = []
    count = total = 0
    for feed in feeds:
        if limit is not None and total >= limit:
            break
        n = count_samples([feed])
        if limit is not None and feed and total + n > limit:
            feed, n = {k: v[:limit - total] for k, v in feed.items()}, limit - total
        total += n
        if pending and any(feed[k].shape[1:] != pending[0][k].shape[1:] for k in feed):
            yield {k: np.concatenate([f[k] for f in pending]) for k in pending[0]}
            pending, count = [], 0
        pending.append(feed)
        count += n
        if count >= size:
            yield {k: np.concatenate([f[k] for f in pending]) for k in pending[0]}
            pending, count = [], 0
    if pending:
        yield {k: np.concatenate([f[k] for f in pending]) for k in pending[0]}
