"""OpenVINO in the loop: run a QDQ ONNX model in the OpenVINO runtime and compare it with onnxruntime.

OpenVINO's ONNX frontend turns each QuantizeLinear/DequantizeLinear pair into a FakeQuantize and
its CPU plugin runs the quantized regions on int8 kernels (its low-precision transformations),
so agreement with onnxruntime checks that a vendor toolchain reads our output the same way.

The OpenVINO runtime is an optional dependency (``pip install 'onnxq[openvino]'``). Float parts
are run at ``precision="f32"`` by default: on CPUs with bf16 units OpenVINO's default inference
precision is bf16, which would add bf16 rounding to the comparison.

Metrics of :func:`compare_with_ort`, per output over all samples (y_ov, y_ort):
    max_abs_diff = max |y_ov - y_ort|,  mean_abs_diff = mean |y_ov - y_ort|,
    rel_max_diff = max_abs_diff / max |y_ort|,
    top1_agreement = mean(argmax_c y_ov == argmax_c y_ort) for 2-D [N, C] outputs with C > 1.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxq.errors import UserError

log = logging.getLogger(__name__)

Feeds = Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]]


def _openvino():
    try:
        import openvino
    except ImportError:
        raise UserError("the OpenVINO runtime is not installed: pip install 'onnxq[openvino]' "
                        "(or pip install openvino)") from None
    return openvino


def _batches(feeds: Feeds) -> list[dict[str, np.ndarray]]:
    if isinstance(feeds, Mapping):
        return [dict(feeds)]
    out = [dict(f) for f in feeds]
    if not out:
        raise UserError("no feeds given: pass a dict of input arrays or a list of them")
    return out


def _as_path(model: str | Path | onnx.ModelProto, tmp: str) -> Path:
    if isinstance(model, onnx.ModelProto):
        path = Path(tmp) / "model.onnx"
        onnx.save(model, path)
        return path
    path = Path(model)
    if not path.exists():
        raise UserError(f"model file not found: {path}")
    return path


def compile_openvino(model: str | Path | onnx.ModelProto, device: str = "CPU", precision: str = "f32"):
    """An OpenVINO CompiledModel of an ONNX file (or ModelProto) on ``device``."""
    ov = _openvino()
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": precision} if precision else {}
    with tempfile.TemporaryDirectory(prefix="onnxq_ov_") as tmp:
        path = _as_path(model, tmp)
        try:
            return core.compile_model(str(path), device, config)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeError(f"OpenVINO cannot compile {path.name}: {first}") from exc


def _run_compiled(compiled, feeds: Feeds) -> list[np.ndarray]:
    per_output: list[list[np.ndarray]] = [[] for _ in compiled.outputs]
    for feed in _batches(feeds):
        result = compiled(feed)
        for i, port in enumerate(compiled.outputs):
            per_output[i].append(np.asarray(result[port]))
    return [np.concatenate(parts) if len(parts) > 1 else parts[0] for parts in per_output]


def run_openvino(model_path: str | Path | onnx.ModelProto, feeds: Feeds, *, device: str = "CPU",
                 precision: str = "f32") -> list[np.ndarray]:
    """Run an ONNX model in OpenVINO; returns the outputs in the model's output order.

    Args:
        model_path: .onnx file (or ModelProto).
        feeds: one dict input name -> array, or an iterable of them (outputs are concatenated
            along axis 0).
        device: OpenVINO device ("CPU").
        precision: inference precision hint for float parts ("f32"; "" for OpenVINO's default).
    """
    return _run_compiled(compile_openvino(model_path, device, precision), feeds)


def run_ort(model_path: str | Path | onnx.ModelProto, feeds: Feeds) -> list[np.ndarray]:
    """Run an ONNX model in onnxruntime on CPU (all graph optimizations), batches concatenated."""
    import onnxruntime as ort

    data = model_path.SerializeToString() if isinstance(model_path, onnx.ModelProto) else str(model_path)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    per_output: list[list[np.ndarray]] = [[] for _ in sess.get_outputs()]
    for feed in _batches(feeds):
        for i, y in enumerate(sess.run(None, feed)):
            per_output[i].append(np.asarray(y))
    return [np.concatenate(parts) if len(parts) > 1 else parts[0] for parts in per_output]


def compare_with_ort(model_path: str | Path | onnx.ModelProto, feeds: Feeds, *, device: str = "CPU",
                     precision: str = "f32") -> dict[str, Any]:
    """Run the same model in OpenVINO and onnxruntime and compare their outputs.

    Returns:
        ``{"n_samples": N, "device": device, "outputs": {name: {"max_abs_diff", "mean_abs_diff",
        "rel_max_diff", "top1_agreement" (None unless a [N, C] classifier output),
        "top1_ov", "top1_ort"}}}``; ``top1_ov``/``top1_ort`` are the arg-max classes as lists.
    """
    with tempfile.TemporaryDirectory(prefix="onnxq_ov_") as tmp:
        path = _as_path(model_path, tmp)
        batches = _batches(feeds)
        ort_out = run_ort(path, batches)
        ov_out = run_openvino(path, batches, device=device, precision=precision)
        names = [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]
    if len(ov_out) != len(ort_out):
        raise RuntimeError(f"OpenVINO gave {len(ov_out)} outputs, onnxruntime {len(ort_out)}")
    outputs: dict[str, dict[str, Any]] = {}
    for name, a, b in zip(names, ov_out, ort_out):
        if a.shape != b.shape:
            raise RuntimeError(f"output {name}: OpenVINO shape {a.shape} vs onnxruntime {b.shape}")
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        entry: dict[str, Any] = {
            "max_abs_diff": float(diff.max()) if diff.size else 0.0,
            "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
            "rel_max_diff": float(diff.max() / scale) if scale > 0 else 0.0,
            "top1_agreement": None,
        }
        if a.ndim == 2 and a.shape[1] > 1:
            top_a, top_b = a.argmax(axis=1), b.argmax(axis=1)
            entry.update(top1_agreement=float(np.mean(top_a == top_b)), top1_ov=top_a.tolist(),
                         top1_ort=top_b.tolist())
        outputs[name] = entry
    n = sum(next(iter(f.values())).shape[0] for f in batches if f)
    log.info("OpenVINO vs onnxruntime on %d samples: %s", n,
             ", ".join(f"{k}: max|diff| {v['max_abs_diff']:.3g}" for k, v in outputs.items()))
    return {"n_samples": n, "device": device, "outputs": outputs}
