"""Interrupted runs resume to the same bytes: SIGINT, SIGTERM and SIGKILL during reconstruction, then
the same command again (the checkpoint keeps the finished blocks; nothing else is left behind)."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

MODELS = Path(__file__).resolve().parents[1] / "models"


def _command(out: Path, ckpt: Path) -> list[str]:
    return [sys.executable, "-m", "onnxq", "quantize", str(MODELS / "tiny_cnn.onnx"), "-o", str(out),
            "--calib", str(MODELS / "tiny_cnn_calib.npz"), "--method", "brecq", "--set", "rounding.iters=1500",
            "--checkpoint-dir", str(ckpt), "--no-validate"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("reference")
    subprocess.run(_command(folder / "o.onnx", folder / "ck"), check=True, capture_output=True, timeout=600)
    return _sha(folder / "o.onnx")


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, reference, sig, status):
    out, ckpt = tmp_path / "out" / "o.onnx", tmp_path / "ck"
    proc = subprocess.Popen(_command(out, ckpt), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(ckpt.glob("block_*.npz")):  # the first finished block
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before a block was saved"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    if sig != signal.SIGKILL:
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    again = subprocess.run(_command(out, ckpt), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert _sha(out) == reference
    assert not ckpt.exists()  # cleared after the finished run
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.onnx", "o.report.html", "o.report.json"]
