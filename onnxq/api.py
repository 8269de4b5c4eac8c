"""Public entry point: ``quantize(model, calib, config) -> QuantResult``.

``config`` is an :class:`onnxq.Config` (or a deprecated :class:`onnxq.QuantConfig`). The run is the
pipeline of :mod:`onnxq.pipeline` (:func:`onnxq.pipeline.run.run_quantize`); with
``config.mixed_precision.enabled`` it first measures each layer's sensitivity and picks the widths by
integer programming (:func:`onnxq.mixed.plan.quantize_mixed`), whose plan is then in
``result.report["mixed_precision"]``. With ``config.accuracy.max_drop`` it keeps the fewest ops float that
bring the model within that drop of the float one (:func:`onnxq.fallback.run.quantize_to_target`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from onnxq.config import Config, QuantConfig, as_config
from onnxq.data.loaders import ImageRecipe
from onnxq.errors import UserError
from onnxq.pipeline.result import QuantResult
from onnxq.pipeline.run import CalibSource, run_quantize

__all__ = ["QuantResult", "quantize"]


def quantize(model: str | Path | onnx.ModelProto, calib: CalibSource, config: Config | QuantConfig | None = None, *,
             validation: CalibSource | None = None, recipe: ImageRecipe | None = None,
             batch_size: int = 1, metric: Callable[[np.ndarray], float] | None = None) -> QuantResult:
    """Quantize ``model`` to QDQ with calibration data ``calib``.

    Args:
        model: path to an .onnx file or a ModelProto (never modified).
        calib: CalibrationSet, iterable of feed dicts, or a path (.npz, .npy, folder of images).
        config: the run's :class:`onnxq.Config` (defaults: W8A8 per-channel for onnxruntime CPU).
        validation: held-out feeds for the fidelity check; None sets aside part of ``calib``
            (``config.validation``: an eighth, at most 32 samples, at least one batch).
        recipe: preprocessing for a folder of images.
        batch_size: samples per calibration batch for file sources.
        metric: with ``config.accuracy.metric = "metric"``, the score the accuracy target bounds:
            ``metric(first output of the search samples, stacked) -> float``, higher is better. The search
            samples are the first ``config.accuracy.samples`` calibration samples in order (so the callable
            may hold their labels); the held-out samples are not scored with it.

    Returns:
        QuantResult with the QDQ model and its report.
    """
    config = as_config(config)
    if config.accuracy.max_drop is not None:
        if config.mixed_precision.enabled:
            raise UserError("--max-drop and --mixed-precision cannot be combined yet: choose the widths first "
                            "(write OUTPUT.bitplan.json), then quantize with --bit-plan and --max-drop")
        from onnxq.fallback.run import quantize_to_target

        return quantize_to_target(model, calib, config, metric=metric, validation=validation, recipe=recipe,
                                  batch_size=batch_size)
    if metric is not None and config.accuracy.metric == "metric":
        raise UserError("a metric callable needs an accuracy target: set config.accuracy.max_drop")
    if config.mixed_precision.enabled:
        from onnxq.mixed.plan import quantize_mixed

        mixed = quantize_mixed(model, calib, config, validation=validation, recipe=recipe, batch_size=batch_size)
        return mixed.result
    return run_quantize(model, calib, config, validation=validation, recipe=recipe, batch_size=batch_size)
