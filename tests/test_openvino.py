"""OpenVINO in the loop: each profile's output of the tiny CNN runs in OpenVINO and agrees with ORT."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxq
from onnxq.config.legacy import QuantConfig
from onnxq.errors import UserError
from onnxq.targets.profiles import TARGETS
from onnxq.targets.rules import check_target

MODELS = Path(__file__).resolve().parents[1] / "models"
HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAVE_OPENVINO,
                                    reason="openvino not installed (pip install 'onnxq[openvino]')")


@pytest.fixture(scope="module")
def eval_feeds() -> list[dict[str, np.ndarray]]:
    data = np.load(MODELS / "tiny_cnn_eval.npz")
    x = data["input"][:96].astype(np.float32) / 255.0
    return [{"input": x[i:i + 32]} for i in range(0, len(x), 32)]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[str, Path]:
    calib = np.load(MODELS / "tiny_cnn_calib.npz")["input"]
    feeds = [{"input": calib[i:i + 8]} for i in range(0, len(calib), 8)]
    out = tmp_path_factory.mktemp("ov")
    paths = {}
    for name in sorted(TARGETS):
        result = onnxq.quantize(MODELS / "tiny_cnn.onnx", feeds, QuantConfig(target=name, validate=False))
        paths[name] = result.save(out / f"tiny_{name}.onnx")
    return paths


@needs_openvino
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_each_profile_runs_in_openvino_and_agrees_with_onnxruntime(target, quantized, eval_feeds):
    from onnxq.targets.openvino_check import compare_with_ort

    report = compare_with_ort(quantized[target], eval_feeds)
    out = report["outputs"]["logits"]
    assert report["n_samples"] == 96
    assert out["top1_agreement"] >= 0.97, out["top1_agreement"]
    if target == "qnn-a16":
        # OpenVINO strips 16-bit Q/DQ pairs (runs those tensors in float, no saturation at the
        # calibrated range), while onnxruntime applies them; only the mean difference is small.
        assert out["mean_abs_diff"] < 0.05, out
    else:
        # Both run int8 kernels on the same grids: differences are a few accumulation/rounding steps.
        assert out["rel_max_diff"] < 0.03, out


@needs_openvino
def test_tensorrt_output_zero_points_and_both_runtimes(quantized, eval_feeds):
    from onnxq.targets.openvino_check import run_openvino, run_ort

    model = onnx.load(quantized["tensorrt"])
    assert check_target(model, "tensorrt") == []
    zps = [onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("_zero_point")]
    assert zps and all(np.all(z == 0) for z in zps)
    y_ort = run_ort(quantized["tensorrt"], eval_feeds)
    y_ov = run_openvino(quantized["tensorrt"], eval_feeds)
    assert len(y_ort) == len(y_ov) == 1 and y_ort[0].shape == y_ov[0].shape == (96, 10)
    labels = np.load(MODELS / "tiny_cnn_eval.npz")["label"][:96]
    # The tiny CNN classifies its synthetic data almost perfectly; quantized, both runtimes still do.
    assert np.mean(y_ort[0].argmax(1) == labels) > 0.9 and np.mean(y_ov[0].argmax(1) == labels) > 0.9


@needs_openvino
def test_openvino_accepts_a_model_proto_and_a_single_feed():
    from onnxq.targets.openvino_check import run_openvino

    model = onnx.load(MODELS / "tiny_cnn.onnx")
    x = np.load(MODELS / "tiny_cnn_calib.npz")["input"][:4]
    (y,) = run_openvino(model, {"input": x})
    from tests.helpers import run_ort

    np.testing.assert_allclose(y, run_ort(model, {"input": x})[0], atol=1e-4, rtol=1e-4)


def test_missing_openvino_is_a_user_error(monkeypatch):
    from onnxq.targets import openvino_check
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` raise ImportError
    with pytest.raises(UserError, match=r"pip install 'onnxq\[openvino\]'"):
        openvino_check.run_openvino(MODELS / "tiny_cnn.onnx", {"input": np.zeros((1, 3, 32, 32), np.float32)})
