"""``<output stem>.report.html``: the run's report as one self-contained page (inline CSS and SVG, no
script, nothing fetched), written beside the JSON report from the same dict.

Sections: the validation verdict and its failures; each output's fidelity (fused kernels and QDQ
simulation); size and a quick latency check; the kernels onnxruntime fused; the error along depth
(:mod:`onnxq.report.layers`, a plot); the calibrated ranges with outlier tensors marked; the accuracy
target's sensitivities and what it kept (:mod:`onnxq.fallback`); the ops left float and why.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from html import escape
from pathlib import Path
from typing import Any

from onnxq.core.files import atomic_write_text
from onnxq.report.layers import OUTLIER_RATIO
from onnxq.report.svg import bar_chart, line_chart

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1000px;color:#1f2328}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #d0d7de;padding:3px 8px;text-align:left;
font-size:13px}th{background:#f6f8fa}td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{background:#dafbe1;border:1px solid #4ac26b;padding:10px;border-radius:6px}
.failed{background:#ffebe9;border:1px solid #ff8182;padding:10px;border-radius:6px}
tr.outlier td{background:#fff1e5}.muted{color:#656d76}code{font-size:12px}
"""


def _table(head: Iterable[str], rows: Iterable[Iterable[Any]], classes: Iterable[str] | None = None) -> str:
    cls = list(classes) if classes is not None else None
    out = ["<table><tr>" + "".join(f"<th>{escape(str(h))}</th>" for h in head) + "</tr>"]
    for i, row in enumerate(rows):
        attr = f' class="{cls[i]}"' if cls and cls[i] else ""
        cells = "".join(f'<td class="n">{_fmt(c)}</td>' if isinstance(c, (int, float)) and not isinstance(c, bool)
                        else f"<td>{escape(_fmt(c))}</td>" for c in row)
        out.append(f"<tr{attr}>{cells}</tr>")
    return "".join(out) + "</table>"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _verdict(val: Mapping[str, Any] | None) -> str:
    if val is None:
        return '<div class="failed"><b>Not validated</b> (validation was off).</div>'
    ok = val.get("ok")
    lines = "".join(f"<li>{escape(f)}</li>" for f in [*val.get("errors", []), *val.get("failures", [])])
    fused = val.get("criteria", {}).get("runtime") == "ort-cpu"
    return (f'<div class="{"ok" if ok else "failed"}"><b>validation: {"OK" if ok else "FAILED"}</b> on '
            f'{val.get("n_samples")} batches of {escape(str(val.get("data", "")))}; CPU {escape(val.get("cpu", ""))}; '
            f'judged on {"the fused kernels" if fused else "the QDQ simulation"}'
            f'{"<ul>" + lines + "</ul>" if lines else ""}</div>')


def _outputs(val: Mapping[str, Any]) -> str:
    sim = {o["name"]: o for o in val.get("simulation", [])}
    gaps = val.get("level_gaps", {})
    rows = [[o["name"], o["sqnr_db"], o["cosine"], o["top1_agreement"], sim.get(o["name"], {}).get("cosine"),
             gaps.get(o["name"])] for o in val.get("outputs", [])]
    return _table(["output", "SQNR dB", "cosine", "top-1 agreement", "simulation cosine", "kernel gap"], rows)


def _size_latency(report: Mapping[str, Any], model_path: Path) -> str:
    rows = []
    source = report.get("source")
    if source and Path(source).is_file():
        rows.append(["float model (file)", round(Path(source).stat().st_size / 1e6, 3)])
    if model_path.is_file():
        rows.append(["quantized model (file)", round(model_path.stat().st_size / 1e6, 3)])
    out = _table(["file", "MB"], rows) if rows else ""
    lat = report.get("latency")
    if lat:
        out += _table(["batch", "runs", "float ms", "quantized ms", "quantized / float"],
                      [[lat["batch"], lat["runs"], lat["float_ms"], lat["quantized_ms"], lat["ratio"]]])
        out += ('<p class="muted">Median of interleaved runs at ORT_ENABLE_ALL on this machine, a quick check; '
                "the benchmarks in scripts/ measure latency properly.</p>")
    return out


def _kernels(val: Mapping[str, Any]) -> str:
    def counts(d: Mapping[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"
    return _table(["what onnxruntime runs (ORT_ENABLE_ALL)", "ops"],
                  [["integer kernels", counts(val.get("integer_kernels", {}))],
                   ["float compute left", counts(val.get("float_compute_ops", {}))],
                   ["Q/DQ left", counts(val.get("qdq_left", {}))]])


def _layers(layers: list[Mapping[str, Any]]) -> str:
    if not layers:
        return "<p>No quantized activation tensor to compare.</p>"
    chart = line_chart([r["sqnr_db"] for r in layers], [r["tensor"] for r in layers],
                       "SQNR of the quantized model vs float, dB (red: outlier tensors)",
                       [r["outlier"] for r in layers])
    return chart + ('<p class="muted">Each point: one quantized activation tensor, the error the quantized model '
                    "(QDQ simulation) has accumulated there against the float model, on the first validation "
                    "samples.</p>")


def _ranges(layers: list[Mapping[str, Any]]) -> str:
    rows = [[r["tensor"], f"[{r['range'][0]:.4g}, {r['range'][1]:.4g}]",
             f"[{r['observed'][0]:.4g}, {r['observed'][1]:.4g}]" if r.get("observed") else None,
             None if r.get("clipped") is None else round(100 * r["clipped"], 4), r.get("outlier_ratio"),
             "outlier" if r["outlier"] else ""] for r in layers]
    flagged = sum(1 for r in layers if r["outlier"])
    return (f"<p>{flagged} of {len(layers)} tensors have a channel over {OUTLIER_RATIO:g}x the median channel's "
            "magnitude (marked): one scale per tensor spends its codes on those channels.</p>"
            + _table(["tensor", "calibrated range", "observed (validation)", "clipped %", "max / median channel",
                      ""], rows, ["outlier" if r["outlier"] else "" for r in layers]))


def _target(t: Mapping[str, Any]) -> str:
    drop = t.get("drop", {})
    out = (f"<p>Target: drop at most <b>{t['max_drop']}</b> ({escape(str(t['metric']))}); everything quantized: "
           f"{_fmt(drop.get('quantized'))}; with the plan: {_fmt(drop.get('planned'))} on the {t['search_samples']} "
           f"search samples, {_fmt(drop.get('validation'))} on the validation samples.</p>")
    kept = t.get("kept_float", [])
    out += _table(["kept float", "op", "drop before", "drop after"],
                  [[k["node"], k["op"], k["bought"]["before"], k["bought"]["after"]] for k in kept]) if kept else \
        "<p>Nothing kept float: the quantized model meets the target.</p>"
    kept_names = {k["node"] for k in kept}
    for r in t.get("rounds", []):
        ranked = r.get("most_sensitive", [])
        out += (f"<p>Round {r['round']}: the {len(ranked)} most sensitive of {r['candidates']} ops (darker: "
                "kept)</p>")
        out += bar_chart([max(x["gain"], 0.0) + 0.0 for x in ranked], [x["node"] for x in ranked],
                         "error removed by keeping the op float (relative squared error)",
                         [x["node"] in kept_names for x in ranked])
    lat = t.get("latency")
    if lat:
        out += (f"<p>Speed of the plan: {lat['planned_ms']} ms against {lat['everything_quantized_ms']} ms with "
                f"everything quantized ({lat['ratio']}x, one search batch, {lat['runs']} interleaved runs).</p>")
    if t.get("note"):
        out += f"<p>{escape(t['note'])}</p>"
    return out


def render_page(report: Mapping[str, Any], model_path: Path) -> str:
    """The page's HTML for ``report`` (a run's JSON report) of the model written at ``model_path``."""
    val = report.get("validation")
    cfg = report.get("config", {})
    w, a = cfg.get("weights", {}), cfg.get("activations", {})
    method = (cfg.get("rounding") or {}).get("method")
    title = f"onnxq report: {model_path.name}"
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{escape(title)}</h1>",
             f'<p class="muted">from {escape(str(report.get("source") or "a ModelProto"))}; target '
             f'{escape(str(cfg.get("target")))}, weights {w.get("bits")}-bit, activations '
             f'{escape(str(a.get("dtype")))} {a.get("bits")}-bit, rounding {escape(str(method))}, opset '
             f'{report.get("opset")}; onnxq {escape(str(report.get("onnxq_version")))}, '
             f'{report.get("quantize_seconds")} s</p>',
             "<h2>Verdict</h2>", _verdict(val)]
    if val:
        parts += ["<h2>Outputs</h2>", _outputs(val)]
    parts += ["<h2>Size and latency</h2>", _size_latency(report, model_path)]
    if val:
        parts += ["<h2>Kernels</h2>", _kernels(val)]
    layers = report.get("layers")
    if layers is not None:
        parts += ["<h2>Error along depth</h2>", _layers(layers), "<h2>Calibrated ranges</h2>", _ranges(layers)]
    if report.get("accuracy_target"):
        parts += ["<h2>Accuracy target</h2>", _target(report["accuracy_target"])]
    float_ops = report.get("float_ops", {})
    parts += [f"<h2>Ops left float ({len(float_ops)})</h2>",
              _table(["op", "why"], sorted(float_ops.items())) if float_ops else "<p>None.</p>",
              "</body></html>"]
    return "".join(parts)


def write_page(report: Mapping[str, Any], path: str | Path, model_path: Path) -> Path:
    atomic_write_text(path, render_page(report, model_path))
    return Path(path)
