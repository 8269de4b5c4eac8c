"""Re-batching calibration feeds: count the samples of batched feeds and regroup them into batches of
a given size (consecutive feeds of one shape are concatenated; a feed crossing a limit is cut).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np


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
