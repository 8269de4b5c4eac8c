"""From the run's rounding method (:mod:`onnxq.config.rounding`) to the torch engine's resolved records.

The engine (:mod:`onnxq.recon`) knows nothing of schedules, presets or "auto" values: it receives a
:class:`~onnxq.recon.ReconConfig` or :class:`~onnxq.recon.adaquant.AdaQuantConfig` whose every value is
final. This module is where the configuration meets the engine, once per run.
"""

from __future__ import annotations

from onnxq.config.choices import AUTO
from onnxq.config.rounding import BRECQ, AdaQuant, LearnedRounding, QDrop, RoundToNearest
from onnxq.recon import ReconConfig
from onnxq.recon.adaquant import AdaQuantConfig


def recon_settings(rounding: LearnedRounding | RoundToNearest, *, activation_bits: int = 8, seed: int = 0,
                   device: str = "cpu", holdout: int = 0) -> ReconConfig:
    """The engine record of a block-reconstruction method ("auto" values resolved for ``activation_bits``).

    A :class:`RoundToNearest` gives the engine's evaluation-only record (no training).
    """
    if isinstance(rounding, RoundToNearest):
        return ReconConfig(method="rtn", iters=0, batch_size=1, num_samples=1, round_lr=1.0, act_lr=1.0,
                           act_lr_relative=False, round_weight=0.0, beta=(20.0, 2.0), warmup=0.0, p=2.0,
                           act_iters=0, act_p=2.4, fisher=False, drop_prob=0.0, device=device, seed=seed,
                           eval_samples=256, log_every=100, augment=0, augment_optional=False,
                           weight_inputs="quantized", order="interleaved", holdout=holdout)
    r = rounding.resolved(activation_bits)
    assert r.weight_inputs != AUTO
    brecq = isinstance(r, BRECQ)
    return ReconConfig(
        method=r.method, iters=r.iters, batch_size=r.batch_size, num_samples=r.samples, round_lr=r.round_lr,
        act_lr=r.act_lr, act_lr_relative=r.act_lr_relative, round_weight=r.round_weight, beta=r.beta,
        warmup=r.warmup, p=r.p, act_iters=r.act_iters if brecq else 0, act_p=r.act_p, fisher=r.fisher,
        drop_prob=r.drop_prob if isinstance(r, QDrop) else 0.0, device=device, seed=seed,
        eval_samples=r.eval_samples, log_every=r.log_every, augment=r.augment, augment_optional=r.augment_optional,
        weight_inputs=r.weight_inputs, order=r.order if brecq else "interleaved", holdout=holdout)


def adaquant_settings(adaquant: AdaQuant, *, seed: int = 0, device: str = "cpu") -> AdaQuantConfig:
    """The engine record of an AdaQuant method."""
    a = adaquant
    return AdaQuantConfig(mode=a.mode, iters=a.iters, batch_size=a.batch_size, num_samples=a.samples,
                          holdout=a.holdout, lr_weight=a.lr_weight, lr_bias=a.lr_bias,
                          lr_weight_range=a.lr_weight_range, lr_input_range=a.lr_input_range, relative=a.relative,
                          cosine=a.cosine, learn_zero_point=a.learn_zero_point, p=a.p, device=device, seed=seed,
                          eval_samples=a.eval_samples, log_every=a.log_every)


__all__ = ["adaquant_settings", "recon_settings"]
