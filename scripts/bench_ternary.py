"""Ternary EfficientNet-Lite0: the five ternary operators, data-free or as the start of reconstruction.

Weights ternary ({-1, 0, 1} times a per-channel scale) except the first and last layers (8-bit),
activations uint8 (minmax calibration on the 250 calibration images), target ort-cpu. Per operator,
on the 750-image evaluation split: top-1, top-1 agreement with FP32, sparsity of the ternary codes,
the ternary layers' file bytes against their FP32 bytes (and the 2-bit size: 2 bits a weight +
scales), and the file size. ``--method brecq|adaround|qdrop`` starts reconstruction (fast CPU
schedule, about 25 minutes an operator on 2 cores) from each operator's codes and scale;
``--learn-weight-scale`` also learns the weight scales. The default container on ort-cpu is INT2
(opset 25), read through a Cast to int8 where onnxruntime cannot fuse int2 kernels
(:mod:`onnxq.core.weight_cast`); ``--storage int4|int8`` writes wider containers (same codes, same top-1).

``--tuning stats|bias`` adds statistics or bias tuning after each operator (and reconstruction);
``--depthwise-bits 4|8`` keeps the 16 depthwise layers at that width through a bit plan.

    python scripts/bench_ternary.py [--method rtn|brecq|...] [--only rtn,twn,...] [--storage auto]
        [--learn-weight-scale] [--tuning stats|bias] [--depthwise-bits 8] [--limit N]
        [--out-dir build/bench_ternary]
        [--json PATH] [--markdown [PATH]]

Data and helpers come from scripts/bench_efficientnet.py and scripts/imagenet_sample.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_efficientnet import (  # noqa: E402
    _W8A8,
    CALIB_BATCH,
    OnnxqEntry,
    evaluate,
    machine_info,
    quantize_onnxq,
    write_results,
)
from export_efficientnet import export_efficientnet_lite0  # noqa: E402
from imagenet_sample import PREPROC_TAG, load_split  # noqa: E402

from onnxq.ternary.operators import METHODS  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def entries(method: str, only: list[str], storage: str, learn_scale: bool,
            recon: dict[str, int] | None = None, tuning: str | None = None,
            depthwise: dict[str, int] | None = None) -> list[OnnxqEntry]:
    """One onnxq configuration per operator (``tuning``: "stats" or "bias" tuning after it;
    ``depthwise``: a bit plan for the depthwise layers)."""
    out = []
    for op in only:
        params = {**_W8A8, "weight_bits": 2, "ternary_method": op, "ternary_storage": storage,
                  "first_last_bits": 8, "calib_method": "minmax", "method": method, **(recon or {})}
        if learn_scale:
            params["learn_weight_scale"] = True
        if tuning:
            params[f"{tuning}_tuning"] = True
        if depthwise:
            params["bit_plan"] = dict(depthwise)
        tag = (f"tern_{op}" + ("" if method == "rtn" else f"_{method}") + ("_ls" if learn_scale else "")
               + (f"_{tuning[0]}t" if tuning else "")
               + (f"_dw{next(iter(depthwise.values()))}" if depthwise else ""))
        out.append(OnnxqEntry(tag, params))
    return out


def folded_weights(fp32: Path) -> dict[str, np.ndarray]:
    """The float initializers after onnxq's float phase (BatchNorm folded): what the operators see."""
    from onnx import numpy_helper

    import onnxq
    from onnxq.api import prepare_float
    from onnxq.core import graph as g

    reference, _ = prepare_float(g.load_model(fp32), onnxq.QuantConfig())
    return {t.name: numpy_helper.to_array(t) for t in reference.graph.initializer}


def depthwise_layers(fp32: Path) -> list[str]:
    """Names of the depthwise Conv nodes (group = input channels > 1) of the float model."""
    import onnx

    model = onnx.load(str(fp32))
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        w = shapes.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if w and group > 1 and w[1] == 1:  # weight (C_out, C_in / group = 1, kh, kw)
            out.append(node.name)
    return out


def weight_error(path: Path, report: dict[str, Any], folded: dict[str, np.ndarray]) -> float | None:
    """Mean over the ternary layers of ||W - W_hat||^2 / ||W||^2 (W_hat = codes * scale in the file)."""
    import onnx
    from onnx import numpy_helper

    from onnxq.core.weight_cast import cast_source, folded_casts

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    casts = folded_casts(model.graph)
    scale_of = {cast_source(casts, n.input[0]): n.input[1] for n in model.graph.node
                if n.op_type == "DequantizeLinear"}  # tuning passes rename scales: follow the DQ
    errs = []
    for layer in (report.get("ternary") or {}).get("layers", []):
        w = folded.get(layer["weight"])
        if w is None or layer["codes"] not in inits or scale_of.get(layer["codes"]) not in inits:
            continue
        codes = numpy_helper.to_array(inits[layer["codes"]]).astype(np.float64)
        scale = numpy_helper.to_array(inits[scale_of[layer["codes"]]]).astype(np.float64)
        axis = 0 if scale.size == codes.shape[0] and scale.ndim == 1 else None
        w_hat = codes * (scale.reshape((-1,) + (1,) * (codes.ndim - 1)) if axis == 0 else scale)
        errs.append(float(np.sum((w - w_hat) ** 2) / max(np.sum(w.astype(np.float64) ** 2), 1e-30)))
    return float(np.mean(errs)) if errs else None


def run_one(entry: OnnxqEntry, fp32: Path, x_cal: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray,
            ref_pred: np.ndarray, out_dir: Path, folded: dict[str, np.ndarray]) -> dict[str, Any]:
    path = out_dir / f"{entry.name}.onnx"
    print(f"[{entry.name}] quantizing")
    info = quantize_onnxq(entry, fp32, x_cal, path, x_eval[:32])
    if info is None:
        raise RuntimeError("onnxq rejected the configuration")
    report = json.loads(path.with_suffix(".report.json").read_text())
    tern = report.get("ternary") or {}
    total = tern.get("total", {})
    print(f"[{entry.name}] evaluating")
    res = evaluate(path, x_eval, y_eval, out_dir / "ort_opt")
    row = {
        "name": entry.name, "operator": entry.params["ternary_method"], "method": entry.params["method"],
        "storage": tern.get("storage"), "top1": res["top1"], "agree": float(np.mean(res["pred"] == ref_pred) * 100),
        "sparsity": total.get("sparsity"), "ternary_layers": total.get("layers"),
        "ternary_fp32_bytes": total.get("fp32_bytes"), "ternary_file_bytes": total.get("file_bytes"),
        "ternary_effective_bytes": total.get("effective_bytes"), "file_vs_fp32": total.get("file_vs_fp32"),
        "effective_vs_fp32": total.get("effective_vs_fp32"), "size_bytes": path.stat().st_size,
        "quant_s": info["quant_s"], "ternary_ok": tern.get("ok"),
        "ort_level": res.get("ort_level", "ORT_ENABLE_ALL"), "opset": report.get("opset"),
        "validation_ok": (report.get("validation") or {}).get("ok"),
        "weight_rel_mse": weight_error(path, report, folded),
        "logit_cosine": next(iter((report.get("validation") or {}).get("outputs") or []), {}).get("cosine"),
    }
    if "reconstruction" in report:
        rec = report["reconstruction"]
        row["recon"] = {"improved_blocks": rec.get("improved_blocks"), "seconds": rec.get("seconds")}
    print(f"  top1 {row['top1']:.2f}%  agree {row['agree']:.2f}%  sparsity {100 * (row['sparsity'] or 0):.1f}%  "
          f"ternary bytes {row['ternary_file_bytes']} / FP32 {row['ternary_fp32_bytes']}  "
          f"file {row['size_bytes'] / 1e6:.2f} MB")
    return row


def markdown(meta: dict[str, Any], fp32_row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    changed = ", ".join(f"{k.removeprefix('recon_')} {v}" for k, v in meta.get("recon", {}).items())
    schedule = f"fast schedule, {changed}" if changed else "fast schedule"
    title = "data-free" if meta["method"] == "rtn" else f"{meta['method']} ({schedule}) started from each operator"
    dw = meta.get("depthwise_bits")
    kept = "the first and last layers" + (f" and the {meta['n_depthwise']} depthwise ones" if dw else "")
    widths = f"first/last 8-bit, depthwise {dw}-bit" if dw else "8-bit"
    lines = [f"### Ternary EfficientNet-Lite0, {title} ({meta['n_eval']} eval images)", "",
             f"Weights ternary except {kept} ({widths}); activations uint8 (minmax, "
             f"{meta['n_calib']} calibration images); target ort-cpu.", "",
             "| operator | storage | top-1 % | agree w/ FP32 % | logit cos | weight rel. MSE | sparsity % "
             "| ternary bytes / FP32 | 2-bit size / FP32 | file MB | quant s | ORT level |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
             f"| FP32 | - | {fp32_row['top1']:.2f} | 100.00 | 1 | 0 | - | - | - | {fp32_row['size_bytes'] / 1e6:.2f} "
             "| - | ORT_ENABLE_ALL |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:100]} |" + " |" * 10)
            continue
        lines.append(
            f"| {r['operator']} | {r['storage']} | {r['top1']:.2f} | {r['agree']:.2f} "
            f"| {'-' if r['logit_cosine'] is None else format(r['logit_cosine'], '.3f')} "
            f"| {'-' if r['weight_rel_mse'] is None else format(r['weight_rel_mse'], '.3f')} "
            f"| {100 * r['sparsity']:.1f} "
            f"| {r['ternary_file_bytes'] / 1e6:.3f} MB / {r['ternary_fp32_bytes'] / 1e6:.3f} MB = "
            f"1/{1 / r['file_vs_fp32']:.1f} | 1/{1 / r['effective_vs_fp32']:.1f} | {r['size_bytes'] / 1e6:.2f} "
            f"| {r['quant_s']:.0f} | {r['ort_level']} |")
    first = next((r for r in rows if "error" not in r), None)
    if first:
        lines += ["", f"- Ternary layers: {first['ternary_layers']} (all weighted layers but {kept}); "
                  "sparsity = fraction of zero codes over them; bytes = their codes + float32 per-channel "
                  "scales as stored in the file; logit cos = cosine of the logits to FP32 on 32 held-out "
                  "evaluation images (onnxq's validation; '-' where it was off); weight rel. MSE = mean over "
                  "the ternary layers of ||W - W_hat||^2 / ||W||^2 against the BatchNorm-folded float weights."]
    lines += [
        f"- Machine: {meta['nproc']} CPUs, {meta['cpu']}; {meta['date']}; onnxruntime {meta['onnxruntime']}, "
        f"onnx {meta['onnx']}, torch {meta['torch']}. Load average (1 min) {meta['loadavg_start'][0]:.1f} at start, "
        f"{meta['loadavg_end'][0]:.1f} at end.",
        f"- Preprocessing: {meta['preprocessing']}. Whole run: {meta['total_s']:.0f} s. "
        f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="rtn", choices=("rtn", "adaround", "brecq", "qdrop"),
                    help="rtn: data-free; otherwise reconstruction started from each operator (fast schedule)")
    ap.add_argument("--only", default=",".join(METHODS), help="comma-separated operators (default: all five)")
    ap.add_argument("--storage", default="auto", choices=("auto", "int2", "int4", "int8"))
    ap.add_argument("--learn-weight-scale", action="store_true", help="reconstruction also learns weight scales")
    ap.add_argument("--tuning", choices=("stats", "bias"), help="statistics or bias tuning after each operator")
    ap.add_argument("--depthwise-bits", type=int, choices=(4, 8),
                    help="keep the depthwise layers at this width (a bit plan), the rest ternary")
    ap.add_argument("--iters", type=int, help="reconstruction iterations per block (default: the fast schedule)")
    ap.add_argument("--recon-samples", type=int, help="calibration samples per block (default: the fast schedule)")
    ap.add_argument("--limit", type=int, help="use only the first N evaluation images")
    ap.add_argument("--calib-limit", type=int, help="use only the first N calibration images")
    ap.add_argument("--out-dir", type=Path, default=REPO_ROOT / "build" / "bench_ternary")
    ap.add_argument("--json", type=Path, help="write all results to this JSON file")
    ap.add_argument("--markdown", nargs="?", const="-", metavar="PATH", help="print (or write to PATH) the table")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    only = [o.strip() for o in args.only.split(",") if o.strip()]
    unknown = sorted(set(only) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown operator(s) {unknown}; known: {', '.join(METHODS)}")
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    t_start, load_start = time.perf_counter(), os.getloadavg()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "ort_opt").mkdir(exist_ok=True)
    fp32 = export_efficientnet_lite0(REPO_ROOT / "build" / "models" / "efficientnet_lite0.onnx")
    x_eval, y_eval = load_split("eval", args.limit)
    x_cal, _ = load_split("calib", args.calib_limit)
    print(f"eval {x_eval.shape}, calib {x_cal.shape} (batches of {CALIB_BATCH}), preprocessing {PREPROC_TAG}")
    ref = evaluate(fp32, x_eval, y_eval, args.out_dir / "ort_opt")
    fp32_row = {"top1": ref["top1"], "size_bytes": fp32.stat().st_size}
    print(f"[fp32] top1 {ref['top1']:.2f}%")
    folded = folded_weights(fp32)
    rows = []
    recon = {k: v for k, v in (("recon_iters", args.iters), ("recon_samples", args.recon_samples)) if v is not None}
    depthwise = depthwise_layers(fp32)
    for entry in entries(args.method, only, args.storage, args.learn_weight_scale, recon, args.tuning,
                         {n: args.depthwise_bits for n in depthwise} if args.depthwise_bits else None):
        try:
            rows.append(run_one(entry, fp32, x_cal, x_eval, y_eval, ref["pred"], args.out_dir, folded))
        except Exception as exc:  # keep going; the table records the failure
            print(f"  FAILED {entry.name}: {type(exc).__name__}: {exc}")
            rows.append({"name": entry.name, "error": f"{type(exc).__name__}: {exc}"})
    meta = {**machine_info(), "command": command, "method": args.method, "n_eval": int(len(y_eval)),
            "n_calib": int(len(x_cal)), "preprocessing": PREPROC_TAG, "total_s": time.perf_counter() - t_start,
            "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "recon": recon,
            "depthwise_bits": args.depthwise_bits, "n_depthwise": len(depthwise)}
    write_results(args.json, {"meta": meta, "fp32": fp32_row, "results": rows}, args.markdown,
                  lambda: markdown(meta, fp32_row, rows))


if __name__ == "__main__":
    main()
