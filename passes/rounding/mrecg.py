"""MRECGPass: mixed reconstruction granularity (Ma et al., CVPR 2023) on top of BRECQ or QDrop.

1. Partition the RTN QDQ graph into BRECQ blocks (:func:`onnxq.blocks.partition.partition`).
2. Capacity per block: ``"data"`` runs a first, cheaper reconstruction pass (the base method with
   ``first_fraction`` of its iterations, on a copy of the graph and of the quantization state, which
   is then thrown away) and takes each block's loss after it (the kept codes' loss: ``loss_final``
   when the block beat round-to-nearest, else ``loss_rtn``). ``"proxy"`` uses our data-free capacity
   (:func:`onnxq.blocks.mrecg_plan.proxy_capacity`) and costs nothing.
3. Merge the top-k adjacent pairs (:func:`onnxq.blocks.mrecg_plan.plan_merges`; chains of at most 3 blocks).
4. Reconstruct from scratch with the merged units as blocks: :class:`ReconstructPass` with the same
   base configuration and a ``partitioner`` (one loss at each merged unit's output). ``iters``:
   ``"per_unit"`` (the paper: every unit, merged or not, runs the base iterations) or ``"per_block"``
   (ours: a unit of n blocks runs n times them, so the total matches the base method's and every
   weight gets as many steps as in its own block; at the paper's 20,000 iterations the two agree in
   practice, at our fast schedule's 300 a merged unit is otherwise under-trained).

Why a cheaper first pass: it only has to rank the loss jumps between neighbours, and most of a
block's loss reduction happens early in the schedule (the loss histories of the BRECQ report); its
cost is reported (``first_pass.seconds``) next to the final pass's. ``first_fraction=1`` repeats
the full schedule, the authors' practice.

Report ``ctx.report["mrecg"]``: base method, k, capacity kind, capacities and differentials per block /
boundary, the merges chosen (original block names), the loss along depth before (first pass; None for
the proxy) and after (final pass, at the last block of each unit), and both passes' costs.
``ctx.reconstruction`` is the final pass's report. The PNG plot of both curves is written
next to the output by :meth:`onnxq.api.QuantResult.save` (:func:`onnxq.report.mrecg_plot.plot_mrecg`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import onnx_graphsurgeon as gs
from onnxq.passes.rounding.reconstruct import ReconstructPass

from onnxq.blocks.checkpoint import claim_folder, fingerprint, release_folder
from onnxq.blocks.mrecg_plan import CAPACITIES, MergePlan, merged_partitioner, plan_merges, proxy_capacity
from onnxq.blocks.partition import Block, partition
from onnxq.config.choices import MRECG_ITERS as ITERS
from onnxq.core import graph as g
from onnxq.core.context import QuantContext
from onnxq.core.files import atomic_write_text
from onnxq.core.pass_infra import Pass, PassResult
from onnxq.core.qdq import dq_producing
from onnxq.errors import PassError, UserError
from onnxq.recon import ReconConfig
from onnxq.torchify import supported

log = logging.getLogger(__name__)

BASES = ("brecq", "qdrop")


def _kept_loss(entry: dict) -> float | None:
    if "loss_final" not in entry:
        return None
    return float(entry["loss_final"] if entry.get("kept") else entry["loss_rtn"])


class MRECGPass(Pass):
    """MRECG over a base reconstruction (see the module docstring).

    Args:
        config: the base method's ReconConfig (method brecq or qdrop), used unchanged for the final pass.
        k: number of adjacent pairs (block boundaries) to merge (docs/defaults.md on the default).
        capacity: "data" (first reconstruction pass) or "proxy" (data-free, ours).
        first_fraction: the first pass's share of the base iterations (and activation-phase iterations).
        iters: "per_unit" or "per_block", the final pass's iterations for a merged unit (see above).
        max_chain: longest chain of plain layers in one base block. max_merge: blocks per merged unit.
        checkpoint_dir: resumable runs (first pass in ``first/``, its losses in ``first_pass.json``,
            final pass in ``final/``). keep_checkpoint: leave them in place after a finished run.
            cache_budget_bytes: as ReconstructPass.
    """

    def __init__(self, config: ReconConfig, *, k: int = 4, capacity: str = "data",
                 first_fraction: float = 1 / 3, iters: str = "per_unit", max_chain: int = 3,
                 max_merge: int = 3,
                 checkpoint_dir: str | None = None, keep_checkpoint: bool = False,
                 cache_budget_bytes: int = 2 << 30) -> None:
        if config.method not in BASES:
            raise UserError(f"MRECG runs on brecq or qdrop, got base {config.method!r}")
        if capacity not in CAPACITIES:
            raise UserError(f"MRECG capacity {capacity!r} is unknown: use data or proxy")
        if iters not in ITERS:
            raise UserError(f"MRECG iters {iters!r} is unknown: use per_unit or per_block")
        if not 0.0 < first_fraction <= 1.0:
            raise UserError(f"MRECG first_fraction must be in (0, 1], got {first_fraction}")
        self.config, self.k, self.capacity, self.first_fraction = config, k, capacity, first_fraction
        self.max_chain, self.max_merge, self.iters = max_chain, max_merge, iters
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.keep_checkpoint = keep_checkpoint
        self.cache_budget = cache_budget_bytes

    def requires(self, graph: gs.Graph, ctx: QuantContext) -> None:
        if ctx.reference is None or ctx.calib is None:
            raise PassError("MRECGPass needs ctx.reference and ctx.calib")

    def first_config(self) -> ReconConfig:
        """The first pass's schedule: the base one with ``first_fraction`` of its iterations."""
        cfg = self.config
        return dataclasses.replace(cfg, iters=max(1, round(cfg.iters * self.first_fraction)),
                                   act_iters=max(0, round(cfg.act_iters * self.first_fraction)))

    def call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        if self.checkpoint_dir is not None:
            claim_folder(self.checkpoint_dir)
        ok = lambda n: supported(n) is None  # noqa: E731
        blocks = partition(graph, max_chain=self.max_chain, is_supported=ok)
        weighted_ops = ("Conv", "ConvTranspose", "Gemm", "MatMul")
        first_weighted = next((n.name for n in graph.nodes if n.op in weighted_ops
                               and dq_producing(n.inputs[1]) is not None), None)
        recon = [not (b.kind == "layer" and first_weighted in b.weighted_ops) for b in blocks]
        first: dict = {"iters": 0, "seconds": 0.0}
        t0 = time.perf_counter()
        if self.capacity == "data":
            losses, first = self._first_pass(graph, ctx, blocks)
            capacities = [losses.get(b.name) if r else None for b, r in zip(blocks, recon, strict=True)]
            before = list(capacities)
        else:
            proxy = proxy_capacity(graph, blocks, ctx)
            capacities = [c if r else None for c, r in zip(proxy, recon, strict=True)]
            before = [None] * len(blocks)
        plan = plan_merges(blocks, capacities, self.k, reconstructed=[c is not None for c in capacities],
                           max_merge=self.max_merge)
        log.info("MRECG (%s, k=%d): merges %s", self.capacity, self.k,
                 [[blocks[i].name for i in grp] for grp in plan.merges] or "none")
        t1 = time.perf_counter()
        partitioner = merged_partitioner(plan.groups, [b.name for b in blocks], self.max_chain)
        ckpt = str(self.checkpoint_dir / "final") if self.checkpoint_dir else None
        final = ReconstructPass(self.config, max_chain=self.max_chain, cache_budget_bytes=self.cache_budget,
                                checkpoint_dir=ckpt, keep_checkpoint=self.keep_checkpoint,
                                partitioner=partitioner, iters_per_member=self.iters == "per_block")
        result = final.call(graph, ctx)
        after = self._after(plan, ctx.reconstruction, len(blocks))
        ctx.report["mrecg"] = {
            "base": self.config.method, "k": self.k, "capacity": self.capacity, "max_merge": self.max_merge,
            "blocks": [b.name for b in blocks],
            "capacities": list(plan.capacities), "differentials": list(plan.differentials),
            "boundaries": list(plan.boundaries), "groups": [list(grp) for grp in plan.groups],
            "merges": [[blocks[i].name for i in grp] for grp in plan.merges],
            "loss_before": before, "loss_after": after,
            "first_pass": first, "final_pass": {"iters": self.config.iters, "per": self.iters.split("_")[1],
                                                "seconds": round(time.perf_counter() - t1, 1)},
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if not self.keep_checkpoint:
            self._clear_checkpoint()
        return PassResult(graph, result.modified)

    @staticmethod
    def _after(plan: MergePlan, report: dict, n: int) -> list[float | None]:
        """The final pass's kept loss of each unit, at the position of its last block."""
        after: list[float | None] = [None] * n
        by_index = {int(e["block"].split(":", 1)[0][len("block"):]): e for e in report.get("blocks", [])}
        for index, grp in enumerate(plan.groups):
            entry = by_index.get(index)
            if entry is not None:
                after[grp[-1]] = _kept_loss(entry)
        return after

    def _first_pass(self, graph: gs.Graph, ctx: QuantContext, blocks: list[Block]
                    ) -> tuple[dict[str, float], dict]:
        """Per-block losses of the cheaper first pass, on copies (the real graph and ctx stay as they are)."""
        cfg = self.first_config()
        saved = self.checkpoint_dir / "first_pass.json" if self.checkpoint_dir else None
        fp = fingerprint(g.to_model(graph).SerializeToString(),
                         {"recon": cfg.__dict__, "blocks": [b.name for b in blocks]})
        if saved is not None and saved.exists():
            try:
                data = json.loads(saved.read_text())
            except (OSError, ValueError) as exc:
                log.warning("MRECG: %s is unreadable (%s); running the first pass again", saved, exc)
                data = {}
            if data.get("fingerprint") == fp and "losses" in data and "info" in data:
                log.info("MRECG: first pass losses loaded from %s", saved)
                return data["losses"], data["info"]
        start = time.perf_counter()
        copy_graph = g.to_graph(g.to_model(graph))
        copy_ctx = dataclasses.replace(ctx, qparams=dict(ctx.qparams), float_weights=dict(ctx.float_weights),
                                       report={"passes": []})
        ReconstructPass(cfg, max_chain=self.max_chain, cache_budget_bytes=self.cache_budget,
                        checkpoint_dir=str(self.checkpoint_dir / "first") if self.checkpoint_dir else None
                        ).call(copy_graph, copy_ctx)
        rep = copy_ctx.reconstruction
        losses = {e["block"]: loss for e in rep["blocks"] if (loss := _kept_loss(e)) is not None}
        keys = ("block", "loss_rtn", "loss_final", "kept")
        seconds = round(time.perf_counter() - start, 1)
        info = {"iters": cfg.iters, "act_iters": cfg.act_iters, "seconds": seconds,
                "blocks": [{k: e.get(k) for k in keys} for e in rep["blocks"]]}
        if saved is not None:
            atomic_write_text(saved, json.dumps({"fingerprint": fp, "losses": losses, "info": info}))
        return losses, info

    def _clear_checkpoint(self) -> None:
        if self.checkpoint_dir is not None and self.checkpoint_dir.exists():
            release_folder(self.checkpoint_dir, ["first_pass.json"])
