"""Checks of the bundled example models in ``models/`` (made by ``scripts/make_models.py``)."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = REPO_ROOT / "models"
SCRIPT = REPO_ROOT / "scripts" / "make_models.py"
# FP32 eval accuracy of tiny_cnn when generated was 0.985 (197/200); keep a margin for other CPUs.
MIN_CNN_ACCURACY = 0.93


def _session(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(MODELS / name), providers=["CPUExecutionProvider"])


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _load_checked(name: str) -> onnx.ModelProto:
    model = onnx.load(str(MODELS / name))
    onnx.checker.check_model(model, full_check=True)
    return model


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_models_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cnn_accuracy(model_path: Path) -> float:
    data = np.load(MODELS / "tiny_cnn_eval.npz")
    x = data["input"].astype(np.float32) / np.float32(255)
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input": x})[0]
    return float((logits.argmax(axis=1) == data["label"]).mean())


def test_models_folder_is_small() -> None:
    total = sum(p.stat().st_size for p in MODELS.iterdir() if p.is_file())
    assert total < 2 * 1024 * 1024, f"models/ holds {total} bytes"


def test_tiny_cnn_interface_and_ops() -> None:
    model = _load_checked("tiny_cnn.onnx")
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == 13
    assert [i.name for i in model.graph.input] == ["input"]
    assert _dims(model.graph.input[0]) == ["N", 3, 32, 32]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert _dims(model.graph.output[0]) == ["N", 10]
    ops = Counter(n.op_type for n in model.graph.node)
    for op, count in {"Conv": 5, "Clip": 3, "Add": 1, "MaxPool": 1, "Relu": 1,
                      "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}.items():
        assert ops[op] == count, f"{op}: {ops[op]} != {count}"
    depthwise = [n for n in model.graph.node if n.op_type == "Conv"
                 and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert len(depthwise) == 1


def test_tiny_cnn_batchnorm_unfused() -> None:
    model = _load_checked("tiny_cnn.onnx")
    producer = {out: n for n in model.graph.node for out in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == 5
    for bn in bns:
        assert producer[bn.input[0]].op_type == "Conv"
        stats = [onnx.numpy_helper.to_array(inits[name]) for name in bn.input[1:]]  # scale, B, mean, var
        assert all(s.shape == stats[0].shape for s in stats)
        assert np.all(stats[3] > 0) and not np.allclose(stats[0], 1.0)  # trained, non-identity BN


def test_tiny_cnn_fp32_accuracy_and_dynamic_batch() -> None:
    acc = _cnn_accuracy(MODELS / "tiny_cnn.onnx")
    assert acc > MIN_CNN_ACCURACY, f"tiny_cnn FP32 eval accuracy {acc:.3f}"
    sess = _session("tiny_cnn.onnx")
    x = np.load(MODELS / "tiny_cnn_calib.npz")["input"]
    full = sess.run(None, {"input": x})[0]
    single = np.concatenate([sess.run(None, {"input": x[i:i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(single, full[:3], rtol=1e-5, atol=1e-5)


def test_tiny_cnn_data_files() -> None:
    calib = np.load(MODELS / "tiny_cnn_calib.npz")
    assert list(calib.keys()) == ["input"]
    x = calib["input"]
    assert x.dtype == np.float32 and x.shape == (64, 3, 32, 32)
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.1
    ev = np.load(MODELS / "tiny_cnn_eval.npz")
    assert sorted(ev.keys()) == ["input", "label"]
    assert ev["input"].dtype == np.uint8 and ev["input"].shape == (200, 3, 32, 32)
    assert ev["label"].dtype == np.int64
    assert np.bincount(ev["label"], minlength=10).tolist() == [20] * 10
    # calibration and evaluation samples are different images
    ev_f = ev["input"].astype(np.float32) / np.float32(255)
    assert not np.any(np.all(np.abs(ev_f[:, None] - x[None]) < 1e-6, axis=(2, 3, 4)))


def test_eval_set_matches_generator() -> None:
    mm = _load_script()
    images, labels = mm.make_shapes(mm.N_EVAL, mm.SEED_EVAL_DATA)
    ev = np.load(MODELS / "tiny_cnn_eval.npz")
    np.testing.assert_array_equal(images, ev["input"])
    np.testing.assert_array_equal(labels, ev["label"])


def test_tiny_unet_dynamic_spatial() -> None:
    model = _load_checked("tiny_unet.onnx")
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == 13
    assert [i.name for i in model.graph.input] == ["image"]
    assert _dims(model.graph.input[0]) == ["N", 3, "H", "W"]
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["ConvTranspose"] == 1 and ops["Sigmoid"] == 1 and ops["Concat"] == 3
    assert ops["Resize"] == 2 and ops["MaxPool"] == 3 and ops["BatchNormalization"] == 7
    for node in model.graph.node:
        if node.op_type == "Resize":
            assert onnx.helper.get_node_attr_value(node, "mode") == b"nearest"
    sess = _session("tiny_unet.onnx")
    rng = np.random.default_rng(0)
    for shape in [(1, 3, 32, 32), (2, 3, 48, 24), (1, 3, 16, 64)]:
        y = sess.run(None, {"image": rng.random(shape, dtype=np.float32)})[0]
        assert y.shape == (shape[0], 1, shape[2], shape[3])
        assert np.all((y > 0) & (y < 1))
        assert y.std() > 1e-3  # non-trivial weights: the output is not constant


def test_tiny_mlp_ops_and_outputs() -> None:
    model = _load_checked("tiny_mlp.onnx")
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == 17
    assert [i.name for i in model.graph.input] == ["x"]
    assert _dims(model.graph.input[0]) == ["N", 16]
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MatMul"] == 3 and ops["Gemm"] == 0
    assert ops["Erf"] == 1 and ops["LayerNormalization"] == 2 and ops["Softmax"] == 1
    sess = _session("tiny_mlp.onnx")
    x = np.random.default_rng(1).standard_normal((7, 16)).astype(np.float32)
    probs = sess.run(None, {"x": x})[0]
    assert probs.shape == (7, 8)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert probs.std(axis=0).mean() > 1e-3  # depends on the input


@pytest.mark.slow
def test_regenerate_matches_bundled(tmp_path: Path) -> None:
    """Re-run the script: data files are byte-identical; models have the same graphs.

    ONNX bytes are identical when regenerated on the machine that made them; another CPU may
    round training differently, so only the graph structure and the accuracy are compared here.
    """
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True,
                   capture_output=True, timeout=900)
    for name in ("tiny_cnn_calib.npz", "tiny_cnn_eval.npz"):
        digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (MODELS / name, tmp_path / name)]
        assert digest[0] == digest[1], name
    for name in ("tiny_cnn.onnx", "tiny_unet.onnx", "tiny_mlp.onnx"):
        ops = [[n.op_type for n in onnx.load(str(d / name)).graph.node] for d in (MODELS, tmp_path)]
        assert ops[0] == ops[1], name
    assert _cnn_accuracy(tmp_path / "tiny_cnn.onnx") > MIN_CNN_ACCURACY
