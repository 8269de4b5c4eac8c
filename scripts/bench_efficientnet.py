"""EfficientNet-Lite0 benchmark: onnxq against onnxruntime's own static quantizer.

Per model (FP32 and each quantized one): top-1 and top-1 agreement with FP32 on the ImageNet
validation sample (325 images, the headline) and on the 750-image training evaluation split (a
second opinion: the FP32 model memorised those images), each at ORT_ENABLE_ALL (onnxruntime's fused
integer kernels) and ORT_DISABLE_ALL (the QDQ graph as written), file size (ratio to FP32),
quantization wall time, ORT CPU latency at batch 1 and 32 (ORT_ENABLE_ALL, CPUExecutionProvider,
default threads, median after warmup, models interleaved), and the kernels ORT runs after
optimization (were Q/DQ fused into integer ops?).
ORT side: ``quant_pre_process`` then ``quantize_static`` (QDQ, per-channel, QUInt8 activations,
QInt8 weights; MinMax/Entropy/Percentile on the 250 calibration images). ORT W4A8 (QInt4) is
converted to opset 21 first (native INT4 Q/DQ); left at opset 13, ORT writes ``com.microsoft``
Q/DQ instead (``ort_w4a8_minmax_contrib``). onnxq side: ``onnxq.quantize`` with the named
entries of ``ONNXQ_CONFIGS``: a preset (``preset_<name>``, exactly ``onnxq quantize --preset <name>``)
or the keyword arguments of the deprecated flat ``QuantConfig``.

    python scripts/bench_efficientnet.py [--out-dir build/bench] [--only NAME[,NAME]]
        [--latency-runs N] [--latency-runs-b32 N] [--limit N] [--json results.json] [--markdown [PATH]]
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_efficientnet import export_efficientnet_lite0  # noqa: E402
from imagenet_sample import PREPROC_TAG, load_split  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
INPUT = "input"
EVAL_BATCH = 32
CALIB_BATCH = 25
# The AdaQuant-priced sensitivity table: half the fast schedule's 200 iterations a layer, so the two
# parallel passes (4 and 2 bits) fit next to the final reconstruction on the 2-core box.
MP_TABLE_ADAQUANT_ITERS = 100
CALIB_STRIDE_IMAGES = 50


@dataclass(frozen=True)
class OrtEntry:
    """One ``onnxruntime.quantization.quantize_static`` configuration (``dynamic``: ``quantize_dynamic``,
    per-channel weights, activations quantized at run time; ``method`` is unused then)."""

    name: str
    method: str  # "MinMax" | "Entropy" | "Percentile"
    dynamic: bool = False
    weight_type: str = "QInt8"  # QuantType member name
    opset21: bool = False  # convert to opset 21 before quantizing (native INT4 Q/DQ)
    extra_options: dict[str, Any] = field(default_factory=dict)
    default: bool = True  # part of the default run (else only with --only)


@dataclass(frozen=True)
class OnnxqEntry:
    """One onnxq configuration: a preset's name, or keyword arguments of ``onnxq.QuantConfig``."""

    name: str
    params: dict[str, Any]
    default: bool = True
    preset: str | None = None
    # Entries naming the same checkpoint share one reconstruction (kept under OUT_DIR/checkpoints/):
    # the first one run reconstructs, the others only add what comes after it (tuning).
    checkpoint: str | None = None
    # Mixed precision: measure the per-layer sensitivity table (8/4/2 bits, output MSE), solve the
    # integer program at the weight size of uniform W4A8 and quantize with that plan (and ``params``).
    mixed_w4size: bool = False
    # The table's weights: "rtn", or "adaquant" (CalibTIP: parallel AdaQuant per width below 8, at
    # MP_TABLE_ADAQUANT_ITERS iterations a layer).
    mp_table: str = "rtn"


ORT_CONFIGS: list[OrtEntry] = [
    OrtEntry("ort_w8a8_minmax", "MinMax"),
    OrtEntry("ort_w8a8_entropy", "Entropy"),
    OrtEntry("ort_w8a8_percentile", "Percentile"),  # ORT default: 99.999th pct, symmetric range
    OrtEntry("ort_w4a8_minmax", "MinMax", weight_type="QInt4", opset21=True),
    OrtEntry("ort_w8a8_percentile_asym", "Percentile",
             extra_options={"CalibTensorRangeSymmetric": False}, default=False),
    OrtEntry("ort_w4a8_minmax_contrib", "MinMax", weight_type="QInt4", default=False),
]

_W8A8 = dict(target="ort-cpu", weight_bits=8, per_channel=True, activation_dtype="uint8",
             scale_kind="float", seed=0)
_W4A4 = {**_W8A8, "weight_bits": 4, "activation_bits": 4, "calib_method": "mse"}
_W2A4 = {**_W8A8, "weight_bits": 2, "activation_bits": 4, "calib_method": "mse", "ternary_method": "twn"}
# BRECQ/QDrop's reference weight quantizer: per-channel asymmetric, MSE-searched ranges (ort-cpu only).
_W4A8A = {**_W8A8, "weight_bits": 4, "weight_symmetric": False, "weight_method": "mse"}
_W4A4A = {**_W4A4, "weight_symmetric": False, "weight_method": "mse"}
# The papers' W2: the 4-level INT2 grid [-2, 1], per-channel asymmetric, MSE-searched ranges.
_W2A4U = {**_W8A8, "weight_bits": 2, "activation_bits": 4, "calib_method": "mse", "int2_grid": "uniform",
          "weight_symmetric": False, "weight_method": "mse"}
PRESETS = ("w8a8", "w8a8-tensorrt", "npu-pow2", "w4a8-fast", "w4a8", "w4a4", "w2a4")
ONNXQ_CONFIGS: list[OnnxqEntry] = [
    # The presets, as `onnxq quantize --preset NAME` runs them (the learned ones keep a checkpoint).
    *(OnnxqEntry(f"preset_{p.replace('-', '_')}", {}, default=p in ("w8a8", "npu-pow2"), preset=p,
                 checkpoint=f"preset_{p}" if p.startswith(("w4", "w2")) else None) for p in PRESETS),
    OnnxqEntry("onnxq_w8a8_minmax", {**_W8A8, "calib_method": "minmax"}),
    OnnxqEntry("onnxq_w8a8_percentile", {**_W8A8, "calib_method": "percentile"}),
    OnnxqEntry("onnxq_w8a8_mse", {**_W8A8, "calib_method": "mse"}),
    OnnxqEntry("onnxq_w8a8_entropy", {**_W8A8, "calib_method": "entropy"}),
    OnnxqEntry("onnxq_w8a8_mse_wmse", {**_W8A8, "calib_method": "mse", "weight_method": "mse"}),
    OnnxqEntry("onnxq_w8a8_pow2", {**_W8A8, "scale_kind": "pow2", "calib_method": "mse", "weight_method": "mse"}),
    OnnxqEntry("onnxq_w8a8_pow2_minmax", {**_W8A8, "scale_kind": "pow2", "calib_method": "minmax"}),
    OnnxqEntry("onnxq_w8a8_minmax_bc", {**_W8A8, "calib_method": "minmax", "bias_correction": "data"}),
    OnnxqEntry("onnxq_w8a8_percentile_bc", {**_W8A8, "calib_method": "percentile", "bias_correction": "data"}),
    OnnxqEntry("onnxq_w8a8_pow2_bc", {**_W8A8, "scale_kind": "pow2", "calib_method": "mse", "weight_method": "mse",
                                      "bias_correction": "data"}),
    OnnxqEntry("onnxq_w4a8_rtn", {**_W8A8, "weight_bits": 4, "calib_method": "minmax"}),
    OnnxqEntry("onnxq_w4a8_rtn_bc", {**_W8A8, "weight_bits": 4, "calib_method": "minmax",
                                     "bias_correction": "data"}),
    OnnxqEntry("onnxq_w4a8_rtn_wmse", {**_W8A8, "weight_bits": 4, "calib_method": "minmax", "weight_method": "mse"}),
    OnnxqEntry("onnxq_w4a8_rtn_wmse_bc", {**_W8A8, "weight_bits": 4, "calib_method": "minmax", "weight_method": "mse",
                                          "bias_correction": "data"}),
    # Asymmetric per-channel weights (zero-points; BRECQ/QDrop's reference quantizers), ort-cpu only.
    OnnxqEntry("onnxq_w4a8_rtn_asym", {**_W8A8, "weight_bits": 4, "calib_method": "minmax",
                                       "weight_symmetric": False}, default=False),
    OnnxqEntry("onnxq_w4a8_rtn_asym_mse", {**_W8A8, "weight_bits": 4, "calib_method": "minmax",
                                           "weight_symmetric": False, "weight_method": "mse"}, default=False),
    OnnxqEntry("onnxq_w4a8_rtn_asym_mse_bc", {**_W8A8, "weight_bits": 4, "calib_method": "minmax",
                                              "weight_symmetric": False, "weight_method": "mse",
                                              "bias_correction": "data"}, default=False),
    OnnxqEntry("onnxq_w4a8_brecq_asym", {**_W8A8, "weight_bits": 4, "method": "brecq", "weight_symmetric": False,
                                         "weight_method": "mse"}, default=False, checkpoint="w4a8_brecq_asym"),
    # The long schedule, 1000 iterations a block on 1,000 samples (each image, a flip, two crops): the
    # setting that meets issue 3's W4A8 bar (85.20 / 84.80 over seeds 0 / 1; 10.2 GB, 25 min on 2 threads;
    # benchmarks.md s10, measured as recon_iters=1000, recon_augment=3 before the schedule had a name).
    OnnxqEntry("onnxq_w4a8_brecq_asym_views", {**_W8A8, "weight_bits": 4, "method": "brecq",
                                               "weight_symmetric": False, "weight_method": "mse",
                                               "schedule": "long"}, default=False,
               checkpoint="w4a8_brecq_asym_long"),
    OnnxqEntry("onnxq_w4a8_brecq_asym_st", {**_W8A8, "weight_bits": 4, "method": "brecq", "weight_symmetric": False,
                                            "weight_method": "mse", "stats_tuning": True},
               default=False, checkpoint="w4a8_brecq_asym"),
    OnnxqEntry("onnxq_w4a8_adaround_asym", {**_W8A8, "weight_bits": 4, "method": "adaround",
                                            "weight_symmetric": False, "weight_method": "mse"}, default=False),
    OnnxqEntry("onnxq_mp_w4size_adaround_asym", {**_W8A8, "weight_bits": 4, "method": "adaround",
                                                 "weight_symmetric": False, "weight_method": "mse"},
               default=False, mixed_w4size=True),
    OnnxqEntry("onnxq_mp_w4size_brecq_asym", {**_W8A8, "weight_bits": 4, "method": "brecq",
                                              "weight_symmetric": False, "weight_method": "mse"},
               default=False, mixed_w4size=True),
    OnnxqEntry("onnxq_mp_w4size_adaround_asym_aqtable", {**_W8A8, "weight_bits": 4, "method": "adaround",
                                                         "weight_symmetric": False, "weight_method": "mse"},
               default=False, mixed_w4size=True, mp_table="adaquant"),
    # Reconstruction (fast CPU schedule): W4A8 and W4A4, first/last layers 8-bit.
    OnnxqEntry("onnxq_w4a8_adaround", {**_W8A8, "weight_bits": 4, "method": "adaround"}),
    OnnxqEntry("onnxq_w4a8_brecq", {**_W8A8, "weight_bits": 4, "method": "brecq"}, checkpoint="w4a8_brecq"),
    OnnxqEntry("onnxq_w4a8_brecq_st", {**_W8A8, "weight_bits": 4, "method": "brecq", "stats_tuning": True},
               default=False, checkpoint="w4a8_brecq"),
    OnnxqEntry("onnxq_w4a8_brecq_bt", {**_W8A8, "weight_bits": 4, "method": "brecq", "bias_tuning": True},
               default=False, checkpoint="w4a8_brecq"),
    # BRECQ in its reference's two-pass order (all weights, then all activation steps).
    OnnxqEntry("onnxq_w4a8_brecq_2p", {**_W8A8, "weight_bits": 4, "method": "brecq", "recon_order": "two_pass"},
               default=False, checkpoint="w4a8_brecq_2p"),
    OnnxqEntry("onnxq_w4a8_brecq_2p_st", {**_W8A8, "weight_bits": 4, "method": "brecq", "recon_order": "two_pass",
                                          "stats_tuning": True}, default=False, checkpoint="w4a8_brecq_2p"),
    OnnxqEntry("onnxq_w4a4_brecq_2p", {**_W4A4, "method": "brecq", "recon_order": "two_pass"}, default=False),
    OnnxqEntry("onnxq_w2a4u_brecq_2p", {**_W2A4U, "method": "brecq", "recon_order": "two_pass"}, default=False),
    OnnxqEntry("onnxq_w4a8_brecq_wmse", {**_W8A8, "weight_bits": 4, "method": "brecq", "weight_method": "mse"}),
    OnnxqEntry("onnxq_w4a8_qdrop", {**_W8A8, "weight_bits": 4, "method": "qdrop"}),
    OnnxqEntry("onnxq_w4a4_rtn", {**_W8A8, "weight_bits": 4, "activation_bits": 4, "calib_method": "mse"}),
    OnnxqEntry("onnxq_w4a4_adaround", {**_W8A8, "weight_bits": 4, "activation_bits": 4, "calib_method": "mse",
                                       "method": "adaround"}),
    OnnxqEntry("onnxq_w4a4_brecq", {**_W8A8, "weight_bits": 4, "activation_bits": 4, "calib_method": "mse",
                                    "method": "brecq"}),
    OnnxqEntry("onnxq_w4a4_qdrop_wmse", {**_W8A8, "weight_bits": 4, "activation_bits": 4, "calib_method": "mse",
                                        "weight_method": "mse", "method": "qdrop"}),
    OnnxqEntry("onnxq_w4a4_brecq_wmse", {**_W8A8, "weight_bits": 4, "activation_bits": 4, "calib_method": "mse",
                                        "weight_method": "mse", "method": "brecq"}),
    OnnxqEntry("onnxq_w4a4_rtn_wmse", {**_W8A8, "weight_bits": 4, "activation_bits": 4, "calib_method": "mse",
                                      "weight_method": "mse"}),
    OnnxqEntry("onnxq_w2a4_rtn", {**_W8A8, "weight_bits": 2, "activation_bits": 4, "calib_method": "mse"}),
    OnnxqEntry("onnxq_w2a4_qdrop", {**_W8A8, "weight_bits": 2, "activation_bits": 4, "calib_method": "mse",
                                    "ternary_method": "twn", "method": "qdrop"}),
    OnnxqEntry("onnxq_w4a4_qdrop", {**_W8A8, "weight_bits": 4, "activation_bits": 4, "calib_method": "mse",
                                    "method": "qdrop"}),
    # AdaQuant (layer-wise weights, bias and ranges; fast schedule) and MRECG (merged neighbour blocks on
    # BRECQ/QDrop, k=4, data capacity from a first pass at 1/3 of the iterations). Off by default (long).
    OnnxqEntry("onnxq_w4a8_adaquant_par", {**_W8A8, "weight_bits": 4, "method": "adaquant",
                                           "adaquant_mode": "parallel"}, default=False),
    OnnxqEntry("onnxq_w4a8_adaquant_seq", {**_W8A8, "weight_bits": 4, "method": "adaquant",
                                           "adaquant_mode": "sequential"}, default=False,
               checkpoint="w4a8_adaquant_seq"),
    OnnxqEntry("onnxq_w4a8_adaquant_seq_st", {**_W8A8, "weight_bits": 4, "method": "adaquant", "stats_tuning": True,
                                              "adaquant_mode": "sequential"}, default=False,
               checkpoint="w4a8_adaquant_seq"),
    OnnxqEntry("onnxq_w4a8_adaquant_seq_bt", {**_W8A8, "weight_bits": 4, "method": "adaquant", "bias_tuning": True,
                                              "adaquant_mode": "sequential"}, default=False,
               checkpoint="w4a8_adaquant_seq"),
    # QDrop's reference quantizers: per-channel asymmetric weights with MSE-searched ranges (ort-cpu).
    OnnxqEntry("onnxq_w4a4_qdrop_asym", {**_W4A4, "method": "qdrop", "weight_symmetric": False,
                                         "weight_method": "mse"}, default=False),
    OnnxqEntry("onnxq_w4a4_qdrop_asym_long", {**_W4A4A, "method": "qdrop", "schedule": "long"},
               default=False, checkpoint="w4a4_qdrop_asym_long"),
    # The reference quantizers at every W4 setting (session 5 table): asymmetric MSE weight grid.
    OnnxqEntry("onnxq_w4a8_qdrop_asym", {**_W4A8A, "method": "qdrop"}, default=False),
    OnnxqEntry("onnxq_w4a8_mrecg_brecq_asym", {**_W4A8A, "method": "mrecg", "mrecg_base": "brecq"}, default=False),
    OnnxqEntry("onnxq_w4a4_rtn_asym", _W4A4A, default=False),
    OnnxqEntry("onnxq_w4a4_adaround_asym", {**_W4A4A, "method": "adaround"}, default=False),
    OnnxqEntry("onnxq_w4a4_brecq_asym", {**_W4A4A, "method": "brecq"}, default=False),
    OnnxqEntry("onnxq_w4a4_mrecg_brecq_asym", {**_W4A4A, "method": "mrecg", "mrecg_base": "brecq"}, default=False),
    OnnxqEntry("onnxq_w4a4_mrecg_qdrop_asym", {**_W4A4A, "method": "mrecg", "mrecg_base": "qdrop"}, default=False),
    OnnxqEntry("onnxq_w4a4_adaquant_seq_asym", {**_W4A4A, "method": "adaquant", "adaquant_mode": "sequential"},
               default=False),
    OnnxqEntry("onnxq_w4a4_adaquant_par_asym", {**_W4A4A, "method": "adaquant", "adaquant_mode": "parallel"},
               default=False),
    OnnxqEntry("onnxq_w4a4_adaquant_par", {**_W4A4, "method": "adaquant", "adaquant_mode": "parallel"},
               default=False),
    OnnxqEntry("onnxq_w4a4_adaquant_seq", {**_W4A4, "method": "adaquant", "adaquant_mode": "sequential"},
               default=False),
    OnnxqEntry("onnxq_w4a4_mrecg_brecq", {**_W4A4, "method": "mrecg", "mrecg_base": "brecq"}, default=False),
    OnnxqEntry("onnxq_w4a4_mrecg_qdrop", {**_W4A4, "method": "mrecg", "mrecg_base": "qdrop"}, default=False),
    OnnxqEntry("onnxq_w4a4_mrecg_brecq_proxy", {**_W4A4, "method": "mrecg", "mrecg_base": "brecq",
                                                "mrecg_capacity": "proxy"}, default=False),
    # W2 = ternary weights (TWN operator, as onnxq_w2a4_qdrop), not the papers' 4-level 2-bit grid.
    OnnxqEntry("onnxq_w2a4_brecq", {**_W2A4, "method": "brecq"}, default=False),
    OnnxqEntry("onnxq_w2a4_mrecg_brecq", {**_W2A4, "method": "mrecg", "mrecg_base": "brecq"}, default=False),
    OnnxqEntry("onnxq_w2a4_mrecg_qdrop", {**_W2A4, "method": "mrecg", "mrecg_base": "qdrop"}, default=False),
    # W2A4 on the papers' 4-level INT2 grid (like for like with BRECQ/QDrop/MRECG's W2A4 rows).
    OnnxqEntry("onnxq_w2a4u_rtn", _W2A4U, default=False),
    OnnxqEntry("onnxq_w2a4u_rtn_bc", {**_W2A4U, "bias_correction": "data"}, default=False),
    OnnxqEntry("onnxq_w2a4u_adaround", {**_W2A4U, "method": "adaround"}, default=False),
    OnnxqEntry("onnxq_w2a4u_adaround_long", {**_W2A4U, "method": "adaround", "schedule": "long"},
               default=False, checkpoint="w2a4u_adaround_long"),
    OnnxqEntry("onnxq_w2a4u_brecq", {**_W2A4U, "method": "brecq"}, default=False),
    OnnxqEntry("onnxq_w2a4u_brecq_long", {**_W2A4U, "method": "brecq", "schedule": "long"}, default=False,
               checkpoint="w2a4u_brecq_long"),
    OnnxqEntry("onnxq_w2a4u_qdrop", {**_W2A4U, "method": "qdrop"}, default=False),
    OnnxqEntry("onnxq_w2a4u_mrecg_brecq", {**_W2A4U, "method": "mrecg", "mrecg_base": "brecq"}, default=False),
    OnnxqEntry("onnxq_w2a4u_mrecg_qdrop", {**_W2A4U, "method": "mrecg", "mrecg_base": "qdrop"}, default=False),
]


def machine_info() -> dict[str, Any]:
    """nproc, CPU model and int8-relevant flags, date and library versions."""
    import datetime
    import os
    import platform

    import onnx
    import onnxruntime
    import torch

    cpu, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not cpu:
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    cpu = cpu or platform.processor() or "unknown"
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return {"nproc": os.cpu_count(), "cpu": cpu, "cpu_flags": isa,
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "onnx": onnx.__version__, "torch": torch.__version__, "numpy": np.__version__}


_KERNELS = ("QLinearConv", "QGemm", "QLinearAdd", "QLinearGlobalAveragePool", "ConvInteger",
            "MatMulInteger", "QuantizeLinear", "DequantizeLinear", "FusedConv", "Conv", "NchwcConv",
            "FusedGemm", "Gemm")


def markdown_report(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Markdown section (results table, kernels table, setup) for docs/benchmarks.md."""
    lines = [
        f"### EfficientNet-Lite0: {meta['n_val']} validation images, {meta['n_eval']} training evaluation "
        f"images, {meta['n_calib']} calibration images", "",
        "Top-1 and agreement with FP32 at `ORT_ENABLE_ALL` / `ORT_DISABLE_ALL`.", "",
        "| model | tool | val top-1 % | val agree % | train-eval top-1 % | train-eval agree % "
        "| agree, calib images % | size ratio | quant s | b1 ratio | b32 ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['tool']} | failed: {r['error'][:80]} |" + " |" * 8)
            continue
        q = "-" if r["quant_s"] is None else f"{r['quant_s']:.0f}"
        pair = lambda key: f"{r[key + '_all']:.2f} / {r[key + '_disable']:.2f}"  # noqa: E731
        lines.append(
            f"| {r['name']} | {r['tool']} | {pair('top1_val')} | {pair('agree_val')} | {pair('top1_eval')} "
            f"| {pair('agree_eval')} | {r['agree_calib']:.2f} | {r['size_ratio']:.3f} | {q} "
            f"| {r['lat_b1_ratio']:.2f} | {r['lat_b32_ratio']:.2f} |")
    lines += ["", "Kernels ORT runs after `ORT_ENABLE_ALL` (op counts of the optimized graph):", "",
              "| model | kernels | notes |", "|---|---|---|"]
    for r in rows:
        if "error" in r:
            continue
        ops = r.get("ort_opt_ops", {})
        shown = [f"{k} {ops[k]}" for k in _KERNELS if ops.get(k)]
        rest = sum(v for k, v in ops.items() if k not in _KERNELS)
        lines.append(f"| {r['name']} | {', '.join(shown)}{f', other {rest}' if rest else ''} "
                     f"| {'; '.join(r.get('notes', []))} |")
    lines += [
        "", f"- Machine: {meta['nproc']} CPUs, {meta['cpu']} (flags: {', '.join(meta['cpu_flags'])}); "
        f"{meta['date']}.",
        f"- Versions: Python {meta['python']}, onnxruntime {meta['onnxruntime']}, onnx {meta['onnx']}, "
        f"torch {meta['torch']}, numpy {meta['numpy']}.",
        f"- Latency: CPUExecutionProvider, ORT_ENABLE_ALL, default threads; median of "
        f"{meta['latency_runs']} (batch 1) / {meta['latency_runs_b32']} (batch 32) runs after "
        f"warmup, the models interleaved run by run; ratios are to FP32. Load average "
        f"(1 min) {meta['loadavg_start'][0]:.1f} at start, {meta['loadavg_end'][0]:.1f} at end.",
        "- Accuracy: top-1 with batch-32 sessions; agreement = same top-1 class as FP32 (at "
        "ORT_ENABLE_ALL); \"calib images\": the agreement on the calibration images the quantizer saw "
        "(far above the evaluation agreement: the quantizer fitted those images, not the task).",
        f"- Preprocessing: {meta['preprocessing']} (center crop 0.875, bicubic 224, (x-127)/128).",
        f"- Whole run: {meta['total_s']:.0f} s. Command: `{meta['command']}`", ""]
    return "\n".join(lines)


LEVELS = ("all", "disable")


def _session(path: Path, optimized_out: Path | None = None, level: str = "all"):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                     "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    if optimized_out is not None:
        opts.optimized_model_filepath = str(optimized_out)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _predict(sess, x: np.ndarray) -> np.ndarray:
    out = [sess.run(None, {INPUT: x[i:i + EVAL_BATCH]})[0] for i in range(0, len(x), EVAL_BATCH)]
    return np.concatenate(out).argmax(axis=1)


def _timed_runs(sess, feed: dict[str, np.ndarray], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure_latency(paths: dict[str, Path], x: np.ndarray, batch: int, runs: int) -> dict[str, float]:
    """Median latency (ms) per model at ``batch`` images (:func:`interleaved_latency`)."""
    return interleaved_latency(paths, {INPUT: np.ascontiguousarray(x[:batch])}, runs)


def interleaved_latency(paths: dict[str, Path], feed: dict[str, np.ndarray], runs: int) -> dict[str, float]:
    """Median latency (ms) per model on ``feed``, the models' runs fully interleaved (onnxruntime CPU,
    ORT_ENABLE_ALL, default threads).

    After two warmup runs each (arena allocation, kernel selection), every one of ``runs`` rounds times
    one run of every model in turn, so that drifts in machine load hit all models alike. At batch 1 a
    run takes milliseconds and single runs spread by half their time on a shared 2-core machine: take
    a hundred or more (the scripts' default) for ratios stable to about 0.02.
    """
    sessions = {name: _session(p) for name, p in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for sess in sessions.values():
        _timed_runs(sess, feed, 2)
    for _ in range(max(1, runs)):
        for name, sess in sessions.items():
            times[name] += _timed_runs(sess, feed, 1)
    return {name: float(np.median(t)) for name, t in times.items()}


def _op_counts(path: Path) -> dict[str, int]:
    from collections import Counter

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(Counter(n.op_type for n in model.graph.node).most_common())


def evaluate(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], opt_dir: Path,
             x_cal: np.ndarray | None = None) -> dict[str, Any]:
    """Top-1 predictions and accuracy (batch 32) on every split at both optimisation levels
    (``pred_<split>_<level>``, ``top1_<split>_<level>``) and the op counts of the ORT-optimized graph;
    with ``x_cal``, also the predictions on the calibration images (``pred_calib``, ORT_ENABLE_ALL): a
    quantizer that fits those images more than the task agrees with FP32 far more often there."""
    opt_path = opt_dir / f"{path.stem}.ort_opt.onnx"
    out: dict[str, Any] = {"model_ops": _op_counts(path)}
    t0 = time.perf_counter()
    for level in LEVELS:
        sess = _session(path, optimized_out=opt_path if level == "all" else None, level=level)
        for split, (x, y) in splits.items():
            pred = _predict(sess, x)
            out[f"pred_{split}_{level}"] = pred
            out[f"top1_{split}_{level}"] = float(np.mean(pred == y) * 100)
        if level == "all" and x_cal is not None:
            out["pred_calib"] = _predict(sess, x_cal)
    out["eval_s"] = time.perf_counter() - t0
    out["ort_opt_ops"] = _op_counts(opt_path) if opt_path.is_file() else {}
    out["top1"] = out[f"top1_{next(iter(splits))}_all"]  # the headline: the first split at ORT_ENABLE_ALL
    return out


class _Reader:
    """``CalibrationDataReader`` over fixed batches of the calibration split (with set_range)."""

    def __init__(self, x: np.ndarray) -> None:
        self.batches = [x[i:i + CALIB_BATCH] for i in range(0, len(x), CALIB_BATCH)]
        self.start, self.end, self.i = 0, len(self.batches), 0

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end, self.i = start_index, min(end_index, len(self.batches)), start_index

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= self.end:
            return None
        self.i += 1
        return {INPUT: self.batches[self.i - 1]}


def quantize_ort(entry: OrtEntry, fp32: Path, calib_x: np.ndarray, out: Path) -> dict[str, Any]:
    """Run ORT's recommended flow for one entry; return timing and notes."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader_cls = type("Reader", (_Reader, CalibrationDataReader), {})
    reader = reader_cls(calib_x)
    # ORT's calibrators keep every calibrated tensor of every batch in memory until the end
    # (~52 MB per image here, 13 GB for 250 images); CalibStridedMinMax makes ORT calibrate
    # in chunks of `stride` batches and merge (exact for MinMax, histogram merge otherwise).
    stride = max(1, min(len(reader), CALIB_STRIDE_IMAGES // CALIB_BATCH))
    while len(reader) % stride:
        stride -= 1
    extra = {"CalibStridedMinMax": stride, **entry.extra_options}
    notes = ["quant_pre_process", f"calib stride {stride * CALIB_BATCH} images"]
    t0 = time.perf_counter()
    pre = out.with_name(out.stem + ".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    src = pre
    if entry.opset21:
        model = onnx.version_converter.convert_version(onnx.load(str(pre)), 21)
        src = out.with_name(out.stem + ".pre21.onnx")
        onnx.save(model, str(src))
        notes.append("opset 13->21 (onnx.version_converter)")
    if entry.dynamic:
        quantize_dynamic(str(src), str(out), per_channel=True, weight_type=QuantType[entry.weight_type])
        notes = ["quant_pre_process", "quantize_dynamic (no calibration)"]
    else:
        quantize_static(
            str(src), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType[entry.weight_type],
            calibrate_method=CalibrationMethod[entry.method], extra_options=extra)
    seconds = time.perf_counter() - t0
    for tmp in {pre, src}:
        tmp.unlink(missing_ok=True)
    model = onnx.load(str(out), load_external_data=False)
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import
              if o.domain in ("", "ai.onnx", "com.microsoft")}
    qdq_domains = sorted({n.domain or "ai.onnx" for n in model.graph.node
                          if n.op_type in ("QuantizeLinear", "DequantizeLinear")})
    notes.append(f"Q/DQ domain {','.join(qdq_domains)}; opsets {opsets}")
    if entry.extra_options:
        notes.append(f"extra_options {entry.extra_options}")
    return {"quant_s": seconds, "notes": notes}


def quantize_onnxq(entry: OnnxqEntry, fp32: Path, calib_x: np.ndarray,
                   out: Path, holdout_x: np.ndarray) -> dict[str, Any] | None:
    """Run ``onnxq.quantize``; return None (with a printed note) when not available."""
    try:
        import onnxq
        quantize, config_cls = onnxq.quantize, onnxq.QuantConfig
    except (ImportError, AttributeError) as exc:
        print(f"  SKIP {entry.name}: onnxq.quantize / QuantConfig not available yet ({exc})")
        return None
    params = dict(entry.params)
    checkpoint = str(out.parent / "checkpoints" / entry.checkpoint) if entry.checkpoint else None
    if entry.preset:
        cfg = _preset_with_overrides(entry.preset, params)
        if checkpoint:
            cfg = cfg.replace(engine=replace(cfg.engine, checkpoint_dir=checkpoint, keep_checkpoint=True))
    else:
        if checkpoint:
            params.update(checkpoint_dir=checkpoint, keep_checkpoint=True)
        try:
            cfg = config_cls(**params)
        except (TypeError, ValueError) as exc:
            print(f"  SKIP {entry.name}: QuantConfig rejected {entry.params}: {exc}")
            return None
    calib = [{INPUT: calib_x[i:i + CALIB_BATCH]} for i in range(0, len(calib_x), CALIB_BATCH)]
    t0 = time.perf_counter()
    # All 250 calibration images calibrate (as for onnxruntime); the report's fidelity check runs on
    # held-out evaluation images (they never influence the model).
    validation = [{INPUT: holdout_x}]
    if entry.mixed_w4size:
        result, plan = _quantize_mixed_w4size(fp32, calib, cfg, validation, out, entry.mp_table)
    else:
        result, plan = quantize(str(fp32), calib, cfg, validation=validation), None
    result.save(str(out))
    seconds = time.perf_counter() - t0
    report = getattr(result, "report", {}) or {}
    shown = ", ".join(f"{k}={v}" for k, v in entry.params.items() if k not in ("target", "seed"))
    notes = [f"--preset {entry.preset}" + (f" --set {shown}" if shown else "")] if entry.preset else \
        [f"QuantConfig({shown})"]
    if plan is not None:
        notes.append(f"integer-program bit plan at uniform W4A8's weight size "
                     f"(ratio {plan['size_ratio']:.4f}): layers per width {plan['layers_per_width']}")
    return {"quant_s": seconds, "notes": notes, "bit_plan": plan,
            "onnxq_report": {k: report.get(k) for k in ("validation", "float_ops", "timings")}}


def _quantize_mixed_w4size(fp32: Path, calib: list, cfg: Any, validation: list, out: Path,
                           table_weights: str = "rtn") -> tuple[Any, dict[str, Any]]:
    """Sensitivity table (8/4/2 bits, output MSE on held-out calibration images; weights by
    ``table_weights``), the integer program at the weight size of uniform W4A8, then one quantization
    (``cfg``'s method) with that plan."""
    from onnxq.mixed.plan import Budget, quantize_mixed, uniform_plan
    from onnxq.mixed.sensitivity import measure_sensitivity

    adaquant = None
    if table_weights == "adaquant":
        from onnxq.recon.adaquant import AdaQuantConfig

        adaquant = AdaQuantConfig.fast("parallel", iters=MP_TABLE_ADAQUANT_ITERS, seed=cfg.seed)
    table = measure_sensitivity(str(fp32), calib, cfg, widths=(8, 4, 2), reconstruct=table_weights,
                                adaquant=adaquant)
    table.save(out.with_suffix(".sensitivity.json"))
    w4 = uniform_plan(table, 4)
    mixed = quantize_mixed(str(fp32), calib, cfg, budget=Budget("size", w4.size_ratio), table=table,
                           validation=validation)
    mixed.plan.save(out.with_suffix(".bitplan.json"))
    predicted = mixed.plan.to_dict()["predicted"]
    return mixed.result, {"size_ratio": predicted["size_ratio"], "uniform_w4_ratio": w4.size_ratio,
                          "layers_per_width": predicted["layers_per_width"],
                          "path": str(out.with_suffix(".bitplan.json")), "sensitivity_s": table.seconds,
                          "table_weights": table.reconstruct}


def _preset_with_overrides(name: str, overrides: dict[str, Any]) -> Any:
    """Preset ``name`` with ``--set`` overrides as dotted paths (``rounding.iters``), layered over the
    preset's own settings exactly as the CLI's ``--preset NAME --set ...`` does."""
    from onnxq.config import Config
    from onnxq.config.files import merge, nested
    from onnxq.config.presets import preset

    layer = preset(name)
    for key, value in overrides.items():
        layer = merge(layer, nested(key.split("."), value))
    return Config.from_dict(layer)


def write_results(json_path: Path | None, payload: dict[str, Any], markdown: str | None,
                  text: Callable[[], str]) -> None:
    """Write ``payload`` to ``json_path`` and the report ``text()`` to ``markdown`` ("-": print it)."""
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload, indent=2, default=str))
        print(f"wrote {json_path}")
    if markdown:
        report = text()
        if markdown == "-":
            print(report)
        else:
            Path(markdown).parent.mkdir(parents=True, exist_ok=True)
            Path(markdown).write_text(report)
            print(f"wrote {markdown}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: value}``; a value is read as JSON (10, 0.5, true, null) or
    else kept as a string. Unknown keys are caught where ``QuantConfig`` is built."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set {item!r}: use KEY=VALUE")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _select(only: str | None) -> tuple[list[OrtEntry], list[OnnxqEntry]]:
    if not only:
        return ([e for e in ORT_CONFIGS if e.default], [e for e in ONNXQ_CONFIGS if e.default])
    names = {n.strip() for n in only.split(",") if n.strip()} - {"fp32"}
    known = {e.name for e in ORT_CONFIGS} | {e.name for e in ONNXQ_CONFIGS}
    unknown = names - known
    if unknown:
        raise SystemExit(f"unknown --only name(s) {sorted(unknown)}; known: fp32, {sorted(known)}")
    return ([e for e in ORT_CONFIGS if e.name in names], [e for e in ONNXQ_CONFIGS if e.name in names])


def main(argv: list[str] | None = None) -> None:
    import os

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=REPO_ROOT / "build" / "bench")
    ap.add_argument("--only", help="comma-separated config names (FP32 always runs)")
    ap.add_argument("--latency-runs", type=int, default=200, help="timed runs at batch 1")
    ap.add_argument("--latency-runs-b32", type=int, default=10, help="timed runs at batch 32")
    ap.add_argument("--limit", type=int, help="use only the first N evaluation images")
    ap.add_argument("--calib-limit", type=int, help="use only the first N calibration images")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a QuantConfig field in every onnxq entry (repeatable; VALUE is JSON, "
                         "else a string), e.g. --set recon_round_weight=10; rows are named NAME[KEY=VALUE]")
    ap.add_argument("--json", type=Path, help="write all results to this JSON file")
    ap.add_argument("--markdown", nargs="?", const="-", metavar="PATH",
                    help="print (or write to PATH) a markdown report for docs/benchmarks.md")
    args = ap.parse_args(argv)
    # Per-block reconstruction losses and pass timings go to stderr as they happen.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    t_start, load_start = time.perf_counter(), os.getloadavg()

    ort_entries, onnxq_entries = _select(args.only)
    overrides = parse_overrides(args.overrides)
    if overrides:
        tag = ",".join(f"{k}={v}" for k, v in overrides.items())
        onnxq_entries = [replace(e, name=f"{e.name}[{tag}]", params={**e.params, **overrides},
                                 checkpoint=f"{e.checkpoint}[{tag}]" if e.checkpoint else None)
                         for e in onnxq_entries]
    out_dir = args.out_dir
    opt_dir = out_dir / "ort_optimized"
    opt_dir.mkdir(parents=True, exist_ok=True)
    fp32 = export_efficientnet_lite0(REPO_ROOT / "build" / "models" / "efficientnet_lite0.onnx")
    splits = {"val": load_split("val", args.limit), "eval": load_split("eval", args.limit)}
    x_eval, y_eval = splits["eval"]
    x_cal, _ = load_split("calib", args.calib_limit)
    print(f"val {splits['val'][0].shape}, eval {x_eval.shape}, calib {x_cal.shape}, preprocessing {PREPROC_TAG}")

    rows: list[dict[str, Any]] = []
    paths: dict[str, Path] = {}
    print("[fp32] evaluating")
    ref = evaluate(fp32, splits, opt_dir, x_cal)
    jobs: list[tuple[str, str, Any]] = [("fp32", "-", None)]
    jobs += [(e.name, "onnxruntime", e) for e in ort_entries]
    jobs += [(e.name, "onnxq", e) for e in onnxq_entries]
    for name, tool, entry in jobs:
        if tool == "-":
            path, info, res = fp32, {"quant_s": None, "notes": ["torch.onnx export, opset 13"]}, ref
        else:
            path = out_dir / f"{name}.onnx"
            print(f"[{name}] quantizing")
            try:
                info = (quantize_ort(entry, fp32, x_cal, path) if tool == "onnxruntime"
                        else quantize_onnxq(entry, fp32, x_cal, path, x_eval[:32]))
                if info is None:
                    continue
                print(f"[{name}] evaluating")
                res = evaluate(path, splits, opt_dir, x_cal)
            except Exception as exc:  # keep the benchmark going; record the failure
                print(f"  FAILED {name}: {type(exc).__name__}: {exc}")
                rows.append({"name": name, "tool": tool, "error": f"{type(exc).__name__}: {exc}"})
                continue
        paths[name] = path
        agree = {f"agree_{k[5:]}": float(np.mean(v == ref[f"pred_{k[5:].rsplit('_', 1)[0]}_all"]) * 100)
                 for k, v in res.items() if k.startswith("pred_") and k != "pred_calib"}
        rows.append({"name": name, "tool": tool, "path": str(path), **info,
                     **{k: v for k, v in res.items() if not k.startswith("pred")}, **agree,
                     "agree": agree["agree_val_all"],
                     "agree_calib": float(np.mean(res["pred_calib"] == ref["pred_calib"]) * 100),
                     "size_bytes": path.stat().st_size,
                     "size_ratio": path.stat().st_size / fp32.stat().st_size})
        q = rows[-1]["quant_s"]
        r = rows[-1]
        print(f"  val top1 {r['top1_val_all']:.2f}% / {r['top1_val_disable']:.2f}% (ALL / DISABLE), agree "
              f"{r['agree_val_all']:.2f}% / {r['agree_val_disable']:.2f}%; eval top1 {r['top1_eval_all']:.2f}% / "
              f"{r['top1_eval_disable']:.2f}% (calibration images agree {r['agree_calib']:.2f}%)  "
              f"size {rows[-1]['size_bytes'] / 1e6:.2f} MB  quant {q if q is None else round(q, 1)} s")

    print(f"latency: batch 1 x {args.latency_runs}, batch {EVAL_BATCH} x {args.latency_runs_b32}, "
          f"models interleaved")
    lat1 = measure_latency(paths, x_eval, 1, args.latency_runs)
    lat32 = measure_latency(paths, x_eval, EVAL_BATCH, args.latency_runs_b32)
    for row in rows:
        if row["name"] in paths:
            row.update(lat_b1_ms=lat1[row["name"]], lat_b32_ms=lat32[row["name"]],
                       lat_b1_ratio=lat1[row["name"]] / lat1["fp32"],
                       lat_b32_ratio=lat32[row["name"]] / lat32["fp32"])
            print(f"  {row['name']:28s} b1 {row['lat_b1_ms']:8.2f} ms ({row['lat_b1_ratio']:.2f}x)  "
                  f"b32 {row['lat_b32_ms']:9.1f} ms ({row['lat_b32_ratio']:.2f}x)")

    total_s = time.perf_counter() - t_start
    meta = {**machine_info(), "command": command, "n_eval": int(len(y_eval)), "n_val": int(len(splits["val"][1])),
            "n_calib": int(len(x_cal)), "latency_runs": args.latency_runs,
            "latency_runs_b32": args.latency_runs_b32, "preprocessing": PREPROC_TAG,
            "total_s": total_s, "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    print(f"total wall time {total_s:.0f} s")
    write_results(args.json, {"meta": meta, "results": rows}, args.markdown, lambda: markdown_report(meta, rows))


if __name__ == "__main__":
    main()
