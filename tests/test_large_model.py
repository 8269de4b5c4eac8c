"""A model over protobuf's 2 GB limit (weights in external data) quantizes to W8A8 through the CLI; the
output (its int8 weights in the file, or in external data beside it past 2 GB) runs in onnxruntime, and
the input is untouched.

Slow (about four minutes and 3 GB of memory on 2 cores; the weights are read in place,
:mod:`onnxq.core.mapped`); the time and peak memory are benchmarked by ``scripts/bench_large_model.py``,
which also builds the model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_large_model  # noqa: E402

from tests.fuzz.harness import sha256_of  # noqa: E402


@pytest.mark.slow
def test_model_over_2gb_quantizes_and_runs(tmp_path: Path) -> None:
    import onnxruntime as ort

    model, size = bench_large_model.build(tmp_path / "in", layers=8, width=8448)
    assert size > 2**31
    before = {p.name: sha256_of(p) for p in model.parent.iterdir()}
    out = tmp_path / "out" / "large_w8a8.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxq", "quantize", str(model), "-o", str(out), "--calib",
                           str(model.parent / "calib.npz"), "--method", "rtn", "--batch-size", "8"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert {p.name: sha256_of(p) for p in model.parent.iterdir()} == before  # the input is untouched
    written = [p for p in out.parent.iterdir() if not p.name.endswith(".json")]
    assert sum(p.stat().st_size for p in written) > 8 * 8448 * 8448  # every weight, as int8
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.ones((1, 8448), np.float32)})[0]
    assert y.shape == (1, 8448) and np.all(np.isfinite(y))
