"""EfficientNet-Lite0 under each onnxq target profile: rule check, onnxruntime vs OpenVINO top-1.

Every entry quantizes ``build/models/efficientnet_lite0.onnx`` with ``onnxq.quantize`` on all 250
calibration images (feeds of 25) and ``QuantConfig(target=..., seed=0, ...)``; the report's
fidelity check runs on the first 32 evaluation images (they never influence the model). Entries:
one per target profile (``ort-cpu``, ``tensorrt``, ``openvino``, ``qnn``, ``qnn-a16``,
``npu-pow2``, each with its own defaults), and per-tensor-weight variants of ``npu-pow2`` and
``ort-cpu`` (int8) with data-free quantization: plain, cross-layer equalization
(``equalize=True``), and equalization plus data-based bias correction
(``bias_correction="data"``).

Per model (FP32 and each quantized one), on the evaluation split: the count of
``onnxq.targets.rules.check_target`` violations against the entry's target, top-1 in onnxruntime (CPU) and
in OpenVINO (CPU plugin, f32 inference precision for the float parts), the absolute top-1 gap,
and the ORT-vs-OpenVINO top-1 agreement (same predicted class).
Results are rewritten after every model (``--json``, ``--markdown PATH``), so an interrupted run
keeps what finished.

    python scripts/bench_targets.py [--out-dir build/bench_targets] [--only NAME[,NAME]]
        [--limit N] [--json results.json] [--markdown [PATH]]

Full run::

    python scripts/bench_targets.py --json build/bench_targets/targets.json \\
        --markdown build/bench_targets/targets.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_efficientnet import machine_info  # noqa: E402
from export_efficientnet import export_efficientnet_lite0  # noqa: E402
from imagenet_sample import PREPROC_TAG, load_split  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
INPUT = "input"
CALIB_BATCH = 25
EVAL_BATCH = 50
HOLDOUT = 32


@dataclass(frozen=True)
class Entry:
    """One quantized model: a target profile and extra ``onnxq.QuantConfig`` keyword arguments."""

    name: str
    target: str
    params: tuple[tuple[str, Any], ...] = ()

    def config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``QuantConfig`` for this entry."""
        return {"target": self.target, "seed": 0, **dict(self.params)}

    def describe(self) -> str:
        """The settings beyond the target's defaults, for the table."""
        return ", ".join(f"{k}={v!r}" for k, v in self.params) or "target defaults"


_PT = (("per_channel", False),)
_CLE = (*_PT, ("equalize", True))
_CLE_BC = (*_CLE, ("bias_correction", "data"))
ENTRIES: list[Entry] = [
    Entry("ort-cpu", "ort-cpu"),
    Entry("tensorrt", "tensorrt"),
    Entry("openvino", "openvino"),
    Entry("qnn", "qnn"),
    Entry("qnn-a16", "qnn-a16"),
    Entry("npu-pow2", "npu-pow2"),
    Entry("npu-pow2_pt", "npu-pow2", _PT),
    Entry("npu-pow2_pt_cle", "npu-pow2", _CLE),
    Entry("npu-pow2_pt_cle_bc", "npu-pow2", _CLE_BC),
    Entry("ort-cpu_pt", "ort-cpu", _PT),
    Entry("ort-cpu_pt_cle", "ort-cpu", _CLE),
    Entry("ort-cpu_pt_cle_bc", "ort-cpu", _CLE_BC),
]


def _batches(x: np.ndarray, size: int) -> list[dict[str, np.ndarray]]:
    return [{INPUT: x[i:i + size]} for i in range(0, len(x), size)]


def quantize_entry(entry: Entry, fp32: Path, calib_x: np.ndarray, holdout_x: np.ndarray,
                   out: Path) -> dict[str, Any]:
    """Quantize with onnxq and save to ``out``; return wall time and the fidelity check summary."""
    import onnxq

    cfg = onnxq.QuantConfig(**entry.config_kwargs())
    t0 = time.perf_counter()
    result = onnxq.quantize(str(fp32), _batches(calib_x, CALIB_BATCH), cfg,
                            validation=[{INPUT: holdout_x}])
    result.save(out)
    info: dict[str, Any] = {"quant_s": time.perf_counter() - t0}
    if result.validation is not None and result.validation.outputs:
        fid = result.validation.outputs[0]
        info.update(holdout_agree_fp32=fid.top1_agreement, holdout_sqnr_db=fid.sqnr_db)
    return info


def evaluate(path: Path, target: str | None, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Rule check against ``target`` (None: skipped) and top-1 in onnxruntime and OpenVINO."""
    import onnx

    from onnxq.targets.openvino_check import run_openvino, run_ort
    from onnxq.targets.rules import check_target

    row: dict[str, Any] = {}
    if target is not None:
        violations = check_target(onnx.load(str(path)), target)
        row["violations"] = len(violations)
        row["violation_examples"] = [str(v) for v in violations[:3]]
    feeds = _batches(x, EVAL_BATCH)
    t0 = time.perf_counter()
    pred_ort = run_ort(path, feeds)[0].argmax(axis=1)
    t1 = time.perf_counter()
    pred_ov = run_openvino(path, feeds)[0].argmax(axis=1)
    t2 = time.perf_counter()
    row.update(top1_ort=float(np.mean(pred_ort == y) * 100), top1_ov=float(np.mean(pred_ov == y) * 100),
               agree_ort_ov=float(np.mean(pred_ort == pred_ov) * 100),
               eval_ort_s=t1 - t0, eval_ov_s=t2 - t1)
    row["gap"] = abs(row["top1_ort"] - row["top1_ov"])
    return row


def markdown_report(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Markdown section: results table and setup lines."""
    lines = [
        f"### EfficientNet-Lite0 per target profile ({meta['n_eval']} eval images, "
        f"{meta['n_calib']} calibration images)", "",
        "| model | target | settings | rule violations | top-1 ORT % | top-1 OpenVINO % | gap (pts) "
        "| ORT-OV agree % | quant s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r['name']} | {r.get('target') or '-'} | {r.get('settings', '')} "
        if "error" in r:
            lines.append(head + f"| failed: {r['error'][:100]} |" + " |" * 5)
            continue
        viol = "-" if r.get("violations") is None else str(r["violations"])
        quant = "-" if r.get("quant_s") is None else f"{r['quant_s']:.0f}"
        lines.append(head + f"| {viol} | {r['top1_ort']:.2f} | {r['top1_ov']:.2f} | {r['gap']:.2f} "
                     f"| {r['agree_ort_ov']:.2f} | {quant} |")
    lines += [
        "",
        f"- Machine: {meta['nproc']} CPUs, {meta['cpu']} (flags: {', '.join(meta['cpu_flags'])}); "
        f"{meta['date']}; load average (1 min) {meta['loadavg_start'][0]:.1f} at start, "
        f"{meta['loadavg_end'][0]:.1f} at end.",
        f"- Versions: Python {meta['python']}, onnxruntime {meta['onnxruntime']}, "
        f"OpenVINO {meta['openvino']}, onnx {meta['onnx']}, torch {meta['torch']}, "
        f"numpy {meta['numpy']}.",
        f"- Quantization: `onnxq.quantize` on all {meta['n_calib']} calibration images (feeds of "
        f"{CALIB_BATCH}), `QuantConfig(target=..., seed=0, <settings>)`; the validation report uses "
        f"the first {HOLDOUT} evaluation images (no influence on the model). pt = per-tensor "
        "weights, cle = `equalize=True`, bc = `bias_correction=\"data\"`.",
        "- Rule violations: `len(onnxq.targets.rules.check_target(model, target))`.",
        f"- Accuracy: top-1 in onnxruntime (CPUExecutionProvider) and OpenVINO (CPU, f32 inference "
        f"precision) with batches of {EVAL_BATCH}; gap = |ORT - OpenVINO|; agree = same top-1 class "
        f"in both. Preprocessing: {meta['preprocessing']}.",
        f"- Whole run: {meta['total_s']:.0f} s. Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def _select(only: str | None) -> list[Entry]:
    if not only:
        return list(ENTRIES)
    names = {n.strip() for n in only.split(",") if n.strip()} - {"fp32"}
    known = {e.name for e in ENTRIES}
    if names - known:
        raise SystemExit(f"unknown --only name(s) {sorted(names - known)}; known: fp32, {sorted(known)}")
    return [e for e in ENTRIES if e.name in names]


def _write(args: argparse.Namespace, meta: dict[str, Any], rows: list[dict[str, Any]],
           final: bool) -> None:
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2, default=str))
    if args.markdown and args.markdown != "-":
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(markdown_report(meta, rows))
    if final:
        if args.json:
            print(f"wrote {args.json}")
        if args.markdown == "-":
            print(markdown_report(meta, rows))
        elif args.markdown:
            print(f"wrote {args.markdown}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=REPO_ROOT / "build" / "bench_targets")
    ap.add_argument("--only", help="comma-separated entry names (FP32 always runs)")
    ap.add_argument("--limit", type=int, help="use only the first N evaluation images")
    ap.add_argument("--json", type=Path, help="write all results to this JSON file")
    ap.add_argument("--markdown", nargs="?", const="-", metavar="PATH",
                    help="print (or write to PATH) the markdown report")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    t_start, load_start = time.perf_counter(), os.getloadavg()
    import openvino

    entries = _select(args.only)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    fp32 = export_efficientnet_lite0(REPO_ROOT / "build" / "models" / "efficientnet_lite0.onnx")
    x_eval, y_eval = load_split("eval", args.limit)
    x_cal, _ = load_split("calib")
    holdout = x_eval[:HOLDOUT]
    print(f"eval {x_eval.shape}, calib {x_cal.shape}, preprocessing {PREPROC_TAG}", flush=True)
    meta: dict[str, Any] = {**machine_info(), "openvino": openvino.__version__, "command": command,
                            "n_eval": int(len(y_eval)), "n_calib": int(len(x_cal)),
                            "preprocessing": PREPROC_TAG, "loadavg_start": load_start}

    rows: list[dict[str, Any]] = []
    jobs: list[Entry | None] = [None, *entries]
    for entry in jobs:
        name = "fp32" if entry is None else entry.name
        t0 = time.perf_counter()
        row: dict[str, Any] = {"name": name, "target": None if entry is None else entry.target,
                               "settings": "float model" if entry is None else entry.describe()}
        try:
            if entry is None:
                path = fp32
            else:
                path = args.out_dir / f"lite0_{name}.onnx"
                print(f"[{name}] quantizing", flush=True)
                row.update(quantize_entry(entry, fp32, x_cal, holdout, path))
            print(f"[{name}] evaluating", flush=True)
            row.update(path=str(path), **evaluate(path, row["target"], x_eval, y_eval))
        except Exception as exc:  # keep the benchmark going; record the failure
            print(f"  FAILED {name}: {type(exc).__name__}: {exc}", flush=True)
            row["error"] = f"{type(exc).__name__}: {exc}"
        row["total_s"] = time.perf_counter() - t0
        rows.append(row)
        if "error" not in row:
            print(f"  violations {row.get('violations', '-')}  top1 ORT {row['top1_ort']:.2f}%  "
                  f"OV {row['top1_ov']:.2f}%  agree {row['agree_ort_ov']:.2f}%  "
                  f"({row['total_s']:.0f} s)", flush=True)
        meta.update(total_s=time.perf_counter() - t_start, loadavg_end=os.getloadavg())
        _write(args, meta, rows, final=False)
    print(f"total wall time {meta['total_s']:.0f} s")
    _write(args, meta, rows, final=True)


if __name__ == "__main__":
    main()
