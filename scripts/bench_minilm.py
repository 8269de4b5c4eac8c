"""all-MiniLM-L6-v2 benchmark: ternary MatMul weights (per operator) vs INT8 / INT4, on sentence embeddings.

Model: ``scripts/export_minilm.py`` (ONNX opset 18; output = mean-pooled, L2-normalised embedding, so
pooling is inside the graph). Sentences: ``scripts/data/sentences.txt``, split by line index
(``i % 4 == 0`` -> calibration, the rest -> evaluation; only evaluation sentences are scored).

Rows: FP32; W8A8 with nothing excluded (onnxq's plain default, shows what breaks); then, with the
``--exclude`` op types kept float (default ``Add,Softmax``, see below), W8A8, W4A8 and ternary weights
(``QuantConfig(weight_bits=2, ternary_method=m)``) for m in rtn, twn, tquant, mquant-a, mquant-b, in
onnxq's "auto" container (INT4 on this onnxruntime), and ``ternary_twn_int2``: the same TWN codes stored
as INT2 (opset 25), run with onnxruntime's QDQ fusion off (it has no int2 QLinearMatMul). First
and last weighted layers stay 8-bit (``--first-last same`` makes them ternary too). Activations 8-bit
(uint8, ``--calib-method``, default minmax). Learned-rounding rows, run only when named in ``--only``:
``w4a8_adaround``, ``w4a8_brecq``, ``w4a8_qdrop``, ``w8a8_qdrop`` (fast schedule; ``--set`` overrides any
QuantConfig field) and their round-to-nearest baselines ``w4a8_same_length`` / ``w8a8_same_length``; their
calibration batches are padded to the longest calibration sentence, since reconstruction caches every
sample of a tensor in one array.

Metrics against the FP32 ONNX model on the evaluation sentences, with e = embedding (unit length):
  * cos_i = <e_i, e_i^fp32>: mean, min and 5th percentile;
  * Spearman rho between the upper triangles of the pairwise similarity matrices E E^T and
    E_fp32 E_fp32^T (a retrieval proxy: are pairs ranked the same way?);
  * NN@1: fraction of sentences whose nearest other sentence is the same as under FP32;
  * the same mean cos / Spearman for the *weights-only* copy of each model (every activation
    Q->DQ bypassed by ``onnxq.blocks.cache.weights_only``), which isolates the weight error;
  * quantization wall time, file size, and for ternary rows the ternary layers' sparsity and their
    weight bytes in the file vs FP32 (from the report's ``ternary`` section).

Why ``Add,Softmax`` stay float by default: the attention mask enters as ``scores + (1 - mask) * f32_min``;
with padded calibration batches the Add/Softmax input range reaches -3.4e38, so one uint8 scale wipes
out every real score; and the residual-stream Adds carry outlier channels that per-tensor uint8 cannot hold.

    python scripts/bench_minilm.py [--only NAME[,NAME]] [--exclude OPS] [--calib-method M]
        [--first-last 8|same] [--markdown PATH] [--json PATH] [--out-dir build/bench_minilm]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_efficientnet import interleaved_latency, machine_info, parse_overrides  # noqa: E402
from export_minilm import (  # noqa: E402
    DEFAULT_OUT,
    INSTALL_HINT,
    OUTPUT,
    SENTENCES,
    export_minilm,
    feeds,
    load_sentences,
    load_tokenizer,
    require_packages,
    split_sentences,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TERNARY = ("rtn", "twn", "tquant", "mquant-a", "mquant-b")
#: onnxruntime 1.31's QDQ fusion turns DQ(int2) -> MatMul into QLinearMatMul, which has no int2 kernel
#: (session creation fails at ORT_ENABLE_EXTENDED/ALL); without that one optimizer the graph runs.
INT2_DISABLED_OPTIMIZERS = ("QDQSelectorActionTransformer",)


@dataclass(frozen=True)
class Row:
    """One quantized row: ``QuantConfig`` keywords; whether ``--exclude`` applies; int2 weights;
    calibration batches all padded to one sequence length (needed by reconstruction); ``default``:
    run without ``--only`` (the reconstruction rows take minutes each, so they need naming)."""

    params: dict[str, Any]
    ort: str | None = None
    uses_exclude: bool = True
    int2: bool = False
    same_length: bool = False
    default: bool = True


CONFIGS: dict[str, Row] = {
    "w8a8_plain": Row({"weight_bits": 8}, uses_exclude=False),
    "w8a8": Row({"weight_bits": 8}),
    "w4a8": Row({"weight_bits": 4}),
    # SmoothQuant (``--smooth``: activation outliers moved into the next MatMul's weights, alpha searched).
    "w8a8_smooth": Row({"weight_bits": 8, "float_phase": {"smooth": True}}),
    "w8a8_plain_smooth": Row({"weight_bits": 8, "float_phase": {"smooth": True}}, uses_exclude=False),
    # Dynamic MatMul inputs (``--dynamic``), with and without SmoothQuant.
    "w8a8_dynamic": Row({"weight_bits": 8, "activations": {"dynamic": True}}, uses_exclude=False),
    "w8a8_dynamic_smooth": Row({"weight_bits": 8, "activations": {"dynamic": True}, "float_phase": {"smooth": True}},
                               uses_exclude=False),
    # The accuracy target (``--max-drop``, cosine of the embeddings): the fewest ops kept float that bring the
    # model within 0.2 points (cosine 0.998) of FP32; with SmoothQuant first, within 0.1.
    "w8a8_target": Row({"weight_bits": 8, "accuracy": {"max_drop": 0.2, "metric": "cosine"}}, uses_exclude=False),
    "w8a8_smooth_target": Row({"weight_bits": 8, "float_phase": {"smooth": True},
                               "accuracy": {"max_drop": 0.1, "metric": "cosine"}}, uses_exclude=False),
    # onnxruntime's own quantizers on the same data (QUInt8 activations, QInt8 weights, MatMuls only as
    # its transformer users run them): dynamic per-tensor and per-channel, and static QDQ per-channel MinMax.
    "ort_dynamic": Row({}, ort="dynamic", uses_exclude=False),
    "ort_dynamic_per_channel": Row({}, ort="dynamic_per_channel", uses_exclude=False),
    "ort_static": Row({}, ort="static", uses_exclude=False),
    # Learned rounding on the transformer (fast schedule): layer-wise AdaRound, BRECQ's blocks (one
    # attention or FFN sub-layer, closed at its residual Add + LayerNorm) and QDrop. Reconstruction
    # needs calibration sentences of one length, so these rows and their RTN baseline pad every
    # calibration batch to the longest calibration sentence.
    "w4a8_same_length": Row({"weight_bits": 4}, same_length=True, default=False),
    "w4a8_adaround": Row({"weight_bits": 4, "method": "adaround"}, same_length=True, default=False),
    "w4a8_brecq": Row({"weight_bits": 4, "method": "brecq"}, same_length=True, default=False),
    "w4a8_qdrop": Row({"weight_bits": 4, "method": "qdrop"}, same_length=True, default=False),
    "w8a8_same_length": Row({"weight_bits": 8}, same_length=True, default=False),
    "w8a8_qdrop": Row({"weight_bits": 8, "method": "qdrop"}, same_length=True, default=False),
    **{f"ternary_{m}": Row({"weight_bits": 2, "ternary_method": m}) for m in TERNARY},
    # Same codes as ternary_twn, stored as INT2 (opset 25); onnxq's validation would refuse int2 on
    # this onnxruntime, so it is off and the row runs without the QDQ fusion.
    "ternary_twn_int2": Row({"weight_bits": 2, "ternary_method": "twn", "ternary_storage": "int2",
                             "validate": False}, int2=True),
}


def embed(model, batches: list[dict[str, np.ndarray]], disabled_optimizers: Sequence[str] = ()) -> np.ndarray:
    """Embeddings of every batch (``model``: a path or an in-memory ModelProto), re-normalised;
    onnxruntime CPU at ORT_ENABLE_ALL minus ``disabled_optimizers``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3  # the weights-only copies leave unused scale initializers: not news
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled_optimizers))
    e = np.concatenate([sess.run([OUTPUT], b)[0] for b in batches]).astype(np.float64)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def measure_latency(model: Path, rows: list[dict[str, Any]], evaluation: list[dict[str, np.ndarray]],
                    runs: int) -> None:
    """Median latency of each row's file as a ratio to FP32's (``row["latency"]``), at batch 1 (the first
    evaluation sentence) and 16 (the first batch) (:func:`bench_efficientnet.interleaved_latency`)."""
    timed = [r for r in rows if (r.get("path") and not r.get("int2")) or r["name"] == "fp32"]
    paths = {r["name"]: Path(r["path"]) if r.get("path") else model for r in timed}
    first = evaluation[0]
    cases = {"b1": ({k: v[:1] for k, v in first.items()}, runs), "b16": (first, max(1, runs // 10))}
    for key, (feed, n) in cases.items():
        medians = interleaved_latency(paths, feed, n)
        base = medians["fp32"]
        for r in timed:
            r.setdefault("latency", {})[key] = medians[r["name"]] / base
            r["latency"][f"{key}_fp32_ms"] = base


def similarity_metrics(e: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """cos to FP32 (mean/min/p5), Spearman of pairwise similarities, nearest-neighbour agreement."""
    from scipy.stats import spearmanr

    cos = np.sum(e * ref, axis=1)
    iu = np.triu_indices(len(e), k=1)
    sim, sim_ref = e @ e.T, ref @ ref.T
    rho = float(spearmanr(sim[iu], sim_ref[iu]).statistic)
    np.fill_diagonal(sim, -np.inf)
    np.fill_diagonal(sim_ref, -np.inf)
    nn = float(np.mean(sim.argmax(1) == sim_ref.argmax(1)))
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "cos_p5": float(np.percentile(cos, 5)), "spearman": rho, "nn1": nn}


def file_bytes(path: Path) -> int:
    """The .onnx file plus its external-data file (``<name>.data``, written only past 2 GB)."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def float_op_summary(report: dict[str, Any], op_of: dict[str, str]) -> list[str]:
    """'reason: OpType xN, ...' lines from the report's float_ops (node -> reason)."""
    by_reason: dict[str, Counter] = {}
    for node, reason in (report.get("float_ops") or {}).items():
        by_reason.setdefault(reason, Counter())[op_of.get(node, node.split("(")[0])] += 1
    return [f"{reason}: " + ", ".join(f"{op} x{n}" for op, n in c.most_common())
            for reason, c in sorted(by_reason.items())]


def quantize_ort_row(name: str, kind: str, model: Path, calib: list, out_dir: Path) -> dict[str, Any]:
    """onnxruntime's quantize_dynamic / quantize_static on the FP32 model (weight MatMuls only)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    out = out_dir / f"{name}.onnx"
    t0 = time.perf_counter()
    if kind.startswith("dynamic"):
        quantize_dynamic(str(model), str(out), per_channel=kind.endswith("per_channel"), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"])
    else:
        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter(calib)

            def get_next(self):
                return next(self.batches, None)

        quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["MatMul"])
    return {"name": name, "path": str(out), "quant_s": time.perf_counter() - t0, "size_bytes": file_bytes(out)}


def quantize_row(name: str, params: dict[str, Any], model: Path, calib: list, val: list,
                 out_dir: Path) -> tuple[dict[str, Any], Any]:
    """Quantize with onnxq; returns (row, quantized ModelProto) or raises ``_Skip``."""
    import onnxq

    params = dict(params)
    sections = {k: params.pop(k) for k in ("float_phase", "activations", "accuracy") if k in params}  # Config only
    try:
        cfg = onnxq.QuantConfig(**params)
        if sections:
            cfg = cfg.to_config()
            cfg = dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v)
                                              for k, v in sections.items()})
    except (TypeError, onnxq.UserError) as exc:  # e.g. ternary_method before it existed
        raise _Skip(f"QuantConfig({params}) not available: {exc}") from None
    t0 = time.perf_counter()
    result = onnxq.quantize(str(model), calib, cfg, validation=val)
    seconds = time.perf_counter() - t0
    path = result.save(out_dir / f"{name}.onnx")
    report = result.report
    row: dict[str, Any] = {"name": name, "path": str(path), "quant_s": seconds,
                           "size_bytes": file_bytes(path),
                           "opset": report.get("opset"), "report": report}
    target = report.get("accuracy_target")
    if target:
        row["accuracy_target"] = {"drop": target["drop"], "kept": [k["node"] for k in target["kept_float"]],
                                  "seconds": target["seconds"]}
    tern = (report.get("ternary") or {}).get("total")
    if tern:
        row["ternary"] = {k: tern.get(k) for k in ("layers", "sparsity", "fp32_bytes", "effective_bytes",
                                                    "file_bytes", "file_vs_fp32", "containers")}
    return row, result.model


class _Skip(Exception):
    pass


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"### all-MiniLM-L6-v2 sentence embeddings ({meta['n_eval']} evaluation sentences, "
             f"{meta['n_calib']} calibration sentences)", "",
             "| model | cos mean | cos min | cos p5 | Spearman | NN@1 % | W-only cos | W-only Spearman "
             "| sparsity | ternary bytes / FP32 | size MB | quant s | b1 x FP32 | b16 x FP32 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    nan = float("nan")
    for r in rows:
        if "skip" in r or "error" in r:
            lines.append(f"| {r['name']} | {'skipped' if 'skip' in r else 'FAILED'}: "
                         f"{(r.get('skip') or r.get('error'))[:100]} |" + " |" * 10)
            continue
        m, w, t = r["metrics"], r.get("weights_only") or {}, r.get("ternary") or {}
        cells = [r["name"], f"{m['cos_mean']:.4f}", f"{m['cos_min']:.4f}", f"{m['cos_p5']:.4f}",
                 f"{m['spearman']:.4f}", f"{100 * m['nn1']:.1f}",
                 f"{w.get('cos_mean', nan):.4f}" if w else "-", f"{w.get('spearman', nan):.4f}" if w else "-",
                 f"{t['sparsity']:.3f}" if t else "-",
                 (f"{t['file_bytes'] / 1e6:.2f} / {t['fp32_bytes'] / 1e6:.1f} MB = {t['file_vs_fp32']:.3f} "
                  f"({'/'.join(t['containers'])})") if t else "-",
                 f"{r['size_bytes'] / 1e6:.1f}", "-" if r.get("quant_s") is None else f"{r['quant_s']:.1f}",
                 *(f"{r['latency'][b]:.2f}" if r.get("latency") else "-" for b in ("b1", "b16"))]
        lines.append("| " + " | ".join(cells) + " |")
    if meta.get("fp32_ms"):
        lines.append(f"\nLatency: onnxruntime CPU, ORT_ENABLE_ALL, default threads; median of {meta['latency_runs']} "
                     f"runs at batch 1 and {max(1, meta['latency_runs'] // 10)} at batch 16, the models interleaved "
                     f"run by run; ratio to FP32 ({meta['fp32_ms']['b1']:.1f} / {meta['fp32_ms']['b16']:.1f} ms).")
    lines += ["", f"- Model: `{meta['model']}` (opset {meta['fp32_opset']}; graph output = mean-pooled, "
              "L2-normalised embedding). `w8a8_plain`: onnxq's default with nothing excluded; every other "
              f"quantized row keeps `{','.join(meta['exclude']) or '(nothing)'}` in float.",
              f"- Activations 8-bit uint8, calibration `{meta['calib_method']}` on {meta['n_calib']} "
              f"sentences in batches of {meta['calib_batch']}; first/last weighted layers: "
              f"{meta['first_last']}. "
              "Ternary rows: `QuantConfig(weight_bits=2, ternary_method=...)`.",
              "- W-only: the same quantized model with every activation Q->DQ bypassed (weights still "
              "quantized), i.e. the weight error alone. NN@1: nearest other sentence unchanged vs FP32.",
              "- ternary bytes: the ternary layers' codes + scales as stored in the file (container in "
              "brackets), vs those layers' FP32 bytes. `*_int2` rows run at ORT_ENABLE_ALL minus "
              f"{', '.join(INT2_DISABLED_OPTIMIZERS)} (onnxruntime has no int2 QLinearMatMul) and skip "
              "onnxq's validation, which refuses int2 on this onnxruntime. The word-embedding table "
              "(Gather, 30522 x 384 = 46.9 MB FP32) is not quantized, "
              "so it dominates every file size.",
              *(f"- `{r['name']}` (accuracy target): drop {r['accuracy_target']['drop']}, "
                f"{len(r['accuracy_target']['kept'])} ops kept float "
                f"({', '.join(r['accuracy_target']['kept']) or 'none'}), "
                f"search {r['accuracy_target']['seconds']:.0f} s."
                for r in rows if r.get("accuracy_target")),
              "- Ops kept float in `w8a8` (report float_ops): " + "; ".join(meta.get("float_ops", [])) + ".",
              f"- Machine: {meta['nproc']} CPUs, {meta['cpu']}; {meta['date']}; onnxruntime "
              f"{meta['onnxruntime']}, onnx {meta['onnx']}, torch {meta['torch']}. "
              f"Whole run {meta['total_s']:.0f} s. "
              f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=f"needs: {INSTALL_HINT}")
    ap.add_argument("--model", type=Path, default=DEFAULT_OUT, help="exported if missing")
    ap.add_argument("--sentences", type=Path, default=SENTENCES)
    ap.add_argument("--out-dir", type=Path, default=REPO_ROOT / "build" / "bench_minilm")
    ap.add_argument("--only", help=f"comma-separated rows among {', '.join(CONFIGS)} (FP32 always runs; "
                    "without it, every row except the reconstruction ones)")
    ap.add_argument("--exclude", default="Add,Softmax", help="op types / node names kept float ('' = none)")
    ap.add_argument("--calib-method", default="minmax", help="activation range method")
    ap.add_argument("--first-last", choices=("8", "same"), default="8",
                    help="first/last weighted layers at 8 bits (default) or at the row's width")
    ap.add_argument("--calib-batch", type=int, default=8)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--latency-runs", type=int, default=100,
                    help="timed runs per model at batch 1 (a tenth of them at batch 16), interleaved; 0: none")
    ap.add_argument("--limit", type=int, help="score only the first N evaluation sentences")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a QuantConfig field in every row (repeatable; VALUE is JSON, else a "
                         "string), e.g. --set recon_iters=600")
    ap.add_argument("--json", type=Path, help="write all results to this JSON file")
    ap.add_argument("--markdown", nargs="?", const="-", metavar="PATH",
                    help="print, or write to PATH, the table")
    ap.add_argument("-v", "--verbose", action="store_true", help="onnxq INFO logs")
    args = ap.parse_args(argv)
    require_packages()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
    else:
        names = [n for n, row in CONFIGS.items() if row.default]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"error: unknown row(s) {unknown}: choose among {', '.join(CONFIGS)}")
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    t_start = time.perf_counter()

    import onnx

    model = export_minilm(args.model)
    tokenizer = load_tokenizer()
    calib_s, eval_s = split_sentences(load_sentences(args.sentences))
    eval_s = eval_s[:args.limit] if args.limit else eval_s
    calib = feeds(tokenizer, calib_s, args.calib_batch)
    calib_same = feeds(tokenizer, calib_s, args.calib_batch, same_length=True)
    evaluation = feeds(tokenizer, eval_s, args.eval_batch)
    print(f"{len(calib_s)} calibration / {len(eval_s)} evaluation sentences; model {model}")
    exclude = tuple(x.strip() for x in args.exclude.split(",") if x.strip())
    overrides = parse_overrides(args.overrides)
    op_of = {n.name: n.op_type for n in onnx.load(str(model), load_external_data=False).graph.node}
    args.out_dir.mkdir(parents=True, exist_ok=True)

    ref = embed(model, evaluation)
    fp32 = onnx.load(str(model), load_external_data=False)
    rows: list[dict[str, Any]] = [{"name": "fp32", "metrics": similarity_metrics(ref, ref), "quant_s": None,
                                   "size_bytes": file_bytes(model)}]
    try:
        from onnxq.blocks.cache import weights_only
    except ImportError as exc:
        weights_only = None
        print(f"note: no weights-only columns ({exc})")
    meta_float_ops: list[str] = []
    for name in names:
        spec = CONFIGS[name]
        params = {**spec.params, "calib_method": args.calib_method,
                  "exclude": exclude if spec.uses_exclude else (), **overrides}
        off = INT2_DISABLED_OPTIMIZERS if spec.int2 else ()
        if args.first_last == "same":
            params["first_last_bits"] = None
        print(f"[{name}] quantizing {spec.ort or params}", flush=True)
        try:
            if spec.ort:
                row, qmodel = quantize_ort_row(name, spec.ort, model, calib, args.out_dir), None
            else:
                row, qmodel = quantize_row(name, params, model, calib_same if spec.same_length else calib,
                                           evaluation[:2], args.out_dir)
            row["metrics"] = similarity_metrics(embed(Path(row["path"]), evaluation, off), ref)
            row["int2"] = spec.int2  # runs only without the QDQ fusion: no latency
            if weights_only is not None and qmodel is not None:
                row["weights_only"] = similarity_metrics(embed(weights_only(qmodel), evaluation, off), ref)
        except _Skip as exc:
            print(f"  SKIP {name}: {exc}")
            rows.append({"name": name, "skip": str(exc)})
            continue
        except Exception as exc:  # keep going; the table records the failure
            print(f"  FAILED {name}: {type(exc).__name__}: {exc}")
            rows.append({"name": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"})
            continue
        if "report" in row and (name == "w8a8" or not meta_float_ops):
            meta_float_ops = float_op_summary(row["report"], op_of)
        m, w = row["metrics"], row.get("weights_only", {})
        print(f"  cos mean {m['cos_mean']:.4f} min {m['cos_min']:.4f} p5 {m['cos_p5']:.4f} "
              f"spearman {m['spearman']:.4f} nn1 {m['nn1']:.3f} | "
              f"weights-only cos {w.get('cos_mean', float('nan')):.4f} "
              f"| {row['quant_s']:.1f} s, {row['size_bytes'] / 1e6:.1f} MB", flush=True)
        rows.append(row)

    if args.latency_runs:
        measure_latency(model, rows, evaluation, args.latency_runs)
    total_s = time.perf_counter() - t_start
    shown = model.relative_to(REPO_ROOT) if model.is_relative_to(REPO_ROOT) else model
    meta = {**machine_info(), "command": command, "model": str(shown),
            "fp32_opset": max(o.version for o in fp32.opset_import if o.domain in ("", "ai.onnx")),
            "n_eval": len(eval_s), "n_calib": len(calib_s), "calib_batch": args.calib_batch,
            "calib_method": args.calib_method, "exclude": exclude, "float_ops": meta_float_ops,
            "first_last": "8-bit" if args.first_last == "8" else "same as the row", "total_s": total_s,
            "latency_runs": args.latency_runs,
            "fp32_ms": {k: rows[0]["latency"][f"{k}_fp32_ms"] for k in ("b1", "b16")} if args.latency_runs else None}
    print(f"total wall time {total_s:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        slim = [{k: v for k, v in r.items() if k != "report"} for r in rows]
        args.json.write_text(json.dumps({"meta": meta, "results": slim}, indent=2, default=str))
    text = markdown(meta, rows)
    if args.markdown and args.markdown != "-":
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text)
        print(f"wrote {args.markdown}")
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
