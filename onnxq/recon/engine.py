"""Block reconstruction: AdaRound, BRECQ and QDrop on one torch block.

The caller builds a block module whose weights are :class:`AdaRoundWeight` modules and whose activation
Q->DQ pairs are :class:`FakeQuant` modules, and caches (N samples, batch first, any float dtype):
``inputs_q`` = block inputs from the model quantized so far, ``inputs_fp`` = block inputs from the float
model, ``targets`` = block outputs of the float model. ``module(*inputs)`` returns one tensor or a tuple.

Methods (every step draws a random mini-batch of ``batch_size`` of the N samples):

* ``adaround`` / ``brecq`` weight phase: activation quantizers off, only the rounding variables V (and
  learned weight scales, ``AdaRoundWeight(learn_scale=True)``) train
  (Adam, ``round_lr``), loss = error(module(inputs_w), targets) + lambda * regulariser (BRECQ's
  asymmetric setting: quantized-upstream inputs, float targets). ``inputs_w`` are the block inputs of
  the model quantized so far with its activation quantizers off, as in BRECQ's weight phase; without
  them ``inputs_q`` are used. Then hard rounding. ``adaround`` is meant
  for single-layer blocks; the two differ only in what the caller passes.
* ``brecq`` activation phase (only when activations are quantized): weights hard and frozen, the step
  sizes of the enabled, ``trainable`` activation quantizers train (LSQ, Adam ``act_lr`` with cosine
  decay to 0 over ``act_iters``), loss = sum |dz|^act_p, inputs from the float model (BRECQ's act
  phase is not asymmetric).
* ``qdrop``: V and the activation step sizes train jointly in one loop (two Adams; the activation one with
  cosine decay). Every enabled in-block FakeQuant drops quantization per element with probability
  ``drop_prob`` (see :class:`FakeQuant`), and the block input is ``where(rand < drop_prob, inputs_fp,
  inputs_q)`` per element. Drop is switched off (``drop_prob = 0``) at the end.
* ``rtn``: no training, only the evaluation.

Before and after, the hard module (activation quantizers as the caller set them, inputs_q) is scored
with the weight-phase error (p = ``config.p``, Fisher-weighted if ``config.fisher``) on a fixed subset:
the first ``eval_samples`` samples, or the ``holdout`` tail that is never trained on. ``loss_rtn`` is
the starting codes' loss (round-to-nearest, or the weights' ``init_codes``); the caller keeps the better.
On return (KeyboardInterrupt included, which propagates) weights are hard, every FakeQuant has
``drop_prob = 0`` and the caller's ``enabled``/``learn_scale``; learned V and scales stay in the modules.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from onnxq.errors import UserError
from onnxq.recon.adaround import AdaRoundWeight, RoundToNearestWeight, weight_optimizer
from onnxq.recon.batching import cache_layout, take_batch, take_mixed
from onnxq.recon.fake_quant import FakeQuant
from onnxq.recon.loss import BetaSchedule, ReconLoss
from onnxq.recon.timing import Stopwatch

__all__ = ["METHODS", "BlockResult", "ReconConfig", "reconstruct_block"]

logger = logging.getLogger(__name__)

METHODS = ("rtn", "adaround", "brecq", "qdrop")


@dataclass(frozen=True)
class ReconConfig:
    """The resolved settings of one reconstruction run (built and validated from the run's rounding
    method by :func:`onnxq.blocks.engine_settings.recon_settings`; every field documented there).

    Attributes:
        method: "rtn", "adaround", "brecq" or "qdrop".
        iters: iterations per block (weight phase; qdrop's joint loop). batch_size: mini-batch size.
        num_samples: samples the caller caches per block (the engine uses what it is given).
        round_lr / act_lr: Adam rates of the rounding variables and of the activation step sizes
            (``act_lr_relative``: per quantizer, times its initial step size).
        round_weight: lambda. beta: (start, end) temperature. warmup: fraction of ``iters`` without
            the regulariser. p / act_p: exponents of the weight-phase and activation-phase errors.
        act_iters: length of BRECQ's activation phase. fisher: Fisher-weighted error.
        drop_prob: QDrop's per-element probability of leaving an activation in float.
        device: torch device (must be available). seed: mini-batch and drop generators.
        eval_samples: the evaluation subset (the first samples, also trained on) unless ``holdout``.
        holdout: > 0: the last ``holdout`` samples are never trained on and are the evaluation subset.
        log_every: record the training error in the history every this many iterations.
        augment / augment_optional: augmented views per calibration sample (the caller builds them).
        weight_inputs: "quantized" or "weights_only" block inputs of the adaround/brecq weight phase.
        order: BRECQ's phase order over the network, "interleaved" or "two_pass" (the caller runs it).
    """

    method: str
    iters: int
    batch_size: int
    num_samples: int
    round_lr: float
    act_lr: float
    act_lr_relative: bool
    round_weight: float
    beta: tuple[float, float]
    warmup: float
    p: float
    act_iters: int
    act_p: float
    fisher: bool
    drop_prob: float
    device: str
    seed: int
    eval_samples: int
    log_every: int
    augment: int
    augment_optional: bool
    weight_inputs: str
    order: str
    holdout: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown reconstruction method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.holdout < 0:
            raise ValueError(f"recon holdout must be >= 0, got {self.holdout}")
        if self.augment and self.holdout:
            raise UserError("recon augment and holdout exclude each other (a view of a training image would be "
                            "scored as held out): set one of them to 0")


@dataclass
class BlockResult:
    """Outcome of :func:`reconstruct_block`.

    Attributes:
        loss_rtn: evaluation loss of the starting (round-to-nearest / init) codes.
        loss_final: evaluation loss after reconstruction (hard codes, learned scales).
        history: training reconstruction error (without the regulariser) every ``log_every`` iterations
            and at the last one, weight/joint phase first, then BRECQ's activation phase.
        seconds: wall time of the whole call.
        iters: optimisation steps taken (all phases).
        phases: seconds by phase: "batch" (taking mini-batches, QDrop's input mix), "forward" (module and
            loss), "backward", "optimizer" (steps, schedulers, zeroing), "evaluate" (before and after).
    """

    loss_rtn: float
    loss_final: float
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0
    iters: int = 0
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def improved(self) -> bool:
        """True when the reconstructed codes beat the starting ones."""
        return self.loss_final < self.loss_rtn


class _Cache:
    """The cached block data on the target device; batches are cast to float32 on the fly."""

    def __init__(self, inputs_q, inputs_fp, targets, fisher, device: torch.device, inputs_w=None) -> None:
        def put(seq):
            if seq is None:
                return None
            return [cache_layout(torch.as_tensor(t).to(device)) for t in seq]

        self.q, self.fp, self.targets, self.fisher = put(inputs_q), put(inputs_fp), put(targets), put(fisher)
        self.w = put(inputs_w)
        self.device = device
        if not self.q or not self.targets:
            raise ValueError("reconstruct_block needs at least one input and one target tensor")
        self.n = int(self.q[0].shape[0])
        named = (("inputs_fp", self.fp), ("inputs_w", self.w), ("targets", self.targets), ("fisher", self.fisher))
        for name, seq in (("inputs_q", self.q), *named):
            for t in seq or ():
                if int(t.shape[0]) != self.n:
                    raise ValueError(f"{name} has {t.shape[0]} samples, inputs_q has {self.n}")
        for name, seq in (("inputs_fp", self.fp), ("inputs_w", self.w)):
            if seq is not None and [t.shape for t in seq] != [t.shape for t in self.q]:
                raise ValueError(f"{name} and inputs_q must have the same number and shapes of tensors")
        if self.fisher is not None and [t.shape for t in self.fisher] != [t.shape for t in self.targets]:
            raise ValueError("fisher gradients must match the targets in number and shape")

    take = staticmethod(take_batch)


def require_device(name: str) -> torch.device:
    """The torch device ``name`` ("cpu", "cuda", "cuda:<k>"), or a UserError when this machine lacks it."""
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"engine.device {name!r} was asked for but CUDA is not available here: use 'cpu'")
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"engine.device {name!r}: this machine has {torch.cuda.device_count()} CUDA "
                            "device(s): use 'cuda:0' or 'cpu'")
    return torch.device(name)


def _outputs(module: nn.Module, xs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    out = module(*xs)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class _State:
    """Caller-visible flags, saved before and restored after the run (also on KeyboardInterrupt)."""

    def __init__(self, module: nn.Module, weights, acts) -> None:
        self.params = {id(p): (p, p.requires_grad) for m in (module, *weights, *acts) for p in m.parameters()}
        self.training = module.training
        self.acts = [(a, a.enabled, a.learn_scale) for a in acts]

    def freeze_all(self) -> None:
        for p, _ in self.params.values():
            p.requires_grad_(False)

    def restore_enabled(self) -> None:
        for a, enabled, _ in self.acts:
            a.enabled = enabled

    def restore(self, module: nn.Module, weights) -> None:
        for p, flag in self.params.values():
            p.requires_grad_(flag)
        module.train(self.training)
        for a, enabled, learn in self.acts:
            a.enabled, a.learn_scale, a.drop_prob, a.generator = enabled, learn, 0.0, None
        for w in weights:
            w.soft = False


class _Runner:
    """One block's optimisation loops: generators, data, progress bar, history."""

    def __init__(self, module, cache: _Cache, config: ReconConfig, bar, watch: Stopwatch) -> None:
        self.module, self.cache, self.cfg, self.bar, self.watch = module, cache, config, bar, watch
        self.gen = torch.Generator().manual_seed(config.seed)
        self.mask_gen = torch.Generator(device=cache.device).manual_seed(config.seed + 1)
        self.history: list[float] = []
        self.steps = 0
        self.n_train = cache.n - config.holdout if 0 < config.holdout < cache.n else cache.n

    def inputs(self, idx: torch.Tensor, source: str) -> list[torch.Tensor]:
        c = self.cache
        if source == "q":
            return c.take(c.q, idx)
        if source == "w":
            return c.take(c.w if c.w is not None else c.q, idx)
        if c.fp is None:
            raise ValueError(f"{self.cfg.method} needs inputs_fp (block inputs from the float model)")
        if source == "fp":
            return c.take(c.fp, idx)
        # "mix", QDrop's block input: float with probability drop_prob per element, else quantized-upstream
        return take_mixed(c.q, c.fp, idx, self.cfg.drop_prob, self.mask_gen)

    def loop(self, iters: int, loss: ReconLoss, optimizers, schedulers, source: str) -> None:
        c, cfg = self.cache, self.cfg
        if not optimizers:  # nothing to learn in this block
            self.bar.update(iters)
            return
        bs = min(cfg.batch_size, self.n_train)
        self.module.train()
        watch = self.watch
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        for it in range(iters):
            with watch("batch"):
                idx = torch.randperm(self.n_train, generator=self.gen)[:bs].to(c.device)
                xs = self.inputs(idx, source)
                fisher = c.take(c.fisher, idx) if c.fisher is not None else None
                targets = c.take(c.targets, idx)
            with watch("forward"):
                terms = loss(_outputs(self.module, xs), targets, it, fisher)
            with watch("backward"):
                terms.total.backward()
            with watch("optimizer"):
                for opt in optimizers:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                for sch in schedulers:
                    sch.step()
            self.steps += 1
            if it % cfg.log_every == 0 or it == iters - 1:
                self.history.append(float(terms.rec.detach()))
                self.bar.set_postfix(rec=f"{self.history[-1]:.4g}", reg=f"{float(terms.reg.detach()):.3g}",
                                     refresh=False)
            self.bar.update(1)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean weight-phase error of the current (hard) module on the fixed evaluation subset."""
        with self.watch("evaluate"):
            return self._evaluate()

    def _evaluate(self) -> float:
        c, cfg = self.cache, self.cfg
        self.module.eval()
        lo, hi = (self.n_train, c.n) if self.n_train < c.n else (0, min(cfg.eval_samples, c.n))
        loss, total = ReconLoss(p=cfg.p), 0.0
        for start in range(lo, hi, cfg.batch_size):
            idx = torch.arange(start, min(start + cfg.batch_size, hi), device=c.device)
            fisher = c.take(c.fisher, idx) if c.fisher is not None else None
            preds = _outputs(self.module, c.take(c.q, idx))
            total += float(loss(preds, c.take(c.targets, idx), 0, fisher).rec) * len(idx)
        return total / (hi - lo)


def _cosine(opt: torch.optim.Optimizer, iters: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(iters, 1), eta_min=0.0)


def _act_optimizer(learnable: list[FakeQuant], cfg: ReconConfig) -> torch.optim.Adam:
    if not cfg.act_lr_relative:
        return torch.optim.Adam([a.scale for a in learnable], lr=cfg.act_lr)
    groups = [{"params": [a.scale], "lr": cfg.act_lr * float(a.current_scale().mean())} for a in learnable]
    return torch.optim.Adam(groups, lr=cfg.act_lr)


def _rounding_loss(rounding: list[AdaRoundWeight], cfg: ReconConfig) -> ReconLoss:
    schedule = BetaSchedule(cfg.iters, cfg.beta[0], cfg.beta[1], cfg.warmup)
    return ReconLoss(rounding, p=cfg.p, round_weight=cfg.round_weight, schedule=schedule)


def _train_rounding(rounding: list[AdaRoundWeight], on: bool) -> None:
    for w in rounding:
        w.soft = on
        w.v.requires_grad_(on)
        if w.learned_scale is not None:  # AdaRoundWeight(learn_scale=True): the scale trains with V
            w.learned_scale.requires_grad_(on)


def reconstruct_block(module: nn.Module, weights: Mapping[str, AdaRoundWeight | RoundToNearestWeight],
                      acts: Mapping[str, FakeQuant], inputs_q: Sequence[torch.Tensor],
                      inputs_fp: Sequence[torch.Tensor] | None, targets: Sequence[torch.Tensor],
                      config: ReconConfig, *, fisher: Sequence[torch.Tensor] | None = None,
                      inputs_w: Sequence[torch.Tensor] | None = None,
                      quantize_activations: bool | None = None, desc: str = "recon",
                      progress: bool | None = None) -> BlockResult:
    """Optimise one block's rounding (and activation step sizes) in place; see the module docstring.

    Args:
        module: the block; ``module(*inputs)`` -> tensor or tuple. Its other parameters stay frozen.
        weights: the block's weight quantizers (RoundToNearestWeight entries stay fixed).
        acts: the block's activation quantizers (the block-input one included, if any).
        inputs_q: block inputs captured from the model quantized so far, ``(N, ...)`` each.
        inputs_fp: block inputs from the float model (needed by brecq's act phase and qdrop).
        targets: block outputs of the float model.
        config: the schedule.
        fisher: per-output gradients ``dL/dz`` (the targets' shapes); required when ``config.fisher``.
        inputs_w: block inputs from the model quantized so far with activation quantizers off (the
            adaround/brecq weight phase; default ``inputs_q``).
        quantize_activations: whether the deployed model quantizes activations, i.e. whether step sizes
            are learned (brecq act phase, qdrop); None = whether any FakeQuant in ``acts`` is enabled.
        desc: label of the tqdm bar.
        progress: show the bar (True), hide it (False), or show it only on a terminal (None).

    Returns:
        BlockResult with the before/after evaluation losses, history and timing.
    """
    t0 = time.perf_counter()
    device = require_device(config.device)
    if config.fisher and fisher is None:
        raise ValueError("config.fisher is set but no fisher gradients were given")
    wq, aq = list(weights.values()), list(acts.values())
    rounding = [w for w in wq if isinstance(w, AdaRoundWeight)]
    if quantize_activations is None:
        quantize_activations = any(a.enabled for a in aq)
    learnable = [a for a in aq if a.enabled and a.trainable] if quantize_activations else []
    method = config.method
    act_phase = method == "brecq" and bool(learnable) and config.act_iters > 0
    weight_iters = config.iters if rounding or (method == "qdrop" and learnable) else 0
    total = 0 if method == "rtn" else weight_iters + (config.act_iters if act_phase else 0)
    first = next((t for m in (module, *wq, *aq) for t in (*m.parameters(), *m.buffers())), None)
    home = first.device if first is not None else torch.device("cpu")
    for m in (module, *wq, *aq):
        m.to(device)
    state = _State(module, wq, aq)
    bar = tqdm(total=total, desc=desc, disable=None if progress is None else not progress, leave=False,
               unit="it", dynamic_ncols=True)
    try:
        cache = _Cache(inputs_q, inputs_fp, targets, fisher if config.fisher else None, device, inputs_w)
        state.freeze_all()
        for w in wq:
            w.soft = False
        watch = Stopwatch()
        runner = _Runner(module, cache, config, bar, watch)
        loss_rtn = runner.evaluate()
        if method in ("adaround", "brecq"):
            for a in aq:  # weight phase: activations in float, V only
                a.enabled = False
            if rounding:  # fixed weights (e.g. BRECQ's two-pass activation pass): nothing to learn here
                _train_rounding(rounding, True)
                opt = weight_optimizer(rounding, config.round_lr)
                runner.loop(config.iters, _rounding_loss(rounding, config), [opt], [], "w")
                _train_rounding(rounding, False)
            state.restore_enabled()
            if act_phase:  # hard frozen weights, LSQ steps, float-model inputs, |dz|^act_p
                for a in learnable:
                    a.learn_scale = True
                opt = _act_optimizer(learnable, config)
                sched = _cosine(opt, config.act_iters)
                runner.loop(config.act_iters, ReconLoss(p=config.act_p), [opt], [sched], "fp")
        elif method == "qdrop" and weight_iters:
            _qdrop(runner, rounding, learnable, aq, config)
        state.restore(module, wq)
        loss_final = runner.evaluate() if method != "rtn" else loss_rtn
    finally:
        bar.close()
        state.restore(module, wq)
        for m in (module, *wq, *aq):
            m.to(home)
    seconds = time.perf_counter() - t0
    logger.debug("%s: %s loss %.6g -> %.6g in %d steps, %.1f s", desc, method, loss_rtn, loss_final,
                 runner.steps, seconds)
    return BlockResult(loss_rtn, loss_final, runner.history, seconds, runner.steps, watch.rounded(3))


def _qdrop(runner: _Runner, rounding: list[AdaRoundWeight], learnable: list[FakeQuant], acts: list[FakeQuant],
           cfg: ReconConfig) -> None:
    """QDrop: V and step sizes jointly; random per-element drop in the block and on its input."""
    for a in acts:
        a.drop_prob, a.generator = cfg.drop_prob, runner.mask_gen
    _train_rounding(rounding, True)
    for a in learnable:
        a.learn_scale = True
    optimizers, schedulers = [], []
    if rounding:
        optimizers.append(weight_optimizer(rounding, cfg.round_lr))
    if learnable:
        optimizers.append(_act_optimizer(learnable, cfg))
        schedulers.append(_cosine(optimizers[-1], cfg.iters))
    runner.loop(cfg.iters, _rounding_loss(rounding, cfg), optimizers, schedulers, "mix")
    _train_rounding(rounding, False)
