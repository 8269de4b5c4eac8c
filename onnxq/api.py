"""Public entry point: ``quantize(model, calib, config) -> QuantResult``.

``config`` is an :class:`onnxq.Config` (or a deprecated :class:`onnxq.QuantConfig`). The run is the
pipeline of :mod:`onnxq.pipeline` (:func:`onnxq.pipeline.run.run_quantize`); with
``config.mixed_precision.enabled`` it first measures each layer's sensitivity and picks the widths by
integer programming (:func:`onnxq.mixed.plan.quantize_mixed`), whose plan is then in
``result.report["mixed_precision"]``.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from onnxq.config import Config, QuantConfig, as_config
from onnxq.data.loaders import ImageRecipe
from onnxq.pipeline.result import QuantResult
from onnxq.pipeline.run import CalibSource, run_quantize

__all__ = ["QuantResult", "quantize"]


def quantize(model: str | Path | onnx.ModelProto, calib: CalibSource, config: Config | QuantConfig | None = None, *,
             validation: CalibSource | None = None, recipe: ImageRecipe | None = None,
             batch_size: int = 1) -> QuantResult:
    """Quantize ``model`` to QDQ with calibration data ``calib``.

    Args:
        model: path to an .onnx file or a ModelProto (never modified).
        calib: CalibrationSet, iterable of feed dicts, or a path (.npz, .npy, folder of images).
        config: the run's :class:`onnxq.Config` (defaults: W8A8 per-channel for onnxruntime CPU).
        validation: held-out feeds for the fidelity check; None sets aside part of ``calib``
            (``config.validation``: an eighth, at most 32 samples, at least one batch).
        recipe: preprocessing for a folder of images.
        batch_size: samples per calibration batch for file sources.

    Returns:
        QuantResult with the QDQ model and its report.
    """
    config = as_config(config)
    if config.mixed_precision.enabled:
        from onnxq.mixed.plan import quantize_mixed

        mixed = quantize_mixed(model, calib, config, validation=validation, recipe=recipe, batch_size=batch_size)
        return mixed.result
    return run_quantize(model, calib, config, validation=validation, recipe=recipe, batch_size=batch_size)
