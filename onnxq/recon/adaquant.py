"""AdaQuant (Hubara et al., ICML 2021): per-layer optimisation of weights, bias and quantizer ranges.

For one layer ``y = f(W x + b)`` (``f`` = the fused Relu/Clip, if any) with float input ``X`` and float
output ``Y``, AdaQuant solves, over a small calibration set,

    min over (W', b', s_w, s_x, z_x)   E || Y - f( Q_w(W'; s_w) * Q_x(X~; s_x, z_x) + Q_b(b') ) ||^2

with ``Q(v; s, z) = s * (clamp(round(v / s) + z, qmin, qmax) - z)`` (ONNX Q -> DQ), ``X~`` the layer input
(from the float model in the *parallel* variant, from the model quantized so far in the *sequential*
one) and ``Q_b(b') = s_b round(b' / s_b)``, ``s_b = s_x s_w`` (the INT32 bias of the exported graph).
Unlike AdaRound, the continuous weights themselves move (not only their rounding):

* ``round`` is a straight-through estimator: ``d Q_w / d W' = 1`` inside the grid, 0 where clipped;
* step sizes get LSQ gradients ``round(v/s) - v/s`` inside, ``qmin - z`` / ``qmax - z`` outside;
* the activation zero-point is continuous, rounded with a straight-through estimator in the forward
  pass (so the simulation is exactly the exported integer zero-point); ``d Q_x / d z = -s`` where
  clipped, 0 inside (LSQ+). It trains only on asymmetric grids; symmetric ones keep their fixed
  zero-point, and weight zero-points stay fixed (every target here wants symmetric weights);
* the bias passes through its INT32 rounding with a straight-through estimator (``s_b`` detached).

Learning rates: the paper's code uses four Adam optimisers with absolute rates on the float *ranges*
(weights 1e-5, bias 1e-3, weight range 1e-3, input range and zero-point 1e-1) for 100 iterations at
batch 50 (:meth:`AdaQuantConfig.paper`). A range is ``s (qmax - qmin)`` and a float zero-point is
``-z s``, so the rates on our step sizes are divided by ``qmax - qmin`` and the rate on the integer
zero-point by ``s``. :meth:`AdaQuantConfig.fast` instead uses *relative* rates (``relative=True``):
every parameter is stored divided by a natural unit (weights and weight steps by the initial weight
step of their channel, input steps by the initial input step, zero-points in codes, biases by the
per-channel RMS of the layer's float output), so one rate fits 8-bit and 4-bit layers alike, and
decays the rates along a cosine. One Adam with a parameter group per rate is the four optimisers.

The optimisation keeps the caller's module structure (a :class:`~onnxq.torchify.BlockModule` whose
weight/bias DequantizeLinear nodes are :class:`AdaQuantWeight` / :class:`AdaQuantBias` and whose input
Q->DQ pair is an :class:`AdaQuantAct`); only this file's modules have trainable parameters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from onnxq.core.qdq import INT32_MAX
from onnxq.recon.batching import cache_layout, take_batch
from onnxq.recon.engine import BlockResult, require_device
from onnxq.recon.fake_quant import MIN_SCALE, fake_quant, round_ste
from onnxq.recon.loss import output_error

__all__ = ["MODES", "AdaQuantAct", "AdaQuantBias", "AdaQuantConfig", "AdaQuantWeight", "LayerResult",
           "optimize_layer"]

log = logging.getLogger(__name__)

MODES = ("parallel", "sequential")
#: The outcome of :func:`optimize_layer`: the engine's result record (losses before/after, history, time).
LayerResult = BlockResult



@dataclass(frozen=True)
class AdaQuantConfig:
    """The resolved settings of one AdaQuant run (built and validated from the run's
    :class:`onnxq.config.AdaQuant` by :func:`onnxq.blocks.engine_settings.adaquant_settings`).

    Attributes:
        mode: "parallel" (float-model inputs, layers independent) or "sequential" (inputs from the
            model quantized so far, in topological order).
        iters: optimisation steps per layer. batch_size: mini-batch size.
        num_samples: calibration samples cached per layer (the pass uses what it has).
        holdout: > 0: the last ``holdout`` samples are never trained on and score the layer. Ignored
            when it would leave nothing to train on; then the first ``eval_samples`` score it.
        lr_weight, lr_bias, lr_weight_range, lr_input_range: Adam rates (absolute on float ranges, or
            relative to each parameter's unit when ``relative``; see the module docstring).
        relative: relative rates (True) or the paper's absolute ones (False).
        cosine: decay every rate to 0 along a cosine over ``iters`` (False: constant, as the paper).
        learn_zero_point: train the input zero-point of asymmetric activation grids.
        p: exponent of the output error (2 = MSE).
        device: torch device. seed: mini-batch generator.
        eval_samples: evaluation subset size when there is no holdout.
        log_every: record the training error every this many steps.
    """

    mode: str
    iters: int
    batch_size: int
    num_samples: int
    holdout: int
    lr_weight: float
    lr_bias: float
    lr_weight_range: float
    lr_input_range: float
    relative: bool
    cosine: bool
    learn_zero_point: bool
    p: float
    device: str
    seed: int
    eval_samples: int
    log_every: int

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown AdaQuant mode {self.mode!r}: use parallel or sequential")


def _channel_shape(ndim: int, axis: int | None, n: int) -> list[int]:
    shape = [1] * ndim
    if axis is not None and n > 1:
        shape[axis] = n
    return shape


class AdaQuantWeight(nn.Module):
    """A trainable continuous weight and step size: ``forward() = s (clamp(round(W'/s) + z) - z)``.

    Stored normalised: ``W' = u * unit_w`` and ``s = r * unit_s`` (``u``, ``r`` are the parameters; the
    units are the initial per-channel step when ``relative``, else 1). ``learn_scale=False`` freezes
    ``s`` (power-of-two grids). The zero-point is a fixed buffer.

    Args:
        weight: initial continuous weight (the float weight, or the dequantized codes to start from).
        scale, zero_point: 0-d or 1-D along ``axis``. qmin, qmax: the grid.
        relative: normalise by the initial step. learn_scale: train the step size.
    """

    def __init__(self, weight, scale, zero_point, qmin: int, qmax: int, axis: int | None = None, *,
                 relative: bool = True, learn_scale: bool = True) -> None:
        super().__init__()
        w = torch.as_tensor(np.asarray(weight, dtype=np.float32)).clone()
        s = torch.as_tensor(np.asarray(scale, dtype=np.float32)).reshape(-1).clone()
        z = torch.as_tensor(np.asarray(zero_point)).reshape(-1).to(torch.float32).clone()
        if s.numel() == 1:
            axis = None
        elif axis is None or w.shape[axis % w.dim()] != s.numel():
            raise ValueError(f"{s.numel()} scales do not fit axis {axis} of a weight {tuple(w.shape)}")
        self.axis = None if axis is None else axis % w.dim()
        shape = _channel_shape(w.dim(), self.axis, s.numel())
        s, z = s.reshape(shape), z.reshape(shape)
        unit = s.clone() if relative else torch.ones_like(s)
        self.register_buffer("unit", unit)
        self.register_buffer("zero_point", z)
        self.u = nn.Parameter(w / unit)
        self.r = nn.Parameter(s / unit, requires_grad=learn_scale)
        self.qmin, self.qmax = int(qmin), int(qmax)
        self.learn_scale = learn_scale

    def weight(self) -> torch.Tensor:
        return self.u * self.unit

    def scale(self) -> torch.Tensor:
        """Current step size (broadcast shape), clamped to ``MIN_SCALE``."""
        return (self.r * self.unit).clamp_min(MIN_SCALE)

    def forward(self) -> torch.Tensor:
        s = self.scale()
        flat = s.reshape(-1)
        z = self.zero_point.reshape(-1)
        if flat.numel() == 1:
            flat, z = flat.reshape(()), z.reshape(())
        return fake_quant(self.weight(), flat, z, self.qmin, self.qmax, self.axis)

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """Integer codes ``clamp(round(W'/s) + z, qmin, qmax)`` (int64, the weight's shape)."""
        v = self.weight() / self.scale()
        return (torch.round(torch.clamp(v, self.qmin - self.zero_point, self.qmax - self.zero_point))
                + self.zero_point).to(torch.int64)

    def export_scale(self) -> np.ndarray:
        """The step size as stored in the graph: 0-d, or 1-D per channel (float32)."""
        s = self.scale().detach().cpu().reshape(-1).numpy().astype(np.float32)
        return s.reshape(()) if s.size == 1 and self.axis is None else s


class _ActQuantFn(torch.autograd.Function):
    """ONNX Q -> DQ of ``x`` with an integer-valued zero-point ``z`` and gradients for x, s and z (LSQ+).

    Forward: ``v = x / s``, ``t = clamp(v, qmin - z, qmax - z)``, ``out = round(t) * s`` (= ONNX). Saved:
    the in-range mask and ``local = round(t) - v * inside`` (d out / d s), as in :func:`fake_quant`.
    Backward: ``dx = g * inside``, ``ds = sum(g * local)``, ``dz = -s * sum(g * (1 - inside))``.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):  # type: ignore[override]
        v = x / scale
        t = torch.clamp(v, qmin - zero_point, qmax - zero_point)
        c = torch.round(t)
        out = c * scale
        inside = t.eq_(v).to(x.dtype)
        local = c.sub_(v.mul_(inside)) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(inside, local, scale)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        inside, local, scale = ctx.saved_tensors
        grad_x = grad * inside
        grad_s = None
        if local is not None:
            grad_s = torch.dot(grad.reshape(-1), local.reshape(-1)).reshape(scale.shape)
        grad_z = None
        if ctx.needs_input_grad[2]:
            grad_z = (-(grad.sum() - grad_x.sum()) * scale).reshape(scale.shape)
        return grad_x, grad_s, grad_z, None, None


class AdaQuantAct(nn.Module):
    """Trainable input quantizer (ONNX Q -> [Clip] -> DQ): step ``s = r * unit`` and zero-point ``z``.

    ``z`` is continuous, clamped to the grid and rounded (straight-through) in the forward pass; its
    gradient is ``-s`` on clipped elements (see the module docstring). ``learn_scale`` /
    ``learn_zero_point`` = False keep them fixed (shared or power-of-two scales, symmetric grids).
    """

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int, *, relative: bool = True,
                 learn_scale: bool = True, learn_zero_point: bool = True) -> None:
        super().__init__()
        s = torch.as_tensor(float(np.asarray(scale).reshape(-1)[0]), dtype=torch.float32)
        unit = s.clone() if relative else torch.ones(())
        self.register_buffer("unit", unit)
        self.r = nn.Parameter(s / unit, requires_grad=learn_scale)
        self.z = nn.Parameter(torch.tensor(float(np.asarray(zero_point).reshape(-1)[0])),
                              requires_grad=learn_zero_point)
        self.qmin, self.qmax = int(qmin), int(qmax)
        self.learn_scale, self.learn_zero_point = learn_scale, learn_zero_point

    def scale(self) -> torch.Tensor:
        return (self.r * self.unit).clamp_min(MIN_SCALE)

    def zero_point(self) -> torch.Tensor:
        """The rounded zero-point (straight-through gradient to ``z``)."""
        return round_ste(self.z.clamp(self.qmin, self.qmax))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, z = self.scale().to(x.dtype), self.zero_point().to(x.dtype)
        return _ActQuantFn.apply(x, s, z, self.qmin, self.qmax)

    def export(self) -> tuple[np.ndarray, int]:
        """(scale as float32 0-d array, integer zero-point)."""
        return (self.scale().detach().cpu().numpy().astype(np.float32).reshape(()),
                int(self.zero_point().detach().cpu()))


class AdaQuantBias(nn.Module):
    """Trainable float bias seen through its INT32 quantization: ``s_b round(b / s_b)``, ``s_b = s_x s_w``.

    ``b = u * unit`` (``unit`` per channel). The step ``s_b`` follows the linked weight and input
    quantizers (detached: the bias rounding does not train them). ``input_scale`` is an
    :class:`AdaQuantAct` or a fixed float.
    """

    def __init__(self, bias, weight: AdaQuantWeight, input_scale: AdaQuantAct | float,
                 unit: np.ndarray | float = 1.0) -> None:
        super().__init__()
        b = torch.as_tensor(np.asarray(bias, dtype=np.float32)).clone()
        u = torch.as_tensor(np.broadcast_to(np.asarray(unit, dtype=np.float32), b.shape).copy())
        u = torch.where(u > 0, u, torch.ones_like(u))
        self.register_buffer("unit", u)
        self.u = nn.Parameter(b / u)
        self._links = (weight, input_scale)  # a tuple: not registered as submodules

    def bias(self) -> torch.Tensor:
        return self.u * self.unit

    def step(self) -> torch.Tensor:
        weight, act = self._links
        s_in = act.scale() if isinstance(act, AdaQuantAct) else torch.tensor(float(act))
        s_w = weight.scale().reshape(-1)
        s_b = (s_in.to(s_w.device) * s_w).detach()
        return s_b if s_b.numel() > 1 else s_b.reshape(())

    def forward(self) -> torch.Tensor:
        s_b = self.step()
        b = self.bias()
        return round_ste(b / s_b).clamp(-INT32_MAX, INT32_MAX) * s_b


def _groups(weights, biases, acts, cfg: AdaQuantConfig) -> list[dict]:
    """Adam parameter groups with each parameter's learning rate (see the module docstring)."""
    groups: list[dict] = []
    for w in weights:
        span = 1.0 if cfg.relative else float(w.qmax - w.qmin)
        groups.append({"params": [w.u], "lr": cfg.lr_weight})
        if w.learn_scale:
            groups.append({"params": [w.r], "lr": cfg.lr_weight_range / span})
    for b in biases:
        groups.append({"params": [b.u], "lr": cfg.lr_bias})
    for a in acts:
        span = 1.0 if cfg.relative else float(a.qmax - a.qmin)
        if a.learn_scale:
            groups.append({"params": [a.r], "lr": cfg.lr_input_range / span})
        if a.learn_zero_point:
            unit = 1.0 if cfg.relative else float(a.scale().detach())
            groups.append({"params": [a.z], "lr": cfg.lr_input_range / unit})
    return [g for g in groups if g["lr"] > 0]


def _outputs(module: nn.Module, xs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    out = module(*xs)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def optimize_layer(module: nn.Module, weights: Mapping[str, AdaQuantWeight],
                   biases: Mapping[str, AdaQuantBias], acts: Mapping[str, AdaQuantAct],
                   inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], config: AdaQuantConfig, *,
                   desc: str = "adaquant", progress: bool | None = None) -> LayerResult:
    """Optimise one layer's weights, bias and quantizer ranges in place (see the module docstring).

    Args:
        module: ``module(*inputs)`` -> tensor or tuple, built on the quantizers below.
        weights, biases, acts: the layer's quantizers (their parameters are the only ones trained).
        inputs: layer inputs, ``(N, ...)`` each: float-model ones (parallel) or quantized-so-far (sequential).
        targets: float-model layer outputs.
        config: the schedule.
        desc: label of the progress bar. progress: show it (True), hide it (False), terminal only (None).

    Returns:
        LayerResult: evaluation loss at the starting point (round-to-nearest) and after training. The
        trained state stays in the modules whatever the outcome; the caller keeps the better one.
    """
    t0 = time.perf_counter()
    device = require_device(config.device)
    xs = [cache_layout(torch.as_tensor(t).to(device)) for t in inputs]
    ys = [cache_layout(torch.as_tensor(t).to(device)) for t in targets]
    n = int(xs[0].shape[0])
    if any(int(t.shape[0]) != n for t in (*xs, *ys)):
        raise ValueError("inputs and targets must have the same number of samples")
    n_train = n - config.holdout if 0 < config.holdout < n else n
    lo, hi = (n_train, n) if n_train < n else (0, min(config.eval_samples, n))
    wq, bq, aq = list(weights.values()), list(biases.values()), list(acts.values())
    home = next((b.device for b in module.buffers()), torch.device("cpu"))
    module.to(device)
    for m in (*wq, *bq, *aq):
        m.to(device)
    params = [p for m in (*wq, *bq, *aq) for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    frozen = [(p, p.requires_grad) for p in module.parameters()]

    @torch.no_grad()
    def evaluate() -> float:
        module.eval()
        total = 0.0
        for start in range(lo, hi, config.batch_size):
            idx = torch.arange(start, min(start + config.batch_size, hi), device=device)
            preds = _outputs(module, take_batch(xs, idx))
            targets_b = take_batch(ys, idx)
            errors = (float(output_error(p, t, config.p)) for p, t in zip(preds, targets_b, strict=True))
            total += sum(errors) * len(idx)
        return total / (hi - lo)

    history: list[float] = []
    bar = tqdm(total=config.iters, desc=desc, disable=None if progress is None else not progress, leave=False,
               unit="it", dynamic_ncols=True)
    try:
        loss_rtn = evaluate()
        for p in module.parameters():
            p.requires_grad_(False)
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        groups = _groups(wq, bq, aq, config)
        opt = torch.optim.Adam(groups) if groups else None
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.iters, eta_min=0.0)
                 if opt is not None and config.cosine else None)
        gen = torch.Generator().manual_seed(config.seed)
        bs = min(config.batch_size, n_train)
        module.train()
        for it in range(config.iters if opt else 0):
            idx = torch.randperm(n_train, generator=gen)[:bs].to(device)
            preds = _outputs(module, take_batch(xs, idx))
            targets_b = take_batch(ys, idx)
            loss = sum((output_error(p, t, config.p) for p, t in zip(preds, targets_b, strict=True)),
                       start=torch.zeros((), device=device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if it % config.log_every == 0 or it == config.iters - 1:
                history.append(float(loss.detach()))
                bar.set_postfix(rec=f"{history[-1]:.4g}", refresh=False)
            bar.update(1)
        loss_final = evaluate()
    finally:
        bar.close()
        for p, flag in frozen:
            p.requires_grad_(flag)
        module.to(home)
        for m in (*wq, *bq, *aq):
            m.to(home)
    seconds = time.perf_counter() - t0
    log.debug("%s: loss %.6g -> %.6g in %.1f s", desc, loss_rtn, loss_final, seconds)
    return LayerResult(loss_rtn, loss_final, history, seconds, config.iters if groups else 0)
