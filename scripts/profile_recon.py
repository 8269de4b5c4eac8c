"""Where a reconstruction's time goes, and how close the torch engine runs to this machine's peak.

Quantizes EfficientNet-Lite0 with a preset (default ``w4a4``: W4A4 QDrop) on the 250 calibration images,
with ``--iters`` iterations a block (short runs are enough to profile), and reports:

* the machine's peak, measured here: float32 GEMM (2048^3), a dense 3x3 convolution and a depthwise one
  (forward and backward, channels-last, batch 16) in GFLOP/s;
* the run split into phases: calibration and the passes before reconstruction, capture (the float model's
  targets; the quantized model's carried block inputs), and per training step ``batch``, ``forward``,
  ``backward``, ``optimizer``, of which ``fake_quant`` (activation quantizers, forward and backward, and
  weight quantizers' forward), then ``evaluate``, ``write_back``, ``checkpoint``, and ``export`` (the passes
  after reconstruction and writing the model);
* per block: FLOPs of one training step (3x the forward's convolution and matmul FLOPs from
  ``torch.utils.flop_counter`` at the run's batch size), iterations per second and the achieved GFLOP/s
  (FLOPs x iterations / training seconds: batch, forward, backward, optimizer).

Side by side with another commit: install that commit's package into a folder and point ``--onnxq`` at it
(the phase split needs this tree's engine; older code reports what it records: iterations per second of
the engine and of the whole pass)::

    git worktree add /tmp/base <commit>
    pip install --no-deps --no-build-isolation --target /tmp/base_pkg /tmp/base
    python scripts/profile_recon.py --onnxq /tmp/base_pkg --iters 300 --json base.json
    python scripts/profile_recon.py --iters 300 --json head.json

    python scripts/profile_recon.py [--preset w4a4] [--iters 50] [--samples 250] [--augment 0] [--seed 0]
        [--device cpu] [--set SECTION.FIELD=VALUE ...] [--onnxq PKG] [--op-table K] [--json PATH]
        [--out-dir build/profile] [--no-peak]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_efficientnet import export_efficientnet_lite0  # noqa: E402
from imagenet_sample import load_split  # noqa: E402

log = logging.getLogger("profile_recon")


# ------------------------------------------------------------------------------------------- peak
def _gflops(fn, flops: float, repeat: int = 5) -> float:
    fn()  # warm up (oneDNN primitive creation)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return flops / best / 1e9


def measure_peak(device: str) -> dict[str, float]:
    """GFLOP/s of a float32 GEMM and of dense and depthwise 3x3 convolutions (forward + backward)."""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    n = 2048
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)

    def gemm():
        torch.mm(a, b)
        sync()

    out = {"gemm": _gflops(gemm, 2.0 * n ** 3)}
    for name, (c, hw, groups) in {"conv3x3": (64, 56, 1), "depthwise3x3": (240, 28, 240)}.items():
        x = torch.randn(16, c, hw, hw, device=dev).contiguous(memory_format=torch.channels_last).requires_grad_()
        w = torch.randn(c, c // groups, 3, 3, device=dev, requires_grad=True)
        macs = 16 * c * hw * hw * (c // groups) * 9

        def step(x=x, w=w, groups=groups):
            y = torch.nn.functional.conv2d(x, w, padding=1, groups=groups)
            y.backward(torch.ones_like(y))
            sync()

        out[name] = _gflops(step, 3 * 2.0 * macs)  # forward, input gradient, weight gradient
    return {k: round(v, 1) for k, v in out.items()}


# ------------------------------------------------------------------------------------------- instrumentation
class _Probe:
    """Wraps the engine's entry point and quantizers to count FLOPs and time fake quantization."""

    def __init__(self, op_table_block: int | None = None) -> None:
        self.blocks: list[dict] = []
        self.fq_seconds = 0.0
        self.op_table_block = op_table_block
        self.op_table = ""

    def install(self) -> None:
        import importlib

        import onnxq.passes.rounding.reconstruct as rp

        adaround = importlib.import_module("onnxq.recon.adaround")
        fake_quant = importlib.import_module("onnxq.recon.fake_quant")

        real = rp.reconstruct_block
        probe = self

        def wrapped(module, weights, acts, inputs_q, inputs_fp, targets, config, **kw):
            flops = probe._step_flops(module, inputs_q, config.batch_size)
            t = time.perf_counter()
            if len(probe.blocks) == probe.op_table_block:  # this block under torch's profiler: its top ops
                with torch.profiler.profile() as prof:
                    result = real(module, weights, acts, inputs_q, inputs_fp, targets, config, **kw)
                probe.op_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            else:
                result = real(module, weights, acts, inputs_q, inputs_fp, targets, config, **kw)
            probe.blocks.append({"block": kw.get("desc", ""), "flops_per_step": flops, "iters": result.iters,
                                 "seconds": time.perf_counter() - t,
                                 "phases": dict(getattr(result, "phases", {}) or {})})
            return result

        rp.reconstruct_block = wrapped
        fn = fake_quant._FakeQuantFn
        fwd, bwd = fn.forward, fn.backward

        def timed(f):
            def run(*args):
                t = time.perf_counter()
                try:
                    return f(*args)
                finally:
                    probe.fq_seconds += time.perf_counter() - t
            return run

        fn.forward, fn.backward = staticmethod(timed(fwd)), staticmethod(timed(bwd))
        adaround.AdaRoundWeight.forward = timed(adaround.AdaRoundWeight.forward)

    @staticmethod
    def _step_flops(module, inputs, batch: int) -> int:
        """FLOPs of one training step at ``batch`` samples: 3x the forward's convolution and matmul FLOPs
        (forward, input gradient, weight gradient; torch's counter overcounts grouped convolutions'
        backward, so the forward alone is counted)."""
        from torch.utils.flop_counter import FlopCounterMode

        xs = [torch.as_tensor(x[:batch]) for x in inputs]
        xs = [x.float() if x.is_floating_point() else x for x in xs]
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            module(*xs)
        return 3 * int(counter.get_total_flops())


# ------------------------------------------------------------------------------------------- run
def _configured(preset: str, sets: list[str]):
    """The preset with ``SECTION.FIELD=VALUE`` overrides, as ``onnxq quantize --preset P --set ...``."""
    import onnxq
    from onnxq.config.files import merge, nested, parse_override

    values = onnxq.Config.from_preset(preset).to_dict()
    for item in sets:
        values = merge(values, nested(*parse_override(item)))
    return onnxq.Config.from_dict(values)


def run(args) -> dict:
    import onnxq

    model = export_efficientnet_lite0()
    x, _ = load_split("calib", limit=args.samples)
    calib = [{"input": x[i:i + 25]} for i in range(0, len(x), 25)]
    config = _configured(args.preset, [f"rounding.iters={args.iters}", f"rounding.augment={args.augment}",
                                       f"seed={args.seed}", f"engine.device={args.device}",
                                       "validation.enabled=false", *args.set])
    probe = _Probe(args.op_table)
    probe.install()
    t0 = time.perf_counter()
    result = onnxq.quantize(model, calib, config)
    quantize_s = time.perf_counter() - t0
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    result.save(out_dir / f"lite0_{args.preset}.onnx")
    save_s = time.perf_counter() - t
    report = result.report
    rec = report["reconstruction"]
    passes = report.get("passes", [])
    names = [p["pass"] for p in passes]
    at = next(i for i, n in enumerate(names) if "Reconstruct" in n or "MRECG" in n)
    before = sum(p["seconds"] for p in passes[:at])
    after = sum(p["seconds"] for p in passes[at + 1:])
    phases = dict(rec.get("phases", {}))
    engine_s = sum(b["seconds"] for b in probe.blocks)  # every engine call, its evaluations included
    iters = sum(b["iters"] for b in probe.blocks)
    blocks = []
    for b in probe.blocks:
        train = sum(b["phases"].get(k, 0.0) for k in ("batch", "forward", "backward", "optimizer")) or b["seconds"]
        steps = b["iters"]
        blocks.append({"block": b["block"], "iters": steps, "gflop_per_step": round(b["flops_per_step"] / 1e9, 3),
                       "it_per_s": round(steps / train, 2) if steps else None,
                       "gflop_per_s": round(b["flops_per_step"] * steps / train / 1e9, 1) if steps else None})
    flops = sum(b["flops_per_step"] * b["iters"] for b in probe.blocks)
    train_s = sum(phases.get(k, 0.0) for k in ("batch", "forward", "backward", "optimizer")) or engine_s
    return {
        "preset": args.preset, "iters": args.iters, "samples": rec.get("samples"), "seed": args.seed,
        "device": args.device, "onnxq": str(Path(onnxq.__file__).resolve().parents[1]),
        "seconds": {"quantize": round(quantize_s, 1), "before_reconstruction": round(before, 1),
                    "reconstruction": rec["seconds"], "export": round(after + save_s, 1),
                    **{k: round(v, 1) for k, v in phases.items()},
                    "fake_quant": round(probe.fq_seconds, 1), "engine_total": round(engine_s, 1)},
        "iterations": iters,
        "it_per_s_engine": round(iters / engine_s, 2),
        "it_per_s_engine_training": round(iters / train_s, 2),
        "it_per_s_reconstruction": round(iters / rec["seconds"], 2),
        "gflop_per_s_training": round(flops / train_s / 1e9, 1),
        "blocks": blocks,
        **({"op_table": probe.op_table.splitlines()} if probe.op_table else {}),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="w4a4")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--samples", type=int, default=250)
    p.add_argument("--augment", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--set", action="append", default=[], help="SECTION.FIELD=VALUE, as onnxq quantize --set")
    p.add_argument("--json", help="write the figures here too")
    p.add_argument("--out-dir", default="build/profile")
    p.add_argument("--no-peak", action="store_true", help="skip the peak measurement")
    p.add_argument("--op-table", type=int, metavar="K",
                   help="run the K-th reconstructed block (from 0) under torch's profiler and list its top ops "
                        "(that block's timings include the profiler's overhead)")
    p.add_argument("--onnxq", help="profile the onnxq package installed in this folder (pip install --target)")
    args = p.parse_args()
    if args.onnxq:  # before anything imports onnxq: the folder's copy, not this checkout's editable install
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        sys.path.insert(0, str(Path(args.onnxq).resolve()))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    np.random.seed(0)
    figures = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                           "flags": _cpu_flags()}}
    if not args.no_peak:
        figures["peak_gflop_per_s"] = measure_peak(args.device)
    figures.update(run(args))
    if "peak_gflop_per_s" in figures:
        peak = figures["peak_gflop_per_s"]["gemm"]
        figures["fraction_of_gemm_peak"] = round(figures["gflop_per_s_training"] / peak, 3)
    text = json.dumps(figures, indent=1)
    sys.stdout.write(text + "\n")
    if args.json:
        Path(args.json).write_text(text)
    return 0


def _cpu_flags() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return ""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "fma")
    return " ".join(f for f in wanted if f in flags)


if __name__ == "__main__":
    sys.exit(main())
