"""Kernel fidelity and latency of onnxq's CPU outputs: what onnxruntime computes is what was validated.

EfficientNet-Lite0, shared calibration split (250 images). Per model: top-1 and agreement with FP32 on
the ImageNet validation sample and on the training evaluation split at ORT_ENABLE_ALL (the fused
integer kernels of this CPU) and ORT_DISABLE_ALL (the QDQ simulation); the weight pairs that
onnxruntime's saturating kernels (x86 without VNNI) would get wrong, read from the file
(:func:`onnxq.report.kernel_check.saturating_pairs`); the kernels onnxruntime runs; latency at batch 1
and 32 against FP32 and onnxruntime's own quantizer, the models' runs interleaved.

``--haswell N`` also runs each model at ORT_ENABLE_ALL under ``qemu-x86_64 -cpu Haswell`` (an AVX2 CPU
without VNNI, where u8s8 pairs saturate) on the first N validation images and reports the agreement of
those predictions with this CPU's ORT_DISABLE_ALL predictions and with FP32 (qemu is slow: a few
seconds an image).

    python scripts/bench_kernels.py [--only NAME[,NAME]] [--haswell N] [--out-dir build/kernels]
        [--latency-runs N] [--latency-runs-b32 N] [--json PATH] [--markdown [PATH]]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_efficientnet import (  # noqa: E402
    CALIB_BATCH,
    EVAL_BATCH,
    INPUT,
    OrtEntry,
    evaluate,
    machine_info,
    measure_latency,
    quantize_ort,
    write_results,
)
from export_efficientnet import export_efficientnet_lite0  # noqa: E402
from imagenet_sample import load_split  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Entry:
    """One model: an onnxq configuration (``config()``) or onnxruntime's quantizer (``ort``)."""

    name: str
    what: str
    config: Callable[[], Any] | None = None
    ort: OrtEntry | None = None
    metric: Callable[[np.ndarray], Callable[[np.ndarray], float]] | None = None  # labels -> a score of logits


def _onnxq(**kwargs: Any) -> Callable[[], Any]:
    def build() -> Any:
        import onnxq

        sections = {k: v() if callable(v) else v for k, v in kwargs.items()}
        return onnxq.Config(**sections)
    return build


def _preset(name: str) -> Callable[[], Any]:
    def build() -> Any:
        import onnxq

        return onnxq.Config.from_preset(name)
    return build


def _rtn():
    import onnxq

    return onnxq.RoundToNearest()


def _w4():
    import onnxq

    return onnxq.Weights(bits=4)


def _half_point_target():
    import onnxq

    return onnxq.AccuracyTarget(max_drop=0.5)


def _top1_target():
    import onnxq

    return onnxq.AccuracyTarget(max_drop=0.5, metric="metric", samples=250)


def _top1_of(labels: np.ndarray) -> Callable[[np.ndarray], float]:
    """Top-1 accuracy in percent of stacked logits whose rows are the first calibration images."""
    return lambda logits: 100.0 * float(np.mean(np.argmax(logits, axis=1) == labels[:len(logits)]))


def _int8_act():
    import onnxq

    return onnxq.Activations(dtype="int8")


ENTRIES = (
    Entry("onnxq_w8a8", "onnxq quantize (default: GPTQ, portable kernels)", _onnxq()),
    Entry("onnxq_w8a8_rtn", "--method rtn (nearest, portable kernels)", _onnxq(rounding=_rtn)),
    Entry("onnxq_w8a8_unfitted", "--method rtn --kernels int32 (the output before the kernel fit)",
          _onnxq(rounding=_rtn, kernels="int32")),
    Entry("onnxq_w8a8_pow2", "--scale pow2", _onnxq(scale="pow2")),
    Entry("onnxq_w8a8_target", "--max-drop 0.5 (top-1 agreement)", _onnxq(accuracy=_half_point_target)),
    Entry("onnxq_w8a8_target_top1", "max_drop 0.5 in top-1 accuracy on the 250 calibration images (labels through "
          "the Python API's metric)", _onnxq(accuracy=_top1_target), metric=_top1_of),
    Entry("onnxq_w8a8_int8act", "--activations int8", _onnxq(activations=_int8_act)),
    Entry("onnxq_w8a8_int8act_unfitted", "--activations int8 --method rtn --kernels int32",
          _onnxq(activations=_int8_act, rounding=_rtn, kernels="int32")),
    Entry("onnxq_w4a8_rtn", "--weights int4 --method rtn", _onnxq(weights=_w4, rounding=_rtn)),
    Entry("onnxq_w4a8_gptq", "--weights int4 (GPTQ)", _onnxq(weights=_w4)),
    Entry("onnxq_w4a8_brecq", "--preset w4a8-fast (BRECQ)", _preset("w4a8-fast")),
    Entry("onnxq_tensorrt", "--preset w8a8-tensorrt (int8 activations; runtime: TensorRT)", _preset("w8a8-tensorrt")),
    Entry("ort_w8a8_minmax", "onnxruntime quantize_static, MinMax, QInt8 per-channel",
          ort=OrtEntry("ort_w8a8_minmax", "MinMax")),
    Entry("ort_w8a8_dynamic", "onnxruntime quantize_dynamic, QInt8 per-channel (activations at run time)",
          ort=OrtEntry("ort_w8a8_dynamic", "MinMax", dynamic=True)),
    Entry("ort_w4a8_minmax", "onnxruntime quantize_static, MinMax, QInt4 per-channel (opset 21)",
          ort=OrtEntry("ort_w4a8_minmax", "MinMax", weight_type="QInt4", opset21=True)),
)


def _haswell_predictions(path: Path, x: np.ndarray, work: Path) -> np.ndarray | None:
    """Top-1 at ORT_ENABLE_ALL on an emulated Haswell CPU (None without qemu)."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        return None
    feeds, out = work / "x.npy", work / "pred.npy"
    np.save(feeds, x)
    code = ("import sys, numpy as np, onnxruntime as ort\n"
            "x = np.load(sys.argv[2]); s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
            f"p = [s.run(None, {{'{INPUT}': x[i:i + 8]}})[0].argmax(1) for i in range(0, len(x), 8)]\n"
            "np.save(sys.argv[3], np.concatenate(p))\n")
    subprocess.run([qemu, "-cpu", "Haswell", sys.executable, "-c", code, str(path), str(feeds), str(out)],
                   check=True, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return np.load(out)


def _quantize(entry: Entry, fp32: Path, x_cal: np.ndarray, holdout: np.ndarray, out: Path,
              y_cal: np.ndarray) -> dict[str, Any]:
    if entry.ort is not None:
        return quantize_ort(entry.ort, fp32, x_cal, out)
    import onnxq

    calib = [{INPUT: x_cal[i:i + CALIB_BATCH]} for i in range(0, len(x_cal), CALIB_BATCH)]
    t0 = time.perf_counter()
    metric = entry.metric(y_cal) if entry.metric is not None else None
    result = onnxq.quantize(str(fp32), calib, entry.config(), validation=[{INPUT: holdout}], metric=metric)
    seconds = time.perf_counter() - t0
    result.save(str(out))
    val = result.validation
    target = result.report.get("accuracy_target")
    return {"quant_s": seconds, "validation": None if val is None else (val.reason or "OK"),
            "weight_rounding": result.report.get("weight_rounding"),
            **({"accuracy_target": {"drop": target["drop"], "kept": [k["node"] for k in target["kept_float"]]}}
               if target else {})}


def _quantized(entry: Entry, fp32: Path, x_cal: np.ndarray, holdout: np.ndarray, out: Path,
               reuse: bool, y_cal: np.ndarray) -> dict[str, Any]:
    """Quantize (the run's info also goes to ``<out>.info.json``), or with ``reuse`` read a model written
    before and its info."""
    info_path = out.with_suffix(".info.json")
    if reuse and out.is_file() and info_path.is_file():
        return {**json.loads(info_path.read_text()), "reused": True}
    info = _quantize(entry, fp32, x_cal, holdout, out, y_cal)
    info_path.write_text(json.dumps(info, default=str))
    return info


def _target_text(row: dict[str, Any]) -> str:
    t = row.get("accuracy_target")
    if not t:
        return ""
    return (f"; drop {t['drop']['quantized']} -> {t['drop']['planned']} (search), {t['drop']['validation']} "
            f"(holdout); kept float: {', '.join(t['kept']) or 'nothing'}")


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"Top-1 / agreement with FP32 at `ORT_ENABLE_ALL` / `ORT_DISABLE_ALL` on {meta['n_val']} validation "
             f"images and {meta['n_eval']} training evaluation images; `pairs`: weight pairs that saturate "
             "onnxruntime's u8s8 kernels on x86 without VNNI (read from the file)"
             + (f"; `Haswell`: agreement at ORT_ENABLE_ALL under `qemu -cpu Haswell` on the first {meta['haswell']} "
                "validation images, with this CPU's ORT_DISABLE_ALL / with FP32" if meta.get("haswell") else "")
             + ".", "",
             "| model | val top-1 % | val agree % | train-eval top-1 % | train-eval agree % | pairs | "
             + ("Haswell agree % | " if meta.get("haswell") else "") + "b1 x FP32 | b32 x FP32 | quant s | kernels |",
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if meta.get("haswell") else "") + "---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:90]} |")
            continue
        pair = lambda key: f"{r[key + '_all']:.2f} / {r[key + '_disable']:.2f}"  # noqa: E731
        q = "-" if r.get("quant_s") is None else f"{r['quant_s']:.0f}"
        ops = r.get("ort_opt_ops", {})
        kernels = ", ".join(f"{k} {ops[k]}" for k in ("QLinearConv", "QGemm", "Conv", "FusedConv", "NchwcConv",
                                                      "DequantizeLinear", "Clip") if ops.get(k))
        has = ""
        if meta.get("haswell"):
            has = "- | " if r.get("haswell_vs_disable") is None else \
                f"{r['haswell_vs_disable']:.2f} / {r['haswell_vs_fp32']:.2f} | "
        lines.append(f"| {r['name']} | {pair('top1_val')} | {pair('agree_val')} | {pair('top1_eval')} | "
                     f"{pair('agree_eval')} | {r.get('pairs', '-')} | {has}{r['lat_b1_ratio']:.2f} | "
                     f"{r['lat_b32_ratio']:.2f} | {q} | {kernels} |")
    lines += ["", "| model | what | validation |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['what']}{_target_text(r)} | {r.get('validation') or '-'} |"
              for r in rows if "error" not in r]
    lines += ["", f"- Machine: {meta['nproc']} CPUs, {meta['cpu']} (flags: {', '.join(meta['cpu_flags'])}); "
              f"{meta['date']}; onnxruntime {meta['onnxruntime']}.",
              f"- Latency: median of {meta['latency_runs']} (batch 1) / {meta['latency_runs_b32']} (batch 32) runs "
              "after warmup, models interleaved run by run; ratios to FP32.",
              f"- Whole run: {meta['total_s']:.0f} s. Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=REPO_ROOT / "build" / "kernels")
    ap.add_argument("--only", help="comma-separated entry names (FP32 always runs)")
    ap.add_argument("--haswell", type=int, default=0, help="validation images to run under qemu -cpu Haswell")
    ap.add_argument("--reuse", action="store_true",
                    help="evaluate the models already in --out-dir (with their .info.json) instead of quantizing")
    ap.add_argument("--latency-runs", type=int, default=200)
    ap.add_argument("--latency-runs-b32", type=int, default=10)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", nargs="?", const="-", metavar="PATH")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    names = {n.strip() for n in (args.only or "").split(",") if n.strip()} - {"fp32"}
    unknown = names - {e.name for e in ENTRIES}
    if unknown:
        raise SystemExit(f"unknown --only {sorted(unknown)}; known: {[e.name for e in ENTRIES]}")
    entries = [e for e in ENTRIES if not names or e.name in names]
    t_start = time.perf_counter()
    out_dir, opt_dir = args.out_dir, args.out_dir / "ort_optimized"
    opt_dir.mkdir(parents=True, exist_ok=True)
    fp32 = export_efficientnet_lite0(REPO_ROOT / "build" / "models" / "efficientnet_lite0.onnx")
    splits = {"val": load_split("val"), "eval": load_split("eval")}
    x_cal, y_cal = load_split("calib")
    x_eval = splits["eval"][0]
    x_has = splits["val"][0][:args.haswell]
    from onnxq.core.graph import load_model
    from onnxq.report.kernel_check import saturating_pairs

    ref = evaluate(fp32, splits, opt_dir)
    rows: list[dict[str, Any]] = []
    paths = {"fp32": fp32}
    with tempfile.TemporaryDirectory() as tmp:
        has_fp32 = _haswell_predictions(fp32, x_has, Path(tmp)) if args.haswell else None
        jobs = [(Entry("fp32", "torch.onnx export, opset 13"), fp32)] + [(e, out_dir / f"{e.name}.onnx")
                                                                          for e in entries]
        for entry, path in jobs:
            print(f"[{entry.name}]", flush=True)
            try:
                info = {} if entry.name == "fp32" else _quantized(entry, fp32, x_cal, x_eval[:32], path, args.reuse,
                                                                             y_cal)
                res = ref if entry.name == "fp32" else evaluate(path, splits, opt_dir)
            except Exception as exc:  # keep going; record the failure
                rows.append({"name": entry.name, "what": entry.what, "error": f"{type(exc).__name__}: {exc}"})
                print(f"  FAILED: {exc}")
                continue
            row = {"name": entry.name, "what": entry.what, **info,
                   **{k: v for k, v in res.items() if not k.startswith("pred")},
                   "pairs": sum(saturating_pairs(load_model(path)).values())}
            for split in splits:
                for level in ("all", "disable"):
                    row[f"agree_{split}_{level}"] = float(np.mean(res[f"pred_{split}_{level}"] ==
                                                                  ref[f"pred_{split}_all"]) * 100)
            if args.haswell and has_fp32 is not None:
                pred = _haswell_predictions(path, x_has, Path(tmp))
                row["haswell_vs_disable"] = float(np.mean(pred == res["pred_val_disable"][:args.haswell]) * 100)
                row["haswell_vs_fp32"] = float(np.mean(pred == has_fp32) * 100)
            paths[entry.name] = path
            rows.append(row)
            shown = ("top1_val_all", "top1_val_disable", "agree_val_all", "agree_val_disable", "haswell_vs_disable",
                     "haswell_vs_fp32")
            print("  " + ", ".join(f"{k} {row[k]:.2f}" for k in shown if k in row) + f", pairs {row['pairs']}",
                  flush=True)
    lat1 = measure_latency(paths, x_eval, 1, args.latency_runs)
    lat32 = measure_latency(paths, x_eval, EVAL_BATCH, args.latency_runs_b32)
    for row in rows:
        if row["name"] in paths:
            row.update(lat_b1_ms=lat1[row["name"]], lat_b32_ms=lat32[row["name"]],
                       lat_b1_ratio=lat1[row["name"]] / lat1["fp32"], lat_b32_ratio=lat32[row["name"]] / lat32["fp32"])
            print(f"  {row['name']:30s} b1 {row['lat_b1_ratio']:.2f}x  b32 {row['lat_b32_ratio']:.2f}x")
    meta = {**machine_info(), "command": command, "n_val": len(splits["val"][1]), "n_eval": len(splits["eval"][1]),
            "haswell": args.haswell, "latency_runs": args.latency_runs, "latency_runs_b32": args.latency_runs_b32,
            "total_s": time.perf_counter() - t_start}
    write_results(args.json, {"meta": meta, "results": rows}, args.markdown, lambda: markdown(meta, rows))


if __name__ == "__main__":
    main()
