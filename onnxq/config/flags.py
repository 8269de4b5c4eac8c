"""The command line's configuration flags as data: each flag names the configuration field it sets.

Every flag maps to one or more paths of :class:`onnxq.config.Config` (``rounding.iters``,
``weights.bits``); the CLI builds its parser from this table and turns the flags a user gave into
one layer of settings (:func:`flag_layer`) over the preset and the ``--config`` file. A test walks
the table against the dataclasses (:func:`config_paths`), so a flag cannot point at a field that
does not exist, and every choice list comes from :mod:`onnxq.config.choices`.

Flags marked ``common`` are shown by ``onnxq quantize --help``; the others are shown by
``--help-all``, and every field, flag or not, can be set with ``--set SECTION.FIELD=VALUE`` or in a
``--config`` file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from onnxq.config import choices as C
from onnxq.config.rounding import ROUNDING_TYPES, MRECGMerge
from onnxq.config.run import NONE, SECTIONS, Config

#: --weights NAME -> the weights fields it sets.
WEIGHT_KINDS: dict[str, dict[str, Any]] = {
    "int8": {"weights.bits": 8},
    "int4": {"weights.bits": 4},
    "int2": {"weights.bits": 2, "weights.int2_grid": "uniform", "weights.symmetric": False},
    "ternary": {"weights.bits": 2, "weights.int2_grid": "ternary"},
}
TARGET_NAMES = ("ort-cpu", "tensorrt", "openvino", "qnn", "qnn-a16", "npu-pow2")


@dataclass(frozen=True)
class Flag:
    """One flag: its name, the config path it sets, how its value is read and shown.

    ``to_settings(value)`` returns ``{path: value}`` (the default: ``{path: value}``); ``switch`` flags
    take no value and set ``path`` to ``switch_value``.
    """

    name: str
    path: str
    help: str
    type: Callable[[str], Any] | None = str
    choices: tuple | None = None
    switch: bool = False
    switch_value: Any = True
    common: bool = False
    metavar: str | None = None
    to_settings: Callable[[Any], dict[str, Any]] | None = None

    def settings(self, value: Any) -> dict[str, Any]:
        if self.switch:
            value = self.switch_value
        return self.to_settings(value) if self.to_settings else {self.path: value}


def _dashes(value: str) -> str:
    return value.replace("-", "_")


def _first_last(value: str) -> dict[str, Any]:
    return {"weights.first_last_bits": 8 if value == "8" else NONE}


def _augment(value: int) -> dict[str, Any]:
    return {"rounding.augment": value, "rounding.augment_optional": False}


def _widths(text: str) -> dict[str, Any]:
    from onnxq.errors import UserError

    try:
        return {"mixed_precision.widths": [int(w) for w in text.split(",") if w.strip()]}
    except ValueError:
        raise UserError(f"--mp-widths {text!r} is not a comma-separated list of widths: e.g. 8,4,2") from None


def _float_plan(path: str) -> dict[str, Any]:
    from onnxq.config.files import load_float_plan

    return {"exclude": list(load_float_plan(path))}


def _bit_plan(path: str) -> dict[str, Any]:
    from onnxq.config.files import load_bit_plan

    return {"weights.bit_plan": dict(load_bit_plan(path))}


_R = "reconstruction, --method adaround|brecq|qdrop|mrecg|adaquant"
FLAGS: tuple[Flag, ...] = (
    Flag("--target", "target", "target profile: " + ", ".join(TARGET_NAMES), choices=TARGET_NAMES, common=True),
    Flag("--weights", "weights.bits", "weight grid: int8, int4, int2 (4-level [-2, 1] with per-channel zero-points, "
         "ort-cpu) or ternary ({-1, 0, 1} x per-channel scale)", choices=tuple(WEIGHT_KINDS), common=True,
         to_settings=lambda v: dict(WEIGHT_KINDS[v])),
    Flag("--activations", "activations.dtype", "activation type: uint8 asymmetric or int8 symmetric",
         choices=C.ACTIVATION_DTYPES, common=True),
    Flag("--activation-bits", "activations.bits", "activation width (4: stored as Q -> Clip -> DQ in 8-bit containers)",
         type=int, choices=C.ACTIVATION_BITS, common=True),
    Flag("--add-inputs", "activations.add_inputs", "Q/DQ on all Add inputs, or residual: a Conv's output feeding "
         "an Add is not rounded before it (the runtime adds in the Conv's epilogue)", choices=C.ADD_INPUT_MODES),
    Flag("--scale", "scale", "scale kind: float, or pow2 (every scale an exact power of two)",
         choices=C.SCALE_KINDS, common=True),
    Flag("--method", "rounding.method", "weight rounding: rtn, gptq (per layer, no training), adaround (layer-wise), "
         "brecq (block-wise), qdrop, "
         "adaquant (weights, bias and ranges per layer), mrecg (brecq/qdrop on merged neighbour blocks)",
         choices=(*C.ROUNDING_METHODS, "mrecg"), common=True),
    Flag("--schedule", "rounding.schedule", "fast: sized for a 2-core CPU; long: 1000 iterations on each image "
         "and 3 views of it; paper: the papers' 20k iterations (for a GPU)", choices=C.SCHEDULES, common=True),
    Flag("--seed", "seed", "seed of everything random", type=int),
    # ---- weights
    Flag("--ternary-method", "weights.ternary_method", "ternary operator of --weights ternary",
         choices=(*C.TERNARY_METHODS, *C.TERNARY_ALIASES)),
    Flag("--ternary-storage", "weights.storage", "container of 2-bit codes", choices=C.TWO_BIT_STORAGES),
    Flag("--per-tensor", "weights.per_channel", "one weight scale per tensor", switch=True, switch_value=False),
    Flag("--first-last", "weights.first_last_bits", "bits of the first and last weighted layers when --weights is "
         "below 8 bits: 8, or the same as the others", choices=("8", "same"), to_settings=_first_last),
    Flag("--weight-method", "weights.range_method", "weight range method", choices=C.WEIGHT_RANGE_METHODS),
    Flag("--weight-asymmetric", "weights.symmetric", "per-channel asymmetric weights with zero-points (ort-cpu)",
         switch=True, switch_value=False),
    Flag("--bit-plan", "weights.bit_plan", 'per-layer widths, JSON {"layers": {"node name": 8|4|2}} (e.g. a '
         "written OUTPUT.bitplan.json)", metavar="FILE", to_settings=_bit_plan),
    # ---- calibration and float phase
    Flag("--calib-method", "calibration.method", "activation range method", choices=C.CALIB_METHODS),
    Flag("--percentile", "calibration.percentile", "for --calib-method percentile", type=float),
    Flag("--calib-samples", "calibration.samples", "use at most this many calibration samples", type=int),
    Flag("--equalize", "float_phase.equalize", "cross-layer equalization of Conv/Gemm pairs", switch=True),
    Flag("--relu6", "float_phase.relu6", "equalization across ReLU6: skip the pair, or replace ReLU6 by Relu",
         choices=C.RELU6_MODES),
    Flag("--bias-absorb", "float_phase.bias_absorb", "high-bias absorption across Relu",
         choices=C.BIAS_ABSORB_SOURCES),
    Flag("--dynamic", "activations.dynamic", "weight MatMuls quantize their input at run time (onnxruntime CPU)",
         switch=True),
    Flag("--smooth", "float_phase.smooth", "SmoothQuant: move activation outliers into the next MatMul weights",
         switch=True),
    Flag("--smooth-alpha", "float_phase.smooth_alpha", "SmoothQuant strength in [0, 1] (default: searched)",
         type=float),
    # ---- tuning
    Flag("--bias-correction", "tuning.bias_correction", "correct the output shift that weight rounding causes",
         choices=C.BIAS_CORRECTION_SOURCES),
    Flag("--bias-tuning", "tuning.bias_tuning", "tune each layer's bias to the float output mean", switch=True),
    Flag("--stats-tuning", "tuning.stats_tuning", "restore each layer's per-channel output mean and std",
         switch=True),
    # ---- rounding
    Flag("--iters", "rounding.iters", f"iterations per block ({_R})", type=int),
    Flag("--recon-batch-size", "rounding.batch_size", "reconstruction mini-batch size", type=int),
    Flag("--recon-samples", "rounding.samples", "calibration samples cached per block", type=int),
    Flag("--fisher", "rounding.fisher", "weight the block error by the diagonal Fisher", switch=True),
    Flag("--round-weight", "rounding.round_weight", "AdaRound regulariser weight lambda", type=float,
         metavar="LAMBDA"),
    Flag("--round-lr", "rounding.round_lr", "Adam rate of the rounding variables", type=float, metavar="LR"),
    Flag("--act-iters", "rounding.act_iters", "brecq: activation step-size iterations per block", type=int,
         metavar="N"),
    Flag("--augment", "rounding.augment", "fit on K augmented views of every calibration image too", type=int,
         metavar="K", to_settings=_augment),
    Flag("--drop-prob", "rounding.drop_prob", "qdrop: probability of keeping an activation element float",
         type=float),
    Flag("--weight-phase-inputs", "rounding.weight_inputs", "block inputs of the adaround/brecq rounding phase",
         choices=("quantized", "weights-only"), to_settings=lambda v: {"rounding.weight_inputs": _dashes(v)}),
    Flag("--recon-order", "rounding.order", "brecq: all rounding first (two-pass) or each block's steps "
         "right after its rounding (interleaved)", choices=("interleaved", "two-pass"),
         to_settings=lambda v: {"rounding.order": _dashes(v)}),
    Flag("--learn-weight-scale", "rounding.learn_weight_scale", "also learn the per-channel weight scales",
         switch=True),
    Flag("--max-chain", "rounding.max_chain", "longest chain of plain layers in one block", type=int),
    Flag("--adaquant-mode", "rounding.mode", "adaquant: sequential or parallel inputs", choices=C.ADAQUANT_MODES),
    Flag("--mrecg-base", "rounding.method", "mrecg: the base reconstruction (default brecq)",
         choices=("brecq", "qdrop")),
    Flag("--mrecg-k", "rounding.mrecg.k", "mrecg: merge the K adjacent block pairs with the largest gaps", type=int),
    Flag("--mrecg-capacity", "rounding.mrecg.capacity", "mrecg: data (a first pass's losses) or proxy",
         choices=C.MRECG_CAPACITIES),
    Flag("--mrecg-iters", "rounding.mrecg.iters", "mrecg: iterations per unit or per merged block",
         choices=C.MRECG_ITERS),
    # ---- engine
    Flag("--device", "engine.device", "torch device: cpu or cuda[:k]"),
    Flag("--checkpoint-dir", "engine.checkpoint_dir", "where finished blocks are saved to resume (default: "
         "OUTPUT.ckpt)", metavar="DIR"),
    Flag("--keep-checkpoint", "engine.keep_checkpoint", "keep the checkpoint after a finished run", switch=True),
    # ---- mixed precision
    Flag("--mixed-precision", "mixed_precision.enabled", "pick per-layer widths by integer programming under a "
         "budget; writes OUTPUT.bitplan.json", switch=True),
    Flag("--size-budget", "mixed_precision.size_budget", "weight size at most R times the all-8-bit weights",
         type=float, metavar="R"),
    Flag("--bops-budget", "mixed_precision.bops_budget", "bit operations at most R times 8-bit's", type=float,
         metavar="R"),
    Flag("--max-degradation", "mixed_precision.max_degradation", "the smallest model within this summed "
         "sensitivity increase", type=float, metavar="D"),
    Flag("--mp-widths", "mixed_precision.widths", "candidate widths, e.g. 8,4,2", to_settings=_widths),
    Flag("--mp-measure", "mixed_precision.measure", "sensitivity measure", choices=C.MP_MEASURES),
    Flag("--mp-reconstruct", "mixed_precision.reconstruct", "the table's weights: rtn or parallel adaquant",
         choices=C.MP_RECONSTRUCT),
    Flag("--mp-holdout", "mixed_precision.holdout", "calibration samples held out for the sensitivity", type=int,
         metavar="N"),
    # ---- accuracy target
    Flag("--max-drop", "accuracy.max_drop", "keep the most sensitive ops float until the model is within this many "
         "points of the float one (--drop-metric); writes OUTPUT.floatplan.json", type=float, metavar="POINTS",
         common=True),
    Flag("--drop-metric", "accuracy.metric", "what --max-drop measures: top-1 agreement, cosine, or auto (agreement "
         "for a classifier)", choices=tuple(m for m in C.DROP_METRICS if m != "metric")),
    Flag("--max-drop-ops", "accuracy.ops", "which ops --max-drop may keep float: all, or activations (every "
         "weighted op stays integer)", choices=C.FALLBACK_OPS),
    Flag("--float-plan", "exclude", 'keep these ops float: a JSON plan {"keep_float": [{"node": name}, ...]} (e.g. a '
         "written OUTPUT.floatplan.json)", metavar="FILE", to_settings=_float_plan),
)


def flag_layer(given: dict[str, Any]) -> dict[str, Any]:
    """The settings layer of the flags a user gave (``{flag name: parsed value}``), nested.

    ``--method mrecg`` is the ``--mrecg-base`` method (brecq by default) with an MRECG merge table.
    """
    from onnxq.errors import UserError

    given = dict(given)
    base = given.pop("--mrecg-base", None)
    if given.get("--method") == "mrecg":
        given["--method"] = base or "brecq"
        given.setdefault("--mrecg-k", None)  # the merge table, with its defaults unless given
    elif base is not None:
        raise UserError("--mrecg-base applies to --method mrecg: add it, or drop --mrecg-base")
    by_name = {f.name: f for f in FLAGS}
    layer: dict[str, Any] = {}
    if given.get("--mp-reconstruct") == "adaquant" and given.get("--method", "rtn") in C.UNTRAINED_ROUNDING:
        # 0.1's spelling: without a learned method, --iters / --recon-samples size the table's AdaQuant
        for flag, path in (("--iters", "mixed_precision.table_iters"),
                           ("--recon-samples", "mixed_precision.table_samples")):
            if flag in given:
                _deep_set(layer, path.split("."), given.pop(flag))
    for name, value in given.items():
        settings = {"rounding.mrecg": {}} if value is None else by_name[name].settings(value)
        for path, v in settings.items():
            _deep_set(layer, path.split("."), v)
    return layer


def _deep_set(layer: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        layer = layer.setdefault(key, {})
    if isinstance(value, dict):
        layer.setdefault(path[-1], {}).update(value)
    else:
        layer[path[-1]] = value


def config_paths() -> set[str]:
    """Every settable path of :class:`Config` ("weights.bits", "rounding.iters", "rounding.mrecg.k", ...)."""
    paths: set[str] = set()
    for f in dataclasses.fields(Config):
        if f.name == "rounding":
            paths.add("rounding.method")
            for kind in ROUNDING_TYPES.values():
                if dataclasses.is_dataclass(kind):
                    paths.update(f"rounding.{g.name}" for g in dataclasses.fields(kind) if g.name != "mrecg")
            paths.update(f"rounding.mrecg.{g.name}" for g in dataclasses.fields(MRECGMerge))
        elif f.name in SECTIONS:
            paths.update(f"{f.name}.{g.name}" for g in dataclasses.fields(SECTIONS[f.name]))
        else:
            paths.add(f.name)
    return paths


__all__ = ["FLAGS", "WEIGHT_KINDS", "Flag", "config_paths", "flag_layer"]
