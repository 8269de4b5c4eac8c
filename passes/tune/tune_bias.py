"""TuneBiasPass: bias tuning, the MSE-optimal bias of each quantized layer, layer by layer.

For a quantized layer with output ``z_q = W_hat x_q + b`` (``x_q`` its input in the model quantized
so far, earlier layers already tuned) and the float output ``z_f`` on the same calibration sample,
the per-channel bias that minimises the output MSE with the weights fixed is

    b' = argmin_b' E || z_f - (z_q - b + b') ||^2  =  b + E[z_f - z_q]          (per channel)

(the loss is a convex quadratic in ``b'``; its gradient ``2 E[z_q - b + b' - z_f]`` vanishes there),
so a few Adam steps on this objective would converge to the same point: the closed form is used
and no torch optimisation is run. The new bias is requantized to INT32 on the unchanged grid
``s_b = float32(s_in * s_w)``, codes ``round(b' / s_b)``.

What distinguishes it from **bias correction** (:mod:`onnxq.passes.quant.correct_bias`, DFQ): bias
correction removes ``eps . E[x]``, the shift that weight rounding ``eps = W_hat - W`` causes for the
*float* input's mean; bias tuning measures the whole output error of the quantized network so far
(weight rounding, activation quantization and clipping of this and every earlier layer, with the
earlier layers' tuning applied) and removes its mean, sequentially. On a model whose only error is
weight rounding with float inputs the two coincide. What distinguishes it from **statistics
tuning** (:mod:`onnxq.passes.tune.tune_stats`): the weight scales are left alone (only the mean is
restored). CalibTIP's bias tuning instead trains all biases jointly against the float logits
(KL); that global variant is not implemented. The last weighted layer is not tuned (as CalibTIP's
bias tuning excludes the final layer). Implementation: :class:`TuneStatsPass` with ``alpha = 1``.
"""

from __future__ import annotations

from onnxq.passes.tune.tune_stats import MAX_SAMPLES, TuneStatsPass


class TuneBiasPass(TuneStatsPass):
    """Sequential closed-form bias tuning (see the module docstring); report key "bias_tuning"."""

    report_key = "bias_tuning"

    def __init__(self, *, max_samples: int = MAX_SAMPLES) -> None:
        super().__init__(match_std=False, max_samples=max_samples)
