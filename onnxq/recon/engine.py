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

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from onnxq.errors import UserError
from onnxq.recon.adaround import AdaRoundWeight, RoundToNearestWeight, weight_optimizer
from onnxq.recon.batching import cache_layout, take_batch
from onnxq.recon.fake_quant import FakeQuant, bernoulli_like
from onnxq.recon.loss import BetaSchedule, ReconLoss

__all__ = ["METHODS", "BlockResult", "ReconConfig", "reconstruct_block"]

logger = logging.getLogger(__name__)

METHODS = ("rtn", "adaround", "brecq", "qdrop")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


WEIGHT_INPUTS = ("quantized", "weights_only")
ORDERS = ("interleaved", "two_pass")


@dataclass(frozen=True)
class ReconConfig:
    """Reconstruction settings. Defaults are the papers' (:meth:`paper`); :meth:`fast` is a CPU budget.

    Attributes:
        method: "rtn", "adaround", "brecq" or "qdrop".
        iters: iterations per block (weight phase; qdrop's joint loop). batch_size: mini-batch size.
        num_samples: samples the caller should cache per block (the engine uses what it is given).
        round_lr: Adam rate of the rounding variables V.
        act_lr: Adam rate of the activation step sizes; None = 4e-4 for brecq, 4e-5 otherwise.
        act_lr_relative: multiply ``act_lr`` per quantizer by its initial step size (mean over channels),
            so 8-bit and 4-bit steps move by the same fraction. The papers' rates are absolute (False).
        round_weight: lambda. beta: (start, end) temperature. warmup: fraction of ``iters`` without
            the regulariser.
        p: exponent of the weight-phase error (and of the evaluation). act_p: the act-phase exponent.
        act_iters: BRECQ's activation phase; None = iters // 4 (paper: 5,000 for 20,000).
        fisher: weight the error with (|g| + 1)^2 (the caller passes the gradients g).
        drop_prob: QDrop's per-element probability of leaving an activation in float.
        device: "cpu" or "cuda[:k]" (must be available). seed: mini-batch and drop generators.
        eval_samples: the evaluation subset (the first samples, also trained on) unless ``holdout``.
        holdout: > 0: the last ``holdout`` samples are never trained on and are the evaluation subset.
        log_every: record the training error in the history every this many iterations.
        augment: augmented views per calibration sample (:mod:`onnxq.data.augment`: a horizontal flip, then
            random resized crops), appended after the ``num_samples`` originals, so a block is fitted
            on ``num_samples * (1 + augment)`` samples. 0: none (the papers'). Image inputs only; not
            with ``holdout`` (a view of a training image would be scored as held out).
        augment_optional: a model without an image input is fitted without views (logged) instead of
            refused. Set by :meth:`long`, whose views are a default rather than the user's request.
        order: BRECQ's phase order over the network (the caller, ReconstructPass, runs it):
            "interleaved" (each block's activation phase right after its weight phase) or "two_pass"
            (BRECQ's reference: every block's weight phase, then every block's activation phase).
            None: "two_pass" for brecq (the reference's order; on EfficientNet-Lite0 W4A8 it gave 82.13 %
            top-1 against 81.33 % interleaved), "interleaved" for the other methods, which have one
            phase and accept only "interleaved". (``QuantConfig`` asks for "interleaved" with 4-bit
            activations: at W4A4 two-pass gave 69.20 % against 76.13 % interleaved.)
        weight_inputs: block inputs of the adaround/brecq weight phase: "quantized" (``inputs_q``, from
            the model quantized so far) or "weights_only" (``inputs_w``, the same model with its
            activation quantizers off, BRECQ's act_quant=False). None: "weights_only" for adaround and
            for brecq's two-pass order, "quantized" for interleaved brecq. Interleaved, a block's
            activation phase runs right after its weight phase, so later blocks get inputs clipped by
            learned steps that weights-only inputs never show (on EfficientNet-Lite0 W4A8 the learned
            output steps are about 35 % under the calibrated ones, and weights-only inputs cost 15.3
            points of top-1: 66.00 against 81.33). In the two-pass order no step is learned before
            every weight is, so weights-only inputs are consistent, as in the reference.
    """

    method: str
    iters: int = 20000
    batch_size: int = 32
    num_samples: int = 1024
    round_lr: float = 1e-3
    act_lr: float | None = None
    act_lr_relative: bool = False
    round_weight: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    p: float = 2.0
    act_iters: int | None = None
    act_p: float = 2.4
    fisher: bool = False
    drop_prob: float = 0.5
    device: str = "cpu"
    seed: int = 0
    eval_samples: int = 256
    holdout: int = 0
    log_every: int = 100
    augment: int = 0
    augment_optional: bool = False
    weight_inputs: str | None = None
    order: str | None = None

    def __post_init__(self) -> None:
        _check(self.method in METHODS,
               f"unknown reconstruction method {self.method!r}: use one of {', '.join(METHODS)}")
        for name in ("iters", "batch_size", "num_samples", "seed", "eval_samples", "holdout", "log_every",
                     "augment"):
            v = getattr(self, name)
            _check(_is_int(v), f"recon {name} must be an integer, got {v!r}")
        _check(self.augment >= 0, f"recon augment must be >= 0 views per sample, got {self.augment}")
        _check(not (self.augment and self.holdout),
               "recon augment and holdout exclude each other (a view of a training image would be scored as "
               "held out): set one of them to 0")
        _check(self.iters >= (self.method != "rtn"), f"recon iters must be >= 1, got {self.iters}")
        for name in ("batch_size", "num_samples", "eval_samples", "log_every"):
            _check(getattr(self, name) >= 1, f"recon {name} must be >= 1, got {getattr(self, name)}")
        _check(self.holdout >= 0, f"recon holdout must be >= 0, got {self.holdout}")
        if self.act_lr is None:
            object.__setattr__(self, "act_lr", 4e-4 if self.method == "brecq" else 4e-5)
        if self.act_iters is None:
            object.__setattr__(self, "act_iters", self.iters // 4)
        _check(_is_int(self.act_iters) and self.act_iters >= 0,
               f"recon act_iters must be an integer >= 0, got {self.act_iters!r}")
        for name in ("round_lr", "act_lr", "p", "act_p"):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v > 0
            _check(ok, f"recon {name} must be > 0, got {v!r}")
        _check(np.isfinite(self.round_weight) and self.round_weight >= 0,
               f"recon round_weight must be >= 0, got {self.round_weight}")
        _check(len(tuple(self.beta)) == 2, f"recon beta must be (start, end), got {self.beta!r}")
        object.__setattr__(self, "beta", (float(self.beta[0]), float(self.beta[1])))
        _check(self.beta[0] >= self.beta[1] > 0, f"recon beta must satisfy start >= end > 0, got {self.beta}")
        _check(0.0 <= self.warmup < 1.0, f"recon warmup is a fraction in [0, 1), got {self.warmup}")
        _check(0.0 <= self.drop_prob <= 1.0, f"recon drop_prob must be in [0, 1], got {self.drop_prob}")
        if self.order is None:
            object.__setattr__(self, "order", "two_pass" if self.method == "brecq" else "interleaved")
        _check(self.order in ORDERS, f"recon order {self.order!r} is unknown: use {' or '.join(ORDERS)}")
        _check(self.order == "interleaved" or self.method == "brecq",
               f"recon order {self.order!r} applies to brecq only (the method is {self.method!r}): "
               "leave the order unset")
        if self.weight_inputs is None:
            consistent = self.method == "adaround" or self.order == "two_pass"
            object.__setattr__(self, "weight_inputs", "weights_only" if consistent else "quantized")
        _check(self.weight_inputs in WEIGHT_INPUTS,
               f"recon weight_inputs {self.weight_inputs!r} is unknown: use {' or '.join(WEIGHT_INPUTS)}")
        for name in ("fisher", "act_lr_relative", "augment_optional"):
            _check(isinstance(getattr(self, name), bool), f"recon {name} must be true or false")
        dev = str(self.device)
        _check(dev == "cpu" or dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit()),
               f"recon device must be 'cpu' or 'cuda[:k]', got {self.device!r}")

    @classmethod
    def paper(cls, method: str, **overrides) -> ReconConfig:
        """The papers' schedule: 20,000 iterations, batch 32, 1,024 samples; BRECQ act phase 5,000 at lr 4e-4,
        QDrop act lr 4e-5 (cosine), lambda 0.01, beta 20 -> 2, warm-up 0.2."""
        return cls(method=method, **overrides)

    @classmethod
    def fast(cls, method: str, **overrides) -> ReconConfig:
        """A CPU budget: EfficientNet-Lite0 W4A4 in about 25 minutes on 2 cores, data capture included.

        300 iterations at batch 16 on 256 samples (BRECQ act phase: 75), AdaRound lr 5e-2, activation
        lr relative to each step size (1e-2 brecq, 5e-3 qdrop), regulariser weight lambda = 10 (the
        papers: 0.01), beta 20 -> 2 and warm-up 0.2 as in the papers.
        Why (measured on a busy 2-core Xeon, single-thread CPU time; see the recon report):

        * one iteration over all 17 blocks of Lite0 (16 MBConv + head, W4A4) costs 3.2 s (weight
          phase), 4.0 s (act phase), 5.8 s (qdrop) at batch 16 (6.8/9.5/13.7 s at 32). 300 iterations:
          adaround ~970 s, brecq ~1270 s, qdrop ~1750 s; with 2 threads (~1.6x) 10/13/18 minutes.
        * for the same compute, more and smaller steps win: on real Lite0 blocks (W4, held-out error
          relative to round-to-nearest) batch 32 x 200 gave 0.73/0.71, batch 16 x 400 0.65, batch 8 x 800
          0.60/0.57; batch 16 keeps the per-step weight overhead of big 7x7 blocks small.
        * Adam moves V by about lr per step, so the paper's 1e-3 over 300 steps only flips near-ties
          (0.85-0.88 of RTN); 5e-2 gives 0.62-0.64 (2,000 steps at 1e-3: 0.63).
        * absolute activation rates hardly move 4-bit steps in 75-300 steps and overshoot 8-bit ones;
          relative rates fixed both (W4A4 block error 0.89 -> 0.41-0.49 of RTN, W4A8 stable).
        * lambda: the regulariser must make every h(V) 0 or 1 before the final hard rounding. At
          lambda = 0.01, 300 steps leave 17-49 % of h strictly inside (0.01, 0.99) on Lite0 blocks
          (W4A8 weight phase), and the hard codes lose much of what the soft ones gained (block02:
          soft 91, hard 310, round-to-nearest 562). The regulariser only pulls h away from 1/2 once
          beta has fallen, in the last part of a schedule, so a short schedule needs it stronger.
          lambda = 10 leaves 0.1-1.5 % and cuts the hard loss on 64 held-out samples to 147 (block02),
          297 (block03, was 397), 727 (block06, was 812); 1 and 100 gave 185/449/739 and
          141/295/729.
        """
        base = dict(iters=300, batch_size=16, num_samples=256, round_lr=5e-2, act_lr_relative=True,
                    round_weight=10.0,
                    act_lr=1e-2 if method == "brecq" else 5e-3, eval_samples=128, log_every=25)
        base.update(overrides)
        return cls(method=method, **base)

    @classmethod
    def long(cls, method: str, **overrides) -> ReconConfig:
        """:meth:`fast`'s rates with 1,000 iterations a block, fitted on each image and 3 views of it.

        The setting that met issue 3's W4A8 BRECQ bar on EfficientNet-Lite0 (asymmetric per-channel
        weights; 2-core CPU, docs/benchmarks.md sessions 9-10): top-1 85.20 / 84.80 over seeds 0 / 1
        against 83.53 (mean of two seeds) for :meth:`fast`, in about 25 minutes (2 threads) and 10.2 GB.
        Neither half alone does it: 1,000 iterations without views gave 84.40 (mean of two seeds),
        3,000 iterations 84.53, and views at 300 iterations 83.91 (three seeds). A likely reason, not
        tested: at 1,000 steps of 16 each of 250 images is seen 64 times, and views stop the rounding
        from fitting those images. It is not better everywhere: at W4A4, QDrop on this schedule scored
        77.87 (one seed, session 11) against 78.00 / 79.47 with 600 iterations and the same views
        (seeds 0 / 1, session 12); W4A4 BRECQ gained 1.34 (77.47 against 76.13 fast, session 12). At
        W2A4 (4-level INT2) it lifted BRECQ from 26.93 to 44.00 and layer-wise AdaRound from 32.53 to
        33.60 (one seed each, session 11).
        A model without an image input gets no views (``augment_optional``).
        """
        base = dict(iters=1000, augment=3, augment_optional=True)
        base.update(overrides)
        return cls.fast(method, **base)


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
    """

    loss_rtn: float
    loss_final: float
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0
    iters: int = 0

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

    def __init__(self, module, cache: _Cache, config: ReconConfig, bar) -> None:
        self.module, self.cache, self.cfg, self.bar = module, cache, config, bar
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
        fp = c.take(c.fp, idx)
        if source == "fp":
            return fp
        # "mix", QDrop's block input: float with probability drop_prob per element, else quantized-upstream
        # (integer inputs, token ids or masks, carry no quantization error: taken as they are)
        p, gen = self.cfg.drop_prob, self.mask_gen
        return [torch.lerp(q, f, bernoulli_like(f, p, generator=gen)) if f.is_floating_point() else q
                for f, q in zip(fp, c.take(c.q, idx), strict=True)]

    def loop(self, iters: int, loss: ReconLoss, optimizers, schedulers, source: str) -> None:
        c, cfg = self.cache, self.cfg
        if not optimizers:  # nothing to learn in this block
            self.bar.update(iters)
            return
        bs = min(cfg.batch_size, self.n_train)
        self.module.train()
        for it in range(iters):
            idx = torch.randperm(self.n_train, generator=self.gen)[:bs].to(c.device)
            preds = _outputs(self.module, self.inputs(idx, source))
            fisher = c.take(c.fisher, idx) if c.fisher is not None else None
            terms = loss(preds, c.take(c.targets, idx), it, fisher)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            terms.total.backward()
            for opt in optimizers:
                opt.step()
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
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"recon device {config.device!r} was asked for but CUDA is not available: use 'cpu'")
    device = torch.device(config.device)
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
        runner = _Runner(module, cache, config, bar)
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
    return BlockResult(loss_rtn, loss_final, runner.history, seconds, runner.steps)


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
