"""Check a model that ``onnxq quantize`` wrote; run as a script (a crash in onnxruntime must not take pytest down).

``python verify.py '{"quant": PATH, "float": PATH_OR_NULL}'`` prints one JSON line: ``error`` (the output
fails onnx.checker or onnxruntime), ``cosine`` (quantized vs float outputs on 8 standard-normal samples,
null when the float model cannot run), ``quant_nonfinite``, ``float_nonfinite``.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort

N_SAMPLES = 8
_DTYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _session(path: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _feeds(sess: ort.InferenceSession, judge: str = "normal") -> list[dict[str, np.ndarray]]:
    """``N_SAMPLES`` realistic feeds: standard normal floats (images), small integers, fair booleans."""
    rng = np.random.default_rng(1234)
    feeds = []
    for _ in range(N_SAMPLES):
        feed = {}
        for i in sess.get_inputs():
            shape = [d if isinstance(d, int) and d >= 0 else 1 for d in i.shape]
            dtype = _DTYPES.get(i.type)
            if i.type == "tensor(bfloat16)":
                import ml_dtypes

                dtype = ml_dtypes.bfloat16
            if dtype is None:
                raise ValueError(f"input {i.name} has type {i.type}")
            if np.dtype(dtype).kind == "b":
                feed[i.name] = rng.random(shape) < 0.5
            elif np.dtype(dtype).kind in "iu":
                feed[i.name] = rng.integers(0, 4, shape).astype(dtype)
            else:
                values = rng.uniform(0, 255, shape) if judge == "pixels" else rng.standard_normal(shape)
                feed[i.name] = values.astype(np.float32).astype(dtype)
        feeds.append(feed)
    return feeds


def _run(sess: ort.InferenceSession, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    outs = []
    for feed in feeds:
        outs += [np.asarray(v, dtype=np.float64).ravel() for v in sess.run(None, feed)]
    return np.concatenate(outs) if outs else np.zeros(0)


def main(request: dict) -> dict:
    result: dict = {"error": None, "cosine": None, "quant_nonfinite": False, "float_nonfinite": False}
    try:
        onnx.checker.check_model(request["quant"])
    except Exception as exc:  # noqa: BLE001 - any checker failure is the finding
        result["error"] = f"onnx.checker rejects the output: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return result
    try:
        qsess = _session(request["quant"])
        feeds = _feeds(qsess, request.get("judge", "normal"))
        q = _run(qsess, feeds)
    except Exception as exc:  # noqa: BLE001
        msg = str(exc).strip().splitlines()
        result["error"] = f"onnxruntime cannot run the output: {type(exc).__name__}: {(msg[0] if msg else '')[:200]}"
        return result
    result["quant_nonfinite"] = bool(not np.all(np.isfinite(q)))
    if not request.get("float"):
        return result
    try:
        fsess = _session(request["float"])
        f = _run(fsess, feeds)
    except Exception:  # noqa: BLE001 - a float model onnxruntime cannot run: nothing to compare with
        return result
    result["float_nonfinite"] = bool(not np.all(np.isfinite(f)))
    if f.shape != q.shape:
        result["error"] = f"output sizes differ: float {f.shape} vs quantized {q.shape}"
        return result
    if result["float_nonfinite"] or result["quant_nonfinite"]:
        return result
    nf, nq = float(np.linalg.norm(f)), float(np.linalg.norm(q))
    if nf == 0.0 and nq == 0.0:
        result["cosine"] = 1.0
    elif nf == 0.0 or nq == 0.0:
        result["cosine"] = 0.0
    else:
        result["cosine"] = float(np.dot(f, q) / (nf * nq))
    return result


if __name__ == "__main__":
    sys.stdout.write(json.dumps(main(json.loads(sys.argv[1]))) + "\n")
