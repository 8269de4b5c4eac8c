"""ReconstructPass: learn the rounding (and activation step sizes) block by block, in torch.

Reads ``ctx.reference`` (the float model after the float phase: block inputs/targets),
``ctx.calib``, ``ctx.float_weights`` and ``ctx.qparams``; rewrites the integer weight constants
(and activation scales, INT32 biases) of the round-to-nearest QDQ graph; writes
``ctx.reconstruction`` (and the report's "reconstruction").

For each block (:func:`onnxq.blocks.partition.partition`) in topological order, BRECQ's asymmetric setting:
inputs x~ come from the QDQ model quantized so far (earlier blocks already written back; for the
adaround/brecq weight phase with weights-only inputs, its activation quantizers bypassed, as BRECQ
sets ``act_quant=False`` there), targets z = f_fp(x) from the float model, and the engine minimises

    E || f_q(x~; W_hat(V)) - z ||^p + lambda * sum_ij (1 - |2 h(V_ij) - 1|^beta)

over the rounding variables V (AdaRound / BRECQ weight phase), then learns activation step sizes
(BRECQ's second phase) or does both jointly with random activation drop (QDrop). A block keeps its
new codes only when its evaluation loss beats round-to-nearest. After every block the changed
constants are checkpointed, so an interrupted run resumes from the last finished block. The first
weighted layer is not reconstructed (8-bit round-to-nearest, as BRECQ).

With ``ReconConfig.augment = k`` the blocks are fitted on the calibration samples followed by k
augmented views of each (:mod:`onnxq.data.augment`); the keep-or-not evaluation reads the first samples,
the originals.

Capture once: the float model runs once over the calibration samples for every block's targets
(and float inputs), stored float16; the quantized model's block inputs are carried forward block by
block in torch (:mod:`onnxq.blocks.carry`: each final block runs once on the carried float32 values),
instead of onnxruntime prefix runs per block. The report's ``phases`` says where the time went.

BRECQ's phase order (``ReconConfig.order``): "interleaved" runs a block's activation phase right
after its weight phase; "two_pass" is the reference's order: a weight pass over every block
(rounding only, weights-only inputs, activation quantizers off; checkpoint index k), then an
activation pass over every block (step sizes only, the weights fixed at the codes the weight pass
wrote, float-model inputs for training and the fully quantized model's for the keep-or-not
evaluation; checkpoint index ACT_PASS_OFFSET + k). Its report has one entry per block with the
activation pass's losses and the weight pass's under ``weight_phase``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs
import torch
from tqdm.auto import tqdm

from onnxq.blocks.build import apply_constants, build_block, write_back
from onnxq.blocks.cache import BlockData, TensorStore, collect, weights_only
from onnxq.blocks.carry import Carry
from onnxq.blocks.checkpoint import Checkpoint, fingerprint
from onnxq.blocks.fisher import build_tail, check_logit_outputs, fisher_gradients
from onnxq.blocks.layer_units import layer_blocks
from onnxq.blocks.partition import Block, partition
from onnxq.core import memory
from onnxq.core.context import QuantContext
from onnxq.core.graph import to_model
from onnxq.core.pass_infra import Pass, PassResult
from onnxq.core.qdq import dq_producing
from onnxq.data.augment import augment_feeds
from onnxq.data.batches import count_samples, engine_batch, rebatch
from onnxq.errors import PassError
from onnxq.recon import ReconConfig, reconstruct_block
from onnxq.recon.timing import Stopwatch
from onnxq.torchify import supported

log = logging.getLogger(__name__)

#: Checkpoint index of block k's activation pass in BRECQ's two-pass order (the weight pass uses k).
ACT_PASS_OFFSET = 100_000


class ReconstructPass(Pass):
    def __init__(self, config: ReconConfig, *, max_chain: int = 3, checkpoint_dir: str | None = None,
                 keep_checkpoint: bool = False, cache_budget_bytes: int = 2 << 30, dynamic_batch: bool = True,
                 layerwise: bool = False,
                 partitioner: Callable[[gs.Graph, Callable[[gs.Node], bool]], list[Block]] | None = None,
                 iters_per_member: bool = False):
        """``partitioner(graph, is_supported)`` replaces the default block partition (MRECG's merged
        blocks use it); ``layerwise`` selects AdaRound's one-layer units; ``keep_checkpoint`` leaves a
        finished run's checkpoint in place (a re-run with the same settings reuses every block).
        ``iters_per_member``: a unit holding ``n`` base blocks (``Block.members``) runs ``n`` times the
        iterations of each phase (and its beta schedule stretches with them), so every weight gets the
        steps it would get in its own block; off, every unit runs ``config.iters`` (the papers)."""
        self.config = config
        self.partitioner = partitioner
        self.iters_per_member = iters_per_member
        self.max_chain = max_chain
        self.checkpoint_dir = checkpoint_dir
        self.keep_checkpoint = keep_checkpoint
        self.cache_budget = cache_budget_bytes
        self.dynamic_batch = dynamic_batch
        self.layerwise = layerwise

    def requires(self, graph: gs.Graph, ctx: QuantContext) -> None:
        if ctx.reference is None or ctx.calib is None:
            raise PassError("ReconstructPass needs ctx.reference and ctx.calib")

    def call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        with memory.reuse_freed():  # the engine's tensors are reused, not mapped and faulted in anew
            return self._call(graph, ctx)

    def _call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        cfg = self.config
        ok = lambda n: supported(n) is None  # noqa: E731
        if self.partitioner is not None:
            blocks = self.partitioner(graph, ok)
        elif self.layerwise:
            blocks = layer_blocks(graph, is_supported=ok)
        else:
            blocks = partition(graph, max_chain=self.max_chain, is_supported=ok)
        first_weighted = next((n.name for n in graph.nodes if n.op in ("Conv", "ConvTranspose", "Gemm", "MatMul")
                               and dq_producing(n.inputs[1]) is not None), None)
        todo = [b for b in blocks if not (b.kind == "layer" and first_weighted in b.weighted_ops)]
        settings = {"recon": cfg.__dict__, "max_chain": self.max_chain, "blocks": [b.name for b in blocks]}
        if self.iters_per_member:
            settings["iters_per_member"] = True
        if getattr(ctx.config.rounding, "learn_weight_scale", False):  # not in the graph: must key the checkpoint
            settings["learn_weight_scale"] = True
        ckpt = Checkpoint(self.checkpoint_dir, fingerprint(to_model(graph).SerializeToString(), settings))
        for index in ckpt.done:
            apply_constants(graph, ctx, ckpt.load(index))
        store = TensorStore(self.cache_budget)
        # The calibration samples, re-batched once (every block runs them through both models).
        # With ``cfg.augment``, augmented views of those samples follow them (onnxq.data.augment).
        size = engine_batch([t.shape for t in graph.inputs]) if self.dynamic_batch else 1
        originals = list(rebatch(ctx.calib, size, limit=cfg.num_samples))
        self.feeds = augment_feeds(originals, cfg.augment, cfg.seed, optional=cfg.augment_optional)
        self.n_samples = count_samples(self.feeds)
        views = len(self.feeds) // len(originals) - 1 if originals else 0
        report = {"method": cfg.method, "iters": cfg.iters, "batch_size": cfg.batch_size,
                  "num_samples": cfg.num_samples, "act_iters": cfg.act_iters if cfg.method == "brecq" else 0,
                  "augment": views, "samples": self.n_samples,
                  "round_lr": cfg.round_lr, "round_weight": cfg.round_weight,
                  "blocks": [], "resumed_blocks": len(ckpt.done)}
        start = time.perf_counter()
        quantize_acts = any(ctx.qparams[n].spec.bits <= 8 for n in ctx.qparams if n not in ctx.float_weights)
        self.logits = None
        if cfg.fisher:  # the float model's outputs, once: the Fisher gradients of every block compare to them
            check_logit_outputs(graph)
            names = [t.name for t in graph.outputs]
            got = collect(ctx.reference, names, self.feeds, self.n_samples, store, "capture logits")
            self.logits = [got[n] for n in names]
        # No activation phase (act_iters 0): one pass of weight steps, whatever the order.
        two_pass = cfg.method == "brecq" and cfg.order == "two_pass" and quantize_acts and cfg.act_iters > 0
        no_steps = cfg.method == "brecq" and cfg.act_iters == 0
        report["order"] = "two_pass" if two_pass else "weights_only" if no_steps else "interleaved"
        phases = [("weights", 0), ("acts", ACT_PASS_OFFSET)] if two_pass else [("both", 0)]
        self.watch = Stopwatch()
        self._sample_bytes: dict[str, int] | None = None
        try:
            for phase, offset in phases:
                entries = self._run_phase(graph, ctx, blocks, todo, phase, offset, ckpt, store, quantize_acts)
                if phase == "acts":  # one entry per block: the act pass's losses, the weight pass's nested
                    for entry, w in zip(entries, report["blocks"], strict=True):
                        entry["weight_phase"] = {k: v for k, v in w.items() if k not in ("block", "kind")}
                report["blocks"] = entries
        finally:
            store.close()
        report["seconds"] = round(time.perf_counter() - start, 1)
        report["phases"] = self.watch.rounded(1)
        report["improved_blocks"] = sum(1 for b in report["blocks"]
                                        if b.get("kept") or b.get("weight_phase", {}).get("kept"))
        report["skipped"] = [b.name for b in blocks if b not in todo]
        ctx.report["reconstruction"] = ctx.reconstruction = report
        if not self.keep_checkpoint:
            ckpt.clear()
        return PassResult(graph, report["improved_blocks"] > 0)

    def _needs_float_inputs(self, phase: str) -> bool:
        """QDrop mixes float inputs in; BRECQ's activation phase trains on them."""
        return self.config.method == "qdrop" or (self.config.method == "brecq" and phase != "weights")

    def _float_names(self, block: Block, phase: str) -> list[str]:
        """The float model's tensors ``block`` trains on: its outputs, and its inputs where needed."""
        return [*block.outputs, *(block.inputs if self._needs_float_inputs(phase) else ())]

    def _float_group(self, ctx: QuantContext, pending: list[Block], phase: str, store: TensorStore) -> dict:
        """The float targets (and inputs) of the next blocks to do, from one onnxruntime run of the float
        model (float16 in ``store``): as many blocks as fit the cache budget (at least one), so a phase runs
        the float model once when its tensors fit and a few times, never per block, when not."""
        names = list(dict.fromkeys(n for b in pending for n in self._float_names(b, phase)))
        if self._sample_bytes is None or not set(names) <= set(self._sample_bytes):
            one = collect(ctx.reference, names, self.feeds[:1], 1, TensorStore(1 << 30), "float shapes")
            self._sample_bytes = {k: 2 * int(np.prod(v.shape[1:])) for k, v in one.items()}
        budget, total, group = self.cache_budget, 0, []
        for block in pending:
            size = sum(self._sample_bytes[n] for n in self._float_names(block, phase)) * self.n_samples
            if group and total + size > budget:
                break
            group.append(block)
            total += size
        wanted = list(dict.fromkeys(n for b in group for n in self._float_names(b, phase)))
        return collect(ctx.reference, wanted, self.feeds, self.n_samples, store, "capture float")

    def _run_phase(self, graph: gs.Graph, ctx: QuantContext, blocks: list[Block], todo: list[Block], phase: str,
                   offset: int, ckpt: Checkpoint, store: TensorStore, quantize_acts: bool) -> list[dict]:
        """One sweep over the blocks; block k is checkpointed under index ``offset + k``. Every block up
        to the last one to do (skipped and resumed ones included) carries the quantized inputs forward."""
        cfg = self.config
        entries: list[dict] = []
        base = store.mark()
        label = {"both": "blocks", "weights": "blocks, weight pass", "acts": "blocks, activation pass"}[phase]
        weights_only_inputs = cfg.weight_inputs == "weights_only"
        need_w = (phase == "both" and cfg.method in ("adaround", "brecq") and quantize_acts and weights_only_inputs)
        carry_store = TensorStore(self.cache_budget)
        with self.watch("carry"):
            carries = {"q": Carry(blocks, self.feeds, self.n_samples, carry_store,
                                  activations=not (phase == "weights" and weights_only_inputs))}
            if need_w:
                carries["w"] = Carry(blocks, self.feeds, self.n_samples, carry_store, activations=False)
        wanted = {b.name for b in todo}
        last = max((i for i, b in enumerate(blocks) if b.name in wanted), default=-1)
        pending = [b for b in todo if offset + b.index not in ckpt.done]
        self.float: dict = {}

        def covered(k: int) -> bool:  # the float tensors of pending block k are in the current group
            return k < len(pending) and all(n in self.float for n in self._float_names(pending[k], phase))

        bar = tqdm(total=len(todo), desc=f"{cfg.method} {label}", unit="block", disable=None)
        try:
            for block in blocks[:last + 1]:
                index = offset + block.index
                if block.name in wanted and index in ckpt.done:
                    entries.append({"block": block.name, **ckpt.results.get(str(index), {})})
                    bar.update(1)
                elif block.name in wanted:
                    k = pending.index(block)
                    if not covered(k):
                        with self.watch("capture_float"):
                            self.float = self._float_group(ctx, pending[k:], phase, store)
                    entry = self._one_block(graph, ctx, block, quantize_acts, phase, carries)
                    with self.watch("checkpoint"):
                        ckpt.save(index, entry.pop("_constants"), entry)
                    entries.append(entry)
                    bar.update(1)
                    if not covered(k + 1):
                        self.float = {}  # this group is done with: its memory goes before the carry grows
                        store.release(base)
                memory.trim()  # reuse_freed does not trim on free: the block's training tensors go here,
                with self.watch("carry"):
                    for carry in carries.values():
                        carry.advance(graph, ctx, block)
                memory.trim()  # and the inputs the carry has moved past here
        finally:
            bar.close()
            carry_store.close()
            self.float = {}
            store.release(base)
        return entries

    def unit_config(self, block: Block) -> ReconConfig:
        """The schedule of one unit: ``config``, or with ``iters_per_member`` its iterations times
        ``block.members``."""
        n = block.members if self.iters_per_member else 1
        if n == 1:
            return self.config
        return dataclasses.replace(self.config, iters=self.config.iters * n, act_iters=self.config.act_iters * n)

    def _one_block(self, graph: gs.Graph, ctx: QuantContext, block: Block, quantize_acts: bool, phase: str,
                   carries: dict[str, Carry]) -> dict:
        """Reconstruct one block. ``phase``: "both" (the method's loop(s)), or BRECQ's two-pass order:
        "weights" (rounding only, every activation quantizer off) or "acts" (step sizes only, the
        weights fixed at the codes the weight pass wrote). ``carries``: "q" (the model quantized so far;
        weights-only in a weights-only weight pass), and "w" (weights-only inputs of the weight phase)."""
        cfg = self.unit_config(block)
        if phase == "weights":
            cfg = dataclasses.replace(cfg, act_iters=0)
        need_fp = self._needs_float_inputs(phase)
        need_w = "w" in carries

        def current(weights: bool):  # the model a carry captures from when its inputs were not carried
            return lambda: weights_only(to_model(graph)) if weights else to_model(graph)

        with self.watch("carry"):
            inputs_q = carries["q"].inputs(block, current(not carries["q"].activations))
            inputs_w = carries["w"].inputs(block, current(True)) if need_w else None
        data = BlockData(inputs_q=inputs_q, inputs_fp=[self.float[n] for n in block.inputs] if need_fp else inputs_q,
                         targets=[self.float[n] for n in block.outputs], inputs_w=inputs_w)
        built = build_block(graph, block, ctx, rounding=cfg.method != "rtn" and phase != "acts",
                            learn_scales=quantize_acts and phase != "weights")
        if phase == "weights":
            for fq in built.acts.values():
                fq.enabled = False
        use_fisher = cfg.fisher and phase != "acts"
        fisher = self._fisher(graph, ctx, block, built.module, data) if use_fisher else None
        acts = {} if phase == "weights" else built.acts
        result = reconstruct_block(
            built.module, built.weights, acts, BlockData.as_torch(data.inputs_q),
            BlockData.as_torch(data.inputs_fp) if need_fp else None, BlockData.as_torch(data.targets),
            cfg if not cfg.fisher or fisher is not None else dataclasses.replace(cfg, fisher=False),
            fisher=fisher,
            quantize_activations=quantize_acts and phase != "weights",
            desc=f"block {block.index} ({block.kind}{'' if phase == 'both' else ', ' + phase})",
            inputs_w=BlockData.as_torch(data.inputs_w) if need_w else None)
        self.watch.add(result.phases)
        kept = cfg.method != "rtn" and result.improved
        with self.watch("write_back"):
            constants = write_back(graph, built, ctx) if kept else {}
        log.info("%s: loss %.4g -> %.4g (%s)", block.name, result.loss_rtn, result.loss_final,
                 "kept" if kept else "round-to-nearest kept")
        return {"block": block.name, "kind": block.kind, "loss_rtn": result.loss_rtn,
                "loss_final": result.loss_final, "kept": kept, "iters": cfg.iters,
                "seconds": round(result.seconds, 1),
                "samples": data.num_samples, "history": [round(h, 6) for h in result.history],
                "_constants": constants}

    def _fisher(self, graph: gs.Graph, ctx: QuantContext, block: Block, module, data: BlockData):
        """BRECQ's Fisher gradients at the block outputs (see :mod:`onnxq.blocks.fisher`), or None
        (plain error for this block) when the rest of the network cannot run in torch."""
        ok, tail = build_tail(graph, block, ctx)
        if not ok:
            log.warning("%s: the network after this block cannot run in torch; plain (unweighted) error", block.name)
            return None
        inputs = BlockData.as_torch(data.inputs_q)
        z_q: list[list[torch.Tensor]] = []
        with torch.no_grad():
            module.eval()
            for start in range(0, data.num_samples, 32):
                out = module(*[x[start:start + 32].float() for x in inputs])
                z_q.append(list(out) if isinstance(out, (tuple, list)) else [out])
        z = [torch.cat([batch[k] for batch in z_q]) for k in range(len(z_q[0]))]
        grads = fisher_gradients(tail, z, [lg[:data.num_samples] for lg in self.logits])
        return [torch.from_numpy(g) for g in grads]
