"""Degenerate calibration data (onnxq.data.sanity): each rule, and real-looking data passing."""

from __future__ import annotations

import numpy as np
import pytest

from onnxq.data.sanity import degenerate_inputs

RNG = np.random.default_rng(0)


def _batches(x: np.ndarray, per: int = 4) -> list[dict[str, np.ndarray]]:
    return [{"x": x[i:i + per]} for i in range(0, len(x), per)]


@pytest.mark.parametrize("data, fragment", [
    (np.zeros((16, 3, 8, 8), np.float32), "every calibration value is 0"),
    (np.full((16, 3, 8, 8), 0.5, np.float32), "every calibration value is 0.5"),
    (np.repeat(RNG.normal(size=(1, 3, 8, 8)).astype(np.float32), 16, axis=0), "samples are the same"),
    (np.repeat(np.repeat(RNG.normal(size=(16, 3, 1, 1)), 8, 2), 8, 3).astype(np.float32), "image planes"),
    (np.repeat(np.repeat(RNG.normal(size=(16, 3, 2, 1)), 4, 2), 8, 3).astype(np.float32), "image planes"),
])
def test_degenerate_data_is_named(data, fragment):
    (line,) = degenerate_inputs(_batches(data))
    assert "input 'x'" in line and fragment in line


@pytest.mark.parametrize("data", [
    RNG.normal(size=(16, 3, 8, 8)).astype(np.float32),
    RNG.integers(0, 256, size=(16, 3, 8, 8)).astype(np.float32) / 255,  # 8-bit images
    RNG.normal(size=(16, 128)).astype(np.float32),
    np.ones((16, 8), np.float32),  # a small constant input (a mask, a parameter) is not data
    np.ones((16, 128), np.int64),  # integer inputs (ids, masks) are not judged
])
def test_real_looking_data_passes(data):
    assert degenerate_inputs(_batches(data)) == []


def test_scaling_mistakes_but_not_additive_masks():
    x = RNG.normal(size=(16, 128)).astype(np.float32)
    assert "typical calibration value" in degenerate_inputs(_batches(x * 1e30))[0]
    assert "under 1e-20" in degenerate_inputs(_batches(x * 1e-30))[0]
    mask = np.where(RNG.random((16, 128)) < 0.2, np.float32(-1e30), np.float32(0))
    assert degenerate_inputs(_batches(mask)) == []


def test_a_constant_mask_beside_varying_data_is_not_a_finding():
    x = RNG.normal(size=(16, 128)).astype(np.float32)
    feeds = [{"x": x[i:i + 4], "mask": np.ones((4, 128), np.float32)} for i in range(0, 16, 4)]
    assert degenerate_inputs(feeds) == []
    pattern = np.repeat((np.arange(128) < 100)[None].astype(np.float32), 4, axis=0)  # one padding for all
    feeds = [{"x": x[i:i + 4], "mask": pattern} for i in range(0, 16, 4)]
    assert degenerate_inputs(feeds) == []
    zeros = [{"x": np.zeros((4, 128), np.float32), "mask": np.ones((4, 128), np.float32)}]
    assert [line.split(":")[0] for line in degenerate_inputs(zeros)] == ["input 'x'", "input 'mask'"]
