"""Pure-torch reconstruction core: fake quantization, AdaRound, the BRECQ/QDrop objective and engine.

Imports only torch, numpy, tqdm and ``onnxq.errors``, so everything here runs on plain ``nn.Module``s;
``onnxq.torchify`` turns ONNX blocks into such modules.
"""

from __future__ import annotations

from onnxq.recon.adaround import AdaRoundWeight, RoundToNearestWeight, rectified_sigmoid
from onnxq.recon.drop_mask import bernoulli_mask
from onnxq.recon.engine import METHODS, BlockResult, ReconConfig, reconstruct_block
from onnxq.recon.fake_quant import MIN_SCALE, FakeQuant, fake_quant, lsq_grad_scale, round_ste
from onnxq.recon.loss import BetaSchedule, LossTerms, ReconLoss, output_error

__all__ = [
    "METHODS",
    "MIN_SCALE",
    "AdaRoundWeight",
    "BetaSchedule",
    "BlockResult",
    "FakeQuant",
    "LossTerms",
    "ReconConfig",
    "ReconLoss",
    "RoundToNearestWeight",
    "bernoulli_mask",
    "fake_quant",
    "lsq_grad_scale",
    "output_error",
    "reconstruct_block",
    "rectified_sigmoid",
    "round_ste",
]
