"""How far a quantized EfficientNet-Lite0 is from FP32, in yardsticks steadier than top-1.

Top-1 on 325 validation images moves by 0.31 points per image, and seeds of one setting spread by about a
point; the logits' distance to FP32 over the same images separates two settings with far fewer runs. Per
model, on one split of the ImageNet sample at ``ORT_ENABLE_ALL`` (one onnxruntime thread):

* top-1 and top-1 agreement with FP32 (%);
* MSE: the mean squared difference of the logits to FP32's;
* KL: the mean over images of ``KL(softmax(FP32) || softmax(quantized))``.

Usage::

    python scripts/logit_error.py MODEL.onnx [MODEL.onnx ...] [--split val|eval] [--fp32 PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imagenet_sample import REPO_ROOT, load_split  # noqa: E402

FP32 = REPO_ROOT / "build" / "models" / "efficientnet_lite0.onnx"
BATCH = 25


def run(model: Path | onnx.ModelProto, x: np.ndarray, *, level: str = "all",
        outputs: list[str] | None = None) -> list[np.ndarray]:
    """The model's ``outputs`` (None: all) on ``x`` in batches of ``BATCH``, one onnxruntime thread, at
    ``ORT_ENABLE_ALL`` ("all") or ``ORT_DISABLE_ALL`` ("disable")."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                     "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    parts = [sess.run(outputs, {name: x[i:i + BATCH]}) for i in range(0, len(x), BATCH)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    """The model's first output on ``x`` at ``ORT_ENABLE_ALL``."""
    return run(path, x)[0]


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def distances(reference: np.ndarray, quantized: np.ndarray) -> dict[str, float]:
    """MSE of the logits and mean KL(softmax(reference) || softmax(quantized))."""
    lp, lq = log_softmax(reference), log_softmax(quantized)
    kl = np.sum(np.exp(lp) * (lp - lq), axis=1)
    return {"mse": float(np.mean((quantized - reference) ** 2)), "kl": float(np.mean(kl))}


def qdq_logit_mse(model: Path | onnx.ModelProto, x: np.ndarray, reference: np.ndarray) -> float:
    """Mean squared difference of ``model``'s logits on ``x`` at ``ORT_DISABLE_ALL`` (the QDQ graph itself)
    to ``reference``: the sensitivity scripts' yardstick."""
    return float(np.mean((run(model, x, level="disable")[0] - reference) ** 2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--split", choices=("val", "eval"), default="val")
    ap.add_argument("--fp32", type=Path, default=FP32, help="the float model (scripts/export_efficientnet.py)")
    args = ap.parse_args()
    for path in [args.fp32, *args.models]:
        if not path.is_file():
            sys.exit(f"logit_error: {path} does not exist")
    x, labels = load_split(args.split)
    reference = logits(args.fp32, x)
    for path in args.models:
        q = logits(path, x)
        d = distances(reference, q)
        print(f"{path}: {args.split} top-1 {100 * np.mean(q.argmax(1) == labels):.2f} "
              f"agree {100 * np.mean(q.argmax(1) == reference.argmax(1)):.2f} "
              f"mse {d['mse']:.4f} kl {d['kl']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
