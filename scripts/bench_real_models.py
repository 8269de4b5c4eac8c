"""Fidelity benchmark of W8A8 quantization on real models: PP-OCR det/cls/rec and nudenet YOLOv8n.

For each model the same calibration feeds (synthetic text pages/lines, ImageNet calibration split) and the
same held-out evaluation feeds go through:

* ``onnxq``: ``onnxq.quantize(path, calib, Config() (the default W8A8), validation=eval)`` (skipped with a note while
  the API is not available);
* ``onnxq+smooth``: the same with ``FloatPhase(smooth=True)`` (``--smooth``, SmoothQuant);
* ``onnxq+qdrop``: the default with QDrop reconstruction (``--method qdrop``, fast schedule);
* ``onnxq+target``: the default with an accuracy target, ``AccuracyTarget(max_drop=--max-drop, ops=--max-drop-ops)``
  (``onnxq quantize --max-drop``; the drop in points of cosine of the outputs);
* ``ort``: ``onnxruntime.quantization.quantize_static`` on the model as shipped (QDQ, per-channel,
  QUInt8 activations, QInt8 weights, MinMax);
* ``ort+pre``: the same after ORT's recommended ``quant_pre_process`` (shape inference + ORT basic
  optimizations, which fold Constant nodes into initializers and BatchNormalization into Conv); where
  symbolic shape inference fails it is retried with ``skip_symbolic_shape=True`` (noted);
* ``ort+op13+pre``: as ``ort+pre`` after ``onnx.version_converter`` to opset 13 (models below 13 only),
  which per-channel ``DequantizeLinear(axis=...)`` requires;
* ``ort+dynamic+op13+pre``: the same preparation, then ``quantize_dynamic`` (per-channel QInt8 weights,
  activations quantized at run time: ConvInteger / DynamicQuantizeMatMul).

Metrics on the evaluation feeds, quantized model run by ORT CPU at ``ORT_ENABLE_ALL`` against the FP32 model:

* ``SQNR = 10 log10(sum(y^2) / sum((y - y_q)^2))`` in dB over all samples, cosine (mean per sample),
  max abs error; YOLO also per part (box rows 0..3, class-score rows 4..21);
* application metrics: cls argmax agreement; rec CTC greedy string equality; det IoU of the binarized
  probability maps ``p > 0.3``; YOLO detection F1 between FP32 and quantized detections (score >= 0.25, NMS
  0.45 as nudenet, same class and IoU >= 0.5);
* checker (``onnx.checker`` full check), ORT load+run at ``ORT_DISABLE_ALL`` and ``ORT_ENABLE_ALL``, integer
  kernels after ORT fusion (QLinear*/ *Integer ops in the optimized graph) and float compute ops left.

Usage: ``python scripts/bench_real_models.py [--methods onnxq,ort,ort+pre,ort+op13+pre]
[--models det,cls,rec,yolov8n] [--md OUT.md]``. Outputs (models, ORT-optimized graphs, results.json)
go under ``build/bench_real/``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_models as rm  # noqa: E402

OUT_DIR = rm.REPO / "build" / "bench_real"
EVAL_N = {"det": 32, "cls": 64, "rec": 64, "yolov8n": 64}
_MOVE_OPS = {"QuantizeLinear", "DequantizeLinear", "Reshape", "Transpose", "Shape", "Gather", "Unsqueeze",
             "Squeeze", "Slice", "Split", "Cast", "Constant", "ConstantOfShape", "Expand", "Range",
             "Identity", "Flatten", "ReorderInput", "ReorderOutput", "Concat", "MaxPool", "QLinearConcat"}


def short_error(exc: BaseException) -> str:
    """One line: ORT's INVALID_GRAPH messages are cut to their final 'Error ...' clause."""
    msg = str(exc)
    if ", Error " in msg:
        msg = msg.split(" : ")[2] + ": " + msg.rsplit(", Error ", 1)[-1] if msg.count(" : ") >= 2 else msg
    return f"{type(exc).__name__}: {msg.splitlines()[0][:240] if msg else ''}"


def is_integer_kernel(op: str) -> bool:
    return op.startswith("QLinear") or "Integer" in op or op in {"QGemm", "QAttention", "QOrderedMatMul"}


# ----------------------------------------------------------------------------------------- running

def session(path: Path, level: ort.GraphOptimizationLevel, threads: int, optimized: Path | None = None
            ) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_all(sess: ort.InferenceSession, feeds: list[dict[str, np.ndarray]]) -> tuple[list[np.ndarray], float]:
    """Run every feed; return per-output arrays concatenated on the batch axis and ms per feed."""
    outs: list[list[np.ndarray]] = []
    sess.run(None, feeds[0])  # warm-up, not timed
    start = time.perf_counter()
    for feed in feeds:
        outs.append(sess.run(None, feed))
    ms = 1000 * (time.perf_counter() - start) / max(len(feeds), 1)
    return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))], ms


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - got) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / noise)


def cosine(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean over samples (axis 0) of the cosine similarity of the flattened outputs."""
    a, b = ref.reshape(len(ref), -1).astype(np.float64), got.reshape(len(got), -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.where(den > 0, (a * b).sum(1) / np.maximum(den, 1e-30), 1.0)))


# ----------------------------------------------------------------------------------------- app metrics

def yolo_detections(out: np.ndarray, conf: float = 0.25, nms: float = 0.45) -> list[tuple[int, np.ndarray]]:
    """nudenet-style decoding of one (22, N) output: class id and xywh (top-left) box per kept detection."""
    scores = out[4:].T
    cls, best = scores.argmax(1), scores.max(1)
    keep = np.flatnonzero(best >= conf)
    boxes = out[:4, keep].T.copy()
    boxes[:, :2] -= boxes[:, 2:] / 2
    idx = cv2.dnn.NMSBoxes(boxes.tolist(), best[keep].tolist(), conf, nms) if len(keep) else []
    return [(int(cls[keep[i]]), boxes[i]) for i in np.array(idx).reshape(-1)]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    return inter / max(a[2] * a[3] + b[2] * b[3] - inter, 1e-9)


def yolo_f1(ref: np.ndarray, got: np.ndarray) -> tuple[float, int]:
    """F1 of quantized vs FP32 detections (greedy match: same class, IoU >= 0.5); and #FP32 detections."""
    matched = n_ref = n_got = 0
    for r, g in zip(ref, got):
        dr, dg = yolo_detections(r), yolo_detections(g)
        n_ref, n_got = n_ref + len(dr), n_got + len(dg)
        used: set[int] = set()
        for c, box in dr:
            cand = [(_iou(box, b2), j) for j, (c2, b2) in enumerate(dg) if c2 == c and j not in used]
            best = max(cand, default=(0.0, -1))
            if best[0] >= 0.5:
                used.add(best[1])
                matched += 1
    return (1.0 if n_ref + n_got == 0 else 2 * matched / (n_ref + n_got)), n_ref


def app_metric(key: str, ref: np.ndarray, got: np.ndarray, meta: list[Any]) -> dict[str, Any]:
    if key == "cls":
        a, b = ref.argmax(1), got.argmax(1)
        return {"app": f"argmax agree {np.mean(a == b):.1%}", "agree": float(np.mean(a == b)),
                "acc_fp32": float(np.mean(a == np.array(meta))), "acc_q": float(np.mean(b == np.array(meta)))}
    if key == "rec":
        chars = rm.rec_characters()
        a, b = rm.ctc_greedy_decode(ref, chars), rm.ctc_greedy_decode(got, chars)
        eq = float(np.mean([x == y for x, y in zip(a, b)]))
        return {"app": f"text == FP32 {eq:.1%}", "agree": eq,
                "acc_fp32": float(np.mean([x.strip() == t for x, t in zip(a, meta)])),
                "acc_q": float(np.mean([y.strip() == t for y, t in zip(b, meta)]))}
    if key == "det":
        a, b = ref > 0.3, got > 0.3
        iou = float(np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1))
        return {"app": f"mask IoU {iou:.3f}", "agree": iou, "pixel_agree": float(np.mean(a == b))}
    f1, n_ref = yolo_f1(ref, got)
    top_a = ref[:, 4:].max(2).argmax(1)
    top_b = got[:, 4:].max(2).argmax(1)
    return {"app": f"det F1 {f1:.3f} ({n_ref} dets), top cls {np.mean(top_a == top_b):.0%}", "agree": f1,
            "fp32_detections": n_ref, "top_class_agree": float(np.mean(top_a == top_b))}


# ----------------------------------------------------------------------------------------- evaluation

def evaluate(key: str, qpath: Path, fp_path: Path, ref: list[np.ndarray], ref_ms: float,
             feeds: list[dict[str, np.ndarray]], meta: list[Any], threads: int) -> dict[str, Any]:
    res: dict[str, Any] = {"size_ratio": qpath.stat().st_size / fp_path.stat().st_size,
                           "runtime_quantized_constants": runtime_quantized_constants(qpath)}
    try:
        onnx.checker.check_model(str(qpath), full_check=True)
        res["checker"] = "OK"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        res["checker"] = f"FAIL: {short_error(exc)}"
    outs: dict[str, list[np.ndarray]] = {}
    for name, level in (("L0", ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                        ("L99", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)):
        optimized = qpath.with_suffix(".ortopt.onnx") if name == "L99" else None
        try:
            outs[name], ms = run_all(session(qpath, level, threads, optimized), feeds)
            res[f"ort_{name}"] = "OK"
            res[f"ms_{name}"] = ms
        except Exception as exc:  # noqa: BLE001
            res[f"ort_{name}"] = f"FAIL: {short_error(exc)}"
    res["ms_fp32"] = ref_ms
    if "L99" in outs:
        opt = onnx.load(str(qpath.with_suffix(".ortopt.onnx")), load_external_data=False)
        ops = Counter(n.op_type for n in opt.graph.node)
        res["int_kernels"] = {k: v for k, v in ops.items() if is_integer_kernel(k)}
        res["float_ops"] = {k: v for k, v in ops.items() if not is_integer_kernel(k) and k not in _MOVE_OPS}
        res["qdq_left"] = ops.get("QuantizeLinear", 0) + ops.get("DequantizeLinear", 0)
    got = outs.get("L99") or outs.get("L0")
    if got is None:
        return res
    if "L0" in outs and "L99" in outs:
        from onnxq.report.metrics import level_gap

        res["L0_vs_L99_maxabs"] = max(float(np.abs(a - b).max()) for a, b in zip(outs["L0"], outs["L99"]))
        # the error the fused kernels add, as a fraction of quantization's own (onnxq.report.verdict)
        res["level_gap"] = level_gap([r[None] for r in ref[0]], [r[None] for r in outs["L0"][0]],
                                     [r[None] for r in outs["L99"][0]])
        res["app_L0"] = app_metric(key, ref[0], outs["L0"][0], meta)["app"]
    res["outputs"] = [{"sqnr_db": sqnr_db(r, g), "cosine": cosine(r, g),
                       "max_abs": float(np.abs(r - g).max())} for r, g in zip(ref, got)]
    if key == "yolov8n":
        res["yolo_parts_sqnr_db"] = {"boxes": sqnr_db(ref[0][:, :4], got[0][:, :4]),
                                     "scores": sqnr_db(ref[0][:, 4:], got[0][:, 4:])}
    res.update(app_metric(key, ref[0], got[0], meta))
    return res


def runtime_quantized_constants(path: Path) -> int:
    """QuantizeLinear nodes whose input is a Constant node or initializer (weights quantized at run time)."""
    model = onnx.load(str(path), load_external_data=False)
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    consts |= {t.name for t in model.graph.initializer}
    return sum(n.op_type == "QuantizeLinear" and n.input[0] in consts for n in model.graph.node)


# ----------------------------------------------------------------------------------------- quantizers

class _Reader:
    """onnxruntime CalibrationDataReader over a list of feeds (duck-typed: ``get_next``)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def quantize_ort(fp_path: Path, out: Path, calib: list[dict[str, np.ndarray]], pre: bool, op13: bool = False,
                 dynamic: bool = False) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationDataReader
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = fp_path
    info: dict[str, Any] = {}
    opsets = onnx.load(str(fp_path), load_external_data=False).opset_import
    if op13 and min(o.version for o in opsets if o.domain in ("", "ai.onnx")) < 13:
        src = out.with_suffix(".op13.onnx")  # per-channel DequantizeLinear (axis) needs opset >= 13
        onnx.save(onnx.version_converter.convert_version(onnx.load(str(fp_path)), 13), str(src))
        info["converted_to_opset"] = 13
    if pre:
        pre_src, src = src.resolve(), out.resolve().with_suffix(".pre.onnx")
        # ORT's symbolic shape inference dumps sym_shape_infer_temp.onnx + <uuid>.data into the working
        # directory when it fails: keep them in the output folder.
        with contextlib.chdir(src.parent):
            try:
                quant_pre_process(str(pre_src), str(src))
            except Exception as exc:  # noqa: BLE001 - ORT's own advice: retry without symbolic shapes
                where = [ln.strip() for ln in traceback.format_exc(limit=-1).splitlines()[:-1]
                         if ln.strip().strip("^~")][-1]
                info["pre_error"] = short_error(exc) if str(exc) else f"{type(exc).__name__} at `{where}`"
                quant_pre_process(str(pre_src), str(src), skip_symbolic_shape=True)
        pre_ops = Counter(n.op_type for n in onnx.load(str(src), load_external_data=False).graph.node)
        info["pre_ops"] = {k: pre_ops[k] for k in ("Constant", "BatchNormalization", "Conv")
                           if pre_ops.get(k)}
    if dynamic:  # weights int8 per channel, activations quantized at run time: no calibration
        quantize_dynamic(str(src), str(out), per_channel=True, weight_type=QuantType.QInt8)
        return info
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(calib)
    quantize_static(str(src), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return info


def quantize_onnxq(fp_path: Path, out: Path, calib: list[dict[str, np.ndarray]],
                   valid: list[dict[str, np.ndarray]], *, smooth: bool = False,
                   target: tuple[float, str] | None = None, qdrop: bool = False) -> dict[str, Any]:
    import onnxq

    config = onnxq.Config(float_phase=onnxq.FloatPhase(smooth=smooth))
    if qdrop:
        config = config.replace(rounding=onnxq.QDrop())
    if target is not None:
        config = config.replace(accuracy=onnxq.AccuracyTarget(max_drop=target[0], metric="cosine", ops=target[1]))
    result = onnxq.quantize(str(fp_path), calib, config, validation=valid)  # the default W8A8 (+ options)
    result.save(str(out))
    report = result.report
    kept = report.get("accuracy_target")
    return {"onnxq_float_ops": report.get("float_ops"), "onnxq_validation": report.get("validation"),
            **({"onnxq_target": {"drop": kept["drop"], "kept": [k["node"] for k in kept["kept_float"]]}}
               if kept else {})}


def onnxq_available() -> str | None:
    try:
        import onnxq

        onnxq.quantize, onnxq.Config  # noqa: B018 - lazy attributes may import half-built modules
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        return f"onnxq.quantize/Config not available yet ({type(exc).__name__}: {exc})"
    return None


def bench_one(key: str, method: str, args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    fp_path = rm.model_path(key)
    out = args.out / f"{key}.{method.replace('+', '_')}.onnx"
    row: dict[str, Any] = {"model": key, "method": method}
    start = time.perf_counter()
    try:
        if method.startswith("onnxq"):
            target = (args.max_drop, args.max_drop_ops) if method == "onnxq+target" else None
            row.update(quantize_onnxq(fp_path, out, data["calib"], data["eval"], smooth=method == "onnxq+smooth",
                                      target=target, qdrop=method == "onnxq+qdrop"))
        else:
            row.update(quantize_ort(fp_path, out, data["calib"], pre="+pre" in method,
                                    op13="+op13" in method, dynamic="+dynamic" in method))
    except Exception as exc:  # noqa: BLE001 - failures are results here
        row["error"] = short_error(exc)
        row["traceback"] = traceback.format_exc(limit=-3)
        print(f"  {key}/{method}: quantization FAILED: {row['error']}", flush=True)
        return row
    row["quant_s"] = time.perf_counter() - start
    row.update(evaluate(key, out, fp_path, data["ref"], data["ref_ms"], data["eval"], data["meta"],
                        args.threads))
    sqnr = [round(float(o["sqnr_db"]), 1) for o in row.get("outputs", [])]
    print(f"  {key}/{method}: {row.get('app', '')} sqnr {sqnr}"
          f" ({row['quant_s']:.0f} s)", flush=True)
    return row


# ----------------------------------------------------------------------------------------- report

def _fmt_counts(counts: dict[str, int] | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted((counts or {}).items(), key=lambda kv: -kv[1])) or "-"


def markdown(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    lines = [f"### Real models, W8A8 ({header['date']})", "",
             f"- Machine: {header['machine']}; ORT threads {header['threads']}",
             f"- Versions: {header['versions']}",
             f"- Command: `{header['command']}`",
             f"- Feeds: {header['feeds']}",
             "- Metrics vs FP32 on held-out feeds, quantized model at ORT_ENABLE_ALL; SQNR over all eval "
             "samples, cosine mean per sample.", ""]
    for note in header.get("notes", []):
        lines.insert(-1, f"- Note: {note}")
    lines += ["| Model | Method | SQNR dB | Cosine | Max abs err | Application metric (vs FP32) | Checker | "
              "ORT L0 / L99 | Quant s | Size | ms FP32 / q |", "|" + "---|" * 11]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | FAILED: {r['error'].replace('|', '/')} |"
                         + " |" * 8)
            continue
        outs = r.get("outputs", [])
        sq = " / ".join(f"{o['sqnr_db']:.1f}" for o in outs) or "-"
        if "yolo_parts_sqnr_db" in r:
            p = r["yolo_parts_sqnr_db"]
            sq += f" (boxes {p['boxes']:.1f}, scores {p['scores']:.1f})"
        cos = " / ".join(f"{o['cosine']:.5f}" for o in outs) or "-"
        mae = " / ".join(f"{o['max_abs']:.3g}" for o in outs) or "-"
        app = r.get("app", "-") + (f" (DISABLE: {r['app_L0']}; fused adds {r['level_gap']:.2f}x the quantization "
                                   "error)" if "app_L0" in r else "")
        if "acc_fp32" in r:
            app += f"; vs truth FP32 {r['acc_fp32']:.1%} / q {r['acc_q']:.1%}"
        ms = f"{r['ms_fp32']:.0f} / {r.get('ms_L99', float('nan')):.0f}"
        levels = r.get("ort_L0", "-") if r.get("ort_L0") == r.get("ort_L99") and r.get("ort_L0") != "OK" \
            else f"{r.get('ort_L0', '-')} / {r.get('ort_L99', '-')}"
        lines.append(f"| {r['model']} | {r['method']} | {sq} | {cos} | {mae} | {app} | "
                     f"{r.get('checker', '-')} | "
                     f"{levels} | {r['quant_s']:.0f} | "
                     f"{r['size_ratio']:.2f}x | {ms} |")
    lines += ["", "| Model | Method | Integer kernels after ORT fusion | Float compute ops left | "
              "Q/DQ left | Constants quantized at run time |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" not in r:
            lines.append(f"| {r['model']} | {r['method']} | {_fmt_counts(r.get('int_kernels'))} | "
                         f"{_fmt_counts(r.get('float_ops'))} | {r.get('qdq_left', '-')} | "
                         f"{r.get('runtime_quantized_constants', '-')} |")
    notes = [f"- {r['model']}/{r['method']}: accuracy target (--max-drop {header.get('max_drop')}, ops "
             f"{header.get('max_drop_ops')}): drop {r['onnxq_target']['drop']}, kept float: "
             f"{', '.join(r['onnxq_target']['kept']) or 'nothing'}" for r in rows if r.get("onnxq_target")]
    notes += [f"- {r['model']}/{r['method']}: quant_pre_process failed ({r['pre_error']}); "
             "retried with skip_symbolic_shape=True" for r in rows if r.get("pre_error")]
    notes += [f"- {r['model']}/{r['method']}: {r['traceback'].strip().splitlines()[-1]}" for r in rows
              if r.get("traceback")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(rm.MODEL_KEYS))
    parser.add_argument("--methods", default="onnxq,ort,ort+pre,ort+op13+pre")
    parser.add_argument("--calib-n", type=int, default=64)
    parser.add_argument("--eval-n", type=int, default=0, help="0: per-model default (det 32, others 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--max-drop", type=float, default=0.5, help="onnxq+target: points of cosine")
    parser.add_argument("--max-drop-ops", default="activations", choices=("all", "activations"),
                        help="onnxq+target: which ops may stay float")
    parser.add_argument("--md", type=Path, help="also write the markdown here")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    notes = []
    if any(m.startswith("onnxq") for m in methods) and (why := onnxq_available()):
        methods = [m for m in methods if not m.startswith("onnxq")]
        notes.append(f"onnxq skipped: {why}")
        print(f"NOTE: {notes[-1]}", flush=True)
    rows: list[dict[str, Any]] = []
    for key in args.models.split(","):
        t0 = time.perf_counter()
        calib = rm.make_feeds(key, args.calib_n, args.seed, "calib")
        feeds, meta = rm.make_samples(key, args.eval_n or EVAL_N[key], args.seed, "eval")
        fp = rm.model_path(key)
        ref, ref_ms = run_all(session(fp, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, args.threads), feeds)
        shape = next(iter(feeds[0].values())).shape
        print(f"[{key}] feeds {len(calib)} calib + {len(feeds)} eval of {shape} "
              f"in {time.perf_counter() - t0:.1f} s; FP32 {ref_ms:.0f} ms/sample", flush=True)
        data = {"calib": calib, "eval": feeds, "meta": meta, "ref": ref, "ref_ms": ref_ms}
        for method in methods:
            rows.append(bench_one(key, method, args, data))
    versions = {m.__name__: m.__version__ for m in (onnx, ort, np, cv2)}
    import PIL
    versions["pillow"] = PIL.__version__
    header = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()} {platform.release()}, "
                   f"Python {platform.python_version()}",
        "threads": args.threads,
        "max_drop": args.max_drop,
        "max_drop_ops": args.max_drop_ops,
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "command": "python scripts/bench_real_models.py " + " ".join(sys.argv[1:]),
        "feeds": f"{args.calib_n} calib samples; eval samples: "
                 + (str(args.eval_n) if args.eval_n else ", ".join(f"{k} {v}" for k, v in EVAL_N.items()))
                 + f"; seed {args.seed}; "
                 "det: rendered 640x640 pages -> 736x736; cls 3x48x192 and rec 3x48x320 rendered text lines "
                 "(cls: half rotated 180); yolov8n: ImageNet sample letterboxed to 320x320 "
                 "(calib split class%4==0, eval = others)",
        "notes": notes,
    }
    md = markdown(rows, header)
    results = json.dumps({"header": header, "rows": rows}, indent=1, default=str)
    (args.out / "results.json").write_text(results)
    print(md)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md)


if __name__ == "__main__":
    main()
