"""AdaQuantPass: AdaQuant (Hubara et al., ICML 2021) layer by layer on the round-to-nearest QDQ graph.

Reads ``ctx.reference`` (the float model: inputs and targets), ``ctx.calib``, ``ctx.float_weights`` and
``ctx.qparams``; rewrites weight codes and scales, INT32 biases and learned input steps/zero-points;
writes ``ctx.reconstruction`` and the report's "reconstruction" (same layout as ReconstructPass,
``method = "adaquant"``).

For every layer unit (:func:`onnxq.blocks.layer_units.layer_blocks`: one weighted op, its input quantizer,
weight, bias and fused activation) in topological order, :func:`onnxq.recon.adaquant.optimize_layer`
minimises ``E || f(Q_w(W') Q_x(x~) + Q_b(b')) - f(W x + b) ||^2`` over W', b' and both quantizers' ranges:

* ``parallel``: x~ = x comes from the float model, so every layer is independent of the others. All
  inputs and targets are captured from the float model in a few passes (as many layers at once as the
  cache budget holds). This is what lets a layer be pre-optimised at several bit widths, once per
  width, before an integer program picks one per layer (CalibTIP's mixed precision).
* ``sequential``: x~ comes from the QDQ model quantized so far (earlier layers already optimised and
  written back), captured again before each layer; the target is still the float output.

A layer keeps its result only when its held-out loss beats round-to-nearest. After each layer the
changed constants (and the trained float tensors) are checkpointed, so an interrupted run resumes.
Unlike BRECQ, the first layer is optimised too (the paper optimises every quantized layer; its
bit width is ``first_last_bits``).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import onnx_graphsurgeon as gs
import torch
from tqdm.auto import tqdm

from onnxq.blocks.adaquant_build import apply_layer_constants, build_layer, write_layer
from onnxq.blocks.cache import TensorStore, collect
from onnxq.blocks.checkpoint import Checkpoint, fingerprint
from onnxq.blocks.layer_units import layer_blocks
from onnxq.blocks.partition import Block
from onnxq.core import memory
from onnxq.core.context import QuantContext
from onnxq.core.graph import to_model
from onnxq.core.pass_infra import Pass, PassResult
from onnxq.data.batches import count_samples, engine_batch, rebatch
from onnxq.data.capture import capture
from onnxq.errors import PassError
from onnxq.recon.adaquant import AdaQuantConfig, optimize_layer
from onnxq.torchify import supported

log = logging.getLogger(__name__)


def channel_rms(y: np.ndarray, chunk: int = 32) -> np.ndarray | None:
    """Per-channel (axis 1) RMS of ``y``; None for outputs without a channel axis."""
    if y.ndim < 2:
        return None
    acc = np.zeros(y.shape[1], dtype=np.float64)
    for start in range(0, y.shape[0], chunk):
        part = np.asarray(y[start:start + chunk], dtype=np.float32)
        axes = tuple(d for d in range(part.ndim) if d != 1)
        acc += np.square(part, dtype=np.float64).sum(axis=axes)
    count = y.size / y.shape[1]
    rms = np.sqrt(acc / max(count, 1.0))
    positive = rms[rms > 0]
    fill = float(positive.mean()) if positive.size else 1.0
    return np.where(rms > 0, rms, fill).astype(np.float32)


class AdaQuantPass(Pass):
    """AdaQuant over every layer unit (see the module docstring).

    Args:
        config: the schedule and mode.
        checkpoint_dir: folder for resumable runs (None: no checkpoint). keep_checkpoint: leave a
            finished run's checkpoint in place (a re-run with the same settings reuses every layer).
        cache_budget_bytes: RAM for captured tensors before spilling to disk; also the size of one
            float-capture group.
    """

    def __init__(self, config: AdaQuantConfig, *, checkpoint_dir: str | None = None,
                 keep_checkpoint: bool = False, cache_budget_bytes: int = 2 << 30) -> None:
        self.config = config
        self.checkpoint_dir = checkpoint_dir
        self.keep_checkpoint = keep_checkpoint
        self.cache_budget = cache_budget_bytes

    def requires(self, graph: gs.Graph, ctx: QuantContext) -> None:
        if ctx.reference is None or ctx.calib is None:
            raise PassError("AdaQuantPass needs ctx.reference and ctx.calib")

    def call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        with memory.reuse_freed():  # the engine's tensors are reused, not mapped and faulted in anew
            return self._call(graph, ctx)

    def _call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        cfg = self.config
        units = layer_blocks(graph, is_supported=lambda n: supported(n) is None)
        settings = {"adaquant": cfg.__dict__, "units": [u.name for u in units]}
        ckpt = Checkpoint(self.checkpoint_dir, fingerprint(to_model(graph).SerializeToString(), settings))
        for index in ckpt.done:
            apply_layer_constants(graph, ctx, ckpt.load(index))
        feeds = list(rebatch(ctx.calib, engine_batch([t.shape for t in graph.inputs]), limit=cfg.num_samples))
        report = {"method": "adaquant", "mode": cfg.mode, "iters": cfg.iters, "batch_size": cfg.batch_size,
                  "num_samples": cfg.num_samples, "blocks": [], "resumed_blocks": len(ckpt.done)}
        start = time.perf_counter()
        timing = {"capture_s": 0.0, "train_s": 0.0}
        todo = [u for u in units if u.index not in ckpt.done]
        bar = tqdm(total=len(units), desc=f"adaquant ({cfg.mode})", unit="layer", disable=None)
        for u in units:
            if u.index in ckpt.done:
                report["blocks"].append({"block": u.name, **ckpt.results.get(str(u.index), {})})
                bar.update(1)
        for group in self._groups(todo, feeds, ctx):
            t0 = time.perf_counter()
            store = TensorStore(self.cache_budget)
            names = [n for u in group for n in (*u.outputs, *(u.inputs if cfg.mode == "parallel" else ()))]
            fp = collect(ctx.reference, names, feeds, cfg.num_samples, store, "capture fp")
            timing["capture_s"] += time.perf_counter() - t0
            try:
                for u in group:
                    entry = self._one_layer(graph, ctx, u, feeds, fp, timing)
                    report["blocks"].append(entry)
                    ckpt.save(u.index, entry.pop("_constants"), entry)
                    bar.update(1)
                    memory.trim()  # the layer's freed training tensors (reuse_freed does not trim on free)
            finally:
                store.close()
        bar.close()
        report["blocks"].sort(key=lambda b: [u.name for u in units].index(b["block"]))
        report["seconds"] = round(time.perf_counter() - start, 1)
        report.update({k: round(v, 1) for k, v in timing.items()})
        report["improved_blocks"] = sum(1 for b in report["blocks"] if b.get("kept"))
        ctx.report["reconstruction"] = ctx.reconstruction = report
        if not self.keep_checkpoint:
            ckpt.clear()
        return PassResult(graph, report["improved_blocks"] > 0)

    def _groups(self, units: list[Block], feeds, ctx: QuantContext) -> list[list[Block]]:
        """Consecutive units whose float tensors fit the cache budget together (sizes from one sample)."""
        if not units or not feeds:
            return [units] if units else []
        parallel = self.config.mode == "parallel"
        names = [n for u in units for n in (*u.outputs, *(u.inputs if parallel else ()))]
        probe = [{k: v[:1] for k, v in feeds[0].items()}]
        sizes: dict[str, int] = {}
        capture(ctx.reference, list(dict.fromkeys(names)), probe,
                lambda name, value: sizes.__setitem__(name, int(np.asarray(value)[:1].size)), desc="probe")
        n = min(self.config.num_samples, count_samples(feeds))
        groups: list[list[Block]] = [[]]
        used = 0
        for u in units:
            need = 2 * n * sum(sizes.get(t, 0) for t in (*u.outputs, *(u.inputs if parallel else ())))
            if groups[-1] and used + need > self.cache_budget:
                groups.append([])
                used = 0
            groups[-1].append(u)
            used += need
        return groups

    def _one_layer(self, graph: gs.Graph, ctx: QuantContext, unit: Block, feeds, fp: dict[str, np.ndarray],
                   timing: dict[str, float]) -> dict:
        cfg = self.config
        t0 = time.perf_counter()
        if cfg.mode == "parallel":
            inputs = [fp[t] for t in unit.inputs]
            store = None
        else:
            store = TensorStore(self.cache_budget)
            q = collect(to_model(graph), unit.inputs, feeds, cfg.num_samples, store, "capture q")
            inputs = [q[t] for t in unit.inputs]
        targets = [fp[t] for t in unit.outputs]
        n = min(a.shape[0] for a in (*inputs, *targets))
        inputs, targets = [a[:n] for a in inputs], [a[:n] for a in targets]
        timing["capture_s"] += time.perf_counter() - t0
        try:
            t1 = time.perf_counter()
            built = build_layer(graph, unit, ctx, cfg, out_rms=channel_rms(targets[0]))
            result = optimize_layer(built.module, built.weights, built.biases, built.acts,
                                    [torch.from_numpy(np.asarray(a)) for a in inputs],
                                    [torch.from_numpy(np.asarray(a)) for a in targets], cfg,
                                    desc=unit.name.split(":")[0], progress=None)
            timing["train_s"] += time.perf_counter() - t1
        finally:
            if store is not None:
                store.close()
        kept = result.improved and any(built.trained.values())
        constants = write_layer(graph, built, ctx) if kept else {}
        log.info("%s: loss %.4g -> %.4g (%s)", unit.name, result.loss_rtn, result.loss_final,
                 "kept" if kept else "round-to-nearest kept")
        return {"block": unit.name, "kind": unit.kind, "loss_rtn": result.loss_rtn,
                "loss_final": result.loss_final,
                "kept": kept, "seconds": round(result.seconds, 1), "samples": n,
                "trained": sorted(k for k, v in built.trained.items() if v),
                "history": [round(h, 6) for h in result.history], "_constants": constants}
