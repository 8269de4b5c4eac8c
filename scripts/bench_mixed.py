"""EfficientNet-Lite0 mixed precision: integer-programming bit plans vs uniform W4A8 (round to nearest).

Rows (top-1 and agreement with FP32 on the 750-image evaluation split; calibration on the 250
calibration images, of which the sensitivity table holds out 50 for its measurements):

* ``fp32``;
* ``uniform_w4a8`` / ``uniform_w4a8_bc``: 4-bit weights, 8-bit first/last layers, without / with
  bias correction (data);
* ``milp_w4size`` / ``milp_w4size_bc``: the integer program's plan (widths 8/4/2 by default) at the
  weight size of uniform W4A8, quantized by ``onnxq.quantize`` with ``bit_plan`` (same table and
  plan for the bias-corrected row);
* a size/accuracy curve: plans for several size budgets, and uniform W8/W4/W2 for reference,
  quantized with one shared calibration (:class:`onnxq.pipeline.calibrated.CalibratedModel`, the same
  activations and weights as ``onnxq.quantize``; checked against the ``milp_w4size`` model).

Writes ``results.json``, ``bench_mixed.md``, ``size_accuracy.png``, the sensitivity table and the
plans into ``--out-dir``.

    python scripts/bench_mixed.py [--out-dir DIR] [--widths 8,4,2] [--measure mse]
        [--budgets 0.5,0.56,w4,0.75,0.88] [--table TABLE.json] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_efficientnet import CALIB_BATCH, INPUT, evaluate, machine_info  # noqa: E402
from export_efficientnet import export_efficientnet_lite0  # noqa: E402
from imagenet_sample import PREPROC_TAG, load_split  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
W8A8 = dict(target="ort-cpu", weight_bits=8, per_channel=True, activation_dtype="uint8", scale_kind="float",
            calib_method="minmax", seed=0, validate=False)


def _row(name: str, path: Path, res: dict, ref: dict, fp32: Path, **extra: Any) -> dict[str, Any]:
    row = {"name": name, "path": str(path), "top1": res["top1"],
           "agree": float(np.mean(res["pred"] == ref["pred"]) * 100), "size_bytes": path.stat().st_size,
           "file_ratio": path.stat().st_size / fp32.stat().st_size, **extra}
    print(f"  {name:24s} top1 {row['top1']:6.2f}  agree {row['agree']:6.2f}  weight ratio "
          f"{row.get('size_ratio', float('nan')):.4f}  file {row['size_bytes'] / 1e6:.2f} MB", flush=True)
    return row


def _plot(rows: list[dict[str, Any]], fp32_top1: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    curve = sorted((r for r in rows if r["kind"] == "milp"), key=lambda r: r["size_ratio"])
    uni = sorted((r for r in rows if r["kind"] == "uniform"), key=lambda r: r["size_ratio"])
    ax.plot([r["size_ratio"] for r in curve], [r["top1"] for r in curve], "o-", label="integer program (8/4/2)")
    ax.plot([r["size_ratio"] for r in uni], [r["top1"] for r in uni], "s--", label="uniform (first/last 8-bit)")
    for r in uni:
        ax.annotate(r["name"].replace("curve_", ""), (r["size_ratio"], r["top1"]), textcoords="offset points",
                    xytext=(4, -12), fontsize=8)
    ax.axhline(fp32_top1, color="gray", lw=0.8, ls=":", label=f"FP32 {fp32_top1:.1f}%")
    ax.set_xlabel("weight size / all-8-bit weight size")
    ax.set_ylabel("top-1 % (750 ImageNet images)")
    ax.set_title("EfficientNet-Lite0, W?A8 round to nearest")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _markdown(meta: dict[str, Any], rows: list[dict[str, Any]], plan_w4: dict[str, Any]) -> str:
    lines = [f"### Mixed precision on EfficientNet-Lite0 ({meta['n_eval']} eval images, {meta['n_calib']} "
             f"calibration images; sensitivity on {meta['holdout']} held-out calibration images)", "",
             "| model | top-1 % | agree w/ FP32 % | weight size ratio | widths 8/4/2 | predicted mse | file MB "
             "| quant s |", "|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        widths = "/".join(str(r.get("widths", {}).get(str(b), 0)) for b in (8, 4, 2)) if "widths" in r else "-"
        pred = f"{r['predicted_mse']:.3f}" if r.get("predicted_mse") is not None else "-"
        ratio = f"{r['size_ratio']:.4f}" if r.get("size_ratio") is not None else "-"
        q = f"{r['quant_s']:.0f}" if r.get("quant_s") is not None else "-"
        lines.append(f"| {r['name']} | {r['top1']:.2f} | {r['agree']:.2f} | {ratio} | {widths} | {pred} "
                     f"| {r['size_bytes'] / 1e6:.2f} | {q} |")
    lines += ["", f"- Sensitivity table: {meta['sensitivity_s']:.0f} s ({meta['evaluations']} one-layer swaps, "
              f"measure `{meta['measure']}`, widths {meta['widths']}); whole run {meta['total_s']:.0f} s.",
              f"- Plan at the uniform-W4A8 size (ratio {plan_w4['predicted']['size_ratio']:.4f}): layers per width "
              f"{plan_w4['predicted']['layers_per_width']}.",
              f"- Machine: {meta['nproc']} CPUs, {meta['cpu']}; load average {meta['load_start'][0]:.1f} at start, "
              f"{meta['load_end'][0]:.1f} at end. Preprocessing {meta['preprocessing']}.",
              f"- Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from onnxq import quantize
    from onnxq.config.legacy import QuantConfig
    from onnxq.core.graph import load_model, save_model
    from onnxq.data.loaders import load_calibration, model_inputs
    from onnxq.errors import UserError
    from onnxq.mixed.plan import Budget, solve, uniform_plan
    from onnxq.mixed.sensitivity import SensitivityTable, measure_sensitivity
    from onnxq.pipeline.calibrated import CalibratedModel
    from onnxq.targets.profiles import resolve_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=Path("/work/scratch/s2/mixed/bench"))
    ap.add_argument("--widths", default="8,4,2")
    ap.add_argument("--measure", default="mse", choices=("mse", "cosine", "fisher"))
    ap.add_argument("--budgets", default="0.5,0.56,w4,0.75,0.88",
                    help="size ratios of the all-8-bit weights; 'w4' = uniform W4A8's size (EfficientNet-Lite0: "
                         "0.639; all at 2 bits: 0.458, as the 8-bit first conv and classifier hold 28%% of the "
                         "weights)")
    ap.add_argument("--table", type=Path, help="reuse a saved sensitivity table (JSON)")
    ap.add_argument("--bc-table", action="store_true",
                    help="also measure a table with bias correction and quantize its own plan (milp_bcplan row)")
    ap.add_argument("--limit", type=int, help="use only the first N evaluation images")
    args = ap.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    t_start, load_start = time.perf_counter(), os.getloadavg()
    out_dir = args.out_dir
    (out_dir / "models").mkdir(parents=True, exist_ok=True)
    opt_dir = out_dir / "ort_optimized"
    opt_dir.mkdir(exist_ok=True)
    widths = tuple(int(w) for w in args.widths.split(","))

    fp32 = export_efficientnet_lite0(REPO_ROOT / "build" / "models" / "efficientnet_lite0.onnx")
    x_eval, y_eval = load_split("eval", args.limit)
    x_cal, _ = load_split("calib")
    calib = [{INPUT: x_cal[i:i + CALIB_BATCH]} for i in range(0, len(x_cal), CALIB_BATCH)]
    print(f"eval {x_eval.shape}, calib {x_cal.shape}", flush=True)
    ref = evaluate(fp32, x_eval, y_eval, opt_dir)
    rows: list[dict[str, Any]] = [_row("fp32", fp32, ref, ref, fp32, kind="fp32")]

    config = QuantConfig(**W8A8)
    if args.table:
        table = SensitivityTable.load(args.table)
    else:
        print("[sensitivity]", flush=True)
        table = measure_sensitivity(fp32, calib, config, widths=widths, fisher=args.measure == "fisher")
        table.save(out_dir / "sensitivity.json")
    print(f"  table: {len(table.layers)} layers, {table.seconds:.0f} s", flush=True)
    w4 = uniform_plan(table, 4, args.measure)
    plan = solve(table, Budget("size", w4.size_ratio), args.measure)
    plan.save(out_dir / "milp_w4size.bitplan.json")

    def run(name: str, cfg: QuantConfig, **extra: Any) -> None:
        print(f"[{name}] quantizing", flush=True)
        t0 = time.perf_counter()
        result = quantize(str(fp32), calib, cfg, validation=calib[:1])  # all 250 calibrate (validate=False)
        path = result.save(out_dir / "models" / f"{name}.onnx")
        seconds = time.perf_counter() - t0
        rows.append(_row(name, path, evaluate(path, x_eval, y_eval, opt_dir), ref, fp32, quant_s=seconds, **extra))

    w4_info = {"size_ratio": w4.size_ratio, "predicted_mse": w4.degradation,
               "widths": w4.to_dict()["predicted"]["layers_per_width"]}
    mp_info = {"size_ratio": plan.size_ratio, "predicted_mse": plan.degradation,
               "widths": plan.to_dict()["predicted"]["layers_per_width"]}
    run("uniform_w4a8", replace(config, weight_bits=4), kind="headline", **w4_info)
    run("uniform_w4a8_bc", replace(config, weight_bits=4, bias_correction="data"), kind="headline", **w4_info)
    run("milp_w4size", replace(config, bit_plan=plan.layers), kind="headline", **mp_info)
    run("milp_w4size_bc", replace(config, bit_plan=plan.layers, bias_correction="data"), kind="headline", **mp_info)
    if args.bc_table:
        print("[sensitivity with bias correction]", flush=True)
        table_bc = measure_sensitivity(fp32, calib, replace(config, bias_correction="data"), widths=widths)
        table_bc.save(out_dir / "sensitivity_bc.json")
        plan_bc = solve(table_bc, Budget("size", w4.size_ratio), args.measure)
        plan_bc.save(out_dir / "milp_bcplan_w4size.bitplan.json")
        run("milp_bcplan_w4size_bc", replace(config, bit_plan=plan_bc.layers, bias_correction="data"),
            kind="headline", size_ratio=plan_bc.size_ratio, predicted_mse=plan_bc.degradation,
            widths=plan_bc.to_dict()["predicted"]["layers_per_width"], table_s=table_bc.seconds)

    print("[curve] calibrating once", flush=True)
    original = load_model(fp32)
    cal_set = load_calibration(calib, model_inputs(original))
    probe = resolve_config(replace(config, bit_plan=tuple((f"#{b}", b) for b in widths)))
    cal = CalibratedModel.build(original, replace(probe, bit_plan=(), opset=probe.output_opset), cal_set)
    curve: list[tuple[str, str, Any]] = [("curve_w8", "uniform", uniform_plan(table, 8, args.measure)),
                                         ("curve_w4", "uniform", w4)]
    if 2 in widths:
        curve.append(("curve_w2", "uniform", uniform_plan(table, 2, args.measure)))
    for b in args.budgets.split(","):
        ratio = w4.size_ratio if b == "w4" else float(b)
        try:
            curve.append((f"curve_milp_{b}", "milp", solve(table, Budget("size", ratio), args.measure)))
        except UserError as exc:
            print(f"  SKIP budget {b}: {exc}")
    check = None
    for name, kind, p in curve:
        print(f"[{name}] quantizing (shared calibration)", flush=True)
        t0 = time.perf_counter()
        model = cal.quantize(p.layers)
        path = save_model(model, out_dir / "models" / f"{name}.onnx")
        seconds = time.perf_counter() - t0
        rows.append(_row(name, path, evaluate(path, x_eval, y_eval, opt_dir), ref, fp32, kind=kind, quant_s=seconds,
                         size_ratio=p.size_ratio, predicted_mse=p.degradation,
                         widths=p.to_dict()["predicted"]["layers_per_width"]))
        if p.layers == plan.layers and check is None:
            check = _same_model(model, out_dir / "models" / "milp_w4size.onnx", x_eval[:8])
    _plot([r for r in rows if r["name"].startswith("curve_")], ref["top1"], out_dir / "size_accuracy.png")

    meta = {**machine_info(), "command": command, "n_eval": int(len(y_eval)), "n_calib": int(len(x_cal)),
            "holdout": table.holdout_samples, "sensitivity_s": table.seconds, "measure": args.measure,
            "widths": list(table.widths), "preprocessing": PREPROC_TAG,
            "evaluations": sum(len(table.choices(i)) - 1 for i in table.layers if i.fixed_bits is None),
            "total_s": time.perf_counter() - t_start, "load_start": load_start, "load_end": os.getloadavg(),
            "shared_calibration_check": check}
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "plan_w4size": plan.to_dict(),
                                                      "results": [{k: v for k, v in r.items()} for r in rows]},
                                                     indent=1, default=str))
    text = _markdown(meta, rows, plan.to_dict())
    (out_dir / "bench_mixed.md").write_text(text)
    print(text)
    print(f"shared-calibration model vs onnxq.quantize model: {check}")


def _same_model(model, path: Path, x: np.ndarray) -> dict[str, Any]:
    """Do the shared-calibration model and ``onnxq.quantize``'s model agree (constants and outputs)?"""
    import onnx
    import onnxruntime as ort

    other = onnx.load(str(path))
    a = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    b = {i.name: onnx.numpy_helper.to_array(i) for i in other.graph.initializer}
    same = sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    outs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {INPUT: x})[0]
            for m in (model, other)]
    return {"same_constants": bool(same), "max_abs_output_diff": float(np.max(np.abs(outs[0] - outs[1])))}


if __name__ == "__main__":
    main()
