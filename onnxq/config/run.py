"""The configuration of one run: :class:`Config`, nested frozen sections, a dict/TOML form.

``Config()`` is W8A8 for onnxruntime on CPU with GPTQ-rounded weights that no CPU kernel saturates. Sections:
``weights``, ``activations``, ``calibration``, ``float_phase``, ``rounding`` (one type per method,
:mod:`onnxq.config.rounding`), ``tuning``, ``engine``, ``mixed_precision``, ``validation``, ``accuracy``
(:mod:`onnxq.config.sections`). A few values are ``None``/"auto" until the run resolves them once
against the target and the other settings (:func:`onnxq.targets.resolve_config`); the report
records both what was asked and what was resolved.

The dict form (:meth:`Config.to_dict` / :meth:`Config.from_dict`) is what a ``--config run.toml``
file holds: one table per section, the rounding table named by its ``method`` and ``schedule``
with any field overridden. In TOML a ``None`` value is written ``"none"``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from onnxq.config.choices import KERNELS, SCALE_KINDS, check_choice, check_count
from onnxq.config.rounding import GPTQ, Rounding, method_name, rounding_from_dict, rounding_to_dict
from onnxq.config.sections import (
    AccuracyTarget,
    Activations,
    Calibration,
    Engine,
    FloatPhase,
    MixedPrecision,
    Tuning,
    Validation,
    Weights,
)
from onnxq.errors import UserError

#: How ``None`` is spelled in a TOML file (TOML has no null).
NONE = "none"
_MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Config:
    """What to quantize and how (every field documented in its section's class).

    Attributes:
        target: target profile (ort-cpu, tensorrt, openvino, qnn, qnn-a16, npu-pow2).
        scale: "float" or "pow2" (every scale an exact power of two); None: the target's choice.
        seed: seed of everything random (mini-batches, drop masks, augmented views), 0 .. 2^63 - 1.
        opset: minimum output opset (None: the lowest the chosen grids need, 13 or more).
        exclude: node names or op types kept in float.
        kernels: the CPUs whose onnxruntime integer kernels the 8-bit weights must be exact on:
            "portable" (every CPU: pairs of weights that x86 CPUs without VNNI add in a saturating int16
            are kept within range, :mod:`onnxq.targets.ort_kernels`), "auto" (this machine), "vnni",
            "avx2", "avx512", "arm64", or "int32" (no fitting: a runtime that accumulates in int32).
            None: the target's choice (portable for ort-cpu, int32 for the others).
    """

    target: str = "ort-cpu"
    scale: str | None = None
    seed: int = 0
    opset: int | None = None
    exclude: tuple[str, ...] = ()
    kernels: str | None = None
    weights: Weights = field(default_factory=Weights)
    activations: Activations = field(default_factory=Activations)
    calibration: Calibration = field(default_factory=Calibration)
    float_phase: FloatPhase = field(default_factory=FloatPhase)
    rounding: Rounding = field(default_factory=GPTQ)
    tuning: Tuning = field(default_factory=Tuning)
    engine: Engine = field(default_factory=Engine)
    mixed_precision: MixedPrecision = field(default_factory=MixedPrecision)
    validation: Validation = field(default_factory=Validation)
    accuracy: AccuracyTarget = field(default_factory=AccuracyTarget)

    def __post_init__(self) -> None:
        if not isinstance(self.target, str):
            raise UserError(f"target={self.target!r} must be a profile name, e.g. 'ort-cpu'")
        check_choice("scale", self.scale, (*SCALE_KINDS, None))
        check_choice("kernels", self.kernels, (*KERNELS, None))
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed <= _MAX_SEED):
            raise UserError(f"seed={self.seed!r} must be an integer in 0 .. 2^63 - 1")
        if self.opset is not None:
            check_count("opset", self.opset, minimum=1)
        if not isinstance(self.exclude, (str, list, tuple)):
            raise UserError(f"exclude={self.exclude!r} must be a list of node names or op types")
        exclude = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude)
        if not all(isinstance(e, str) and e for e in exclude):
            raise UserError(f"exclude={self.exclude!r} must be node names or op types")
        object.__setattr__(self, "exclude", exclude)
        for f in dataclasses.fields(self):
            if f.name in SECTIONS and not isinstance(getattr(self, f.name), SECTIONS[f.name]):
                raise UserError(f"{f.name} must be a {SECTIONS[f.name].__name__}, got "
                                f"{type(getattr(self, f.name)).__name__}")
        if not hasattr(self.rounding, "resolved"):
            raise UserError(f"rounding must be one of the rounding types (RoundToNearest, GPTQ, AdaRound, BRECQ, "
                            f"QDrop, AdaQuant), got {type(self.rounding).__name__}")

    @property
    def method(self) -> str:
        """The rounding method's name ("mrecg" for BRECQ or QDrop with an MRECG merge)."""
        return method_name(self.rounding)

    @property
    def output_opset(self) -> int:
        """The lowest opset the chosen grids and containers need (at least ``opset``)."""
        w = self.weights
        plan_bits = {b for _, b in w.bit_plan}
        act_bits = self.activations.bits or 8
        narrow = {w.bits, w.first_last_bits or 8, act_bits, *plan_bits}
        need = 21 if 4 in narrow or act_bits == 16 else 13
        if w.uses_two_bits:  # "auto" storage is resolved against the target before use
            need = max(need, {"int2": 25, "int4": 21}.get(w.storage, 13))
        return max(need, self.opset or 0)

    def replace(self, **changes: Any) -> Config:
        """A copy with top-level fields or whole sections changed."""
        return dataclasses.replace(self, **changes)

    def with_rounding_resolved(self) -> Config:
        """The rounding method's "auto" values resolved (needs the resolved activation width)."""
        return dataclasses.replace(self, rounding=self.rounding.resolved(self.activations.bits or 8))

    @classmethod
    def from_preset(cls, name: str, **sections: Any) -> Config:
        """Preset ``name`` (:mod:`onnxq.config.presets`), with whole sections or fields replaced."""
        from onnxq.config.presets import preset

        return dataclasses.replace(cls.from_dict(preset(name)), **sections)

    @classmethod
    def from_toml(cls, path: str) -> Config:
        """The config of a TOML file (:mod:`onnxq.config.files`)."""
        from onnxq.config.files import load_toml

        return cls.from_dict(load_toml(path))

    # ------------------------------------------------------------------------------ dict form
    def to_dict(self) -> dict[str, Any]:
        """Nested plain values (None kept), the rounding table with its ``method``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "rounding":
                out[f.name] = rounding_to_dict(value)
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                out[f.name] = {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
            else:
                out[f.name] = _plain(value)
        if out["weights"]["bit_plan"]:
            out["weights"]["bit_plan"] = dict(self.weights.bit_plan)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """The config of a dict as :meth:`to_dict` writes it (missing keys take their defaults;
        unknown keys, wrong types and bad values are one-line errors)."""
        if not isinstance(values, dict):
            raise UserError("a configuration must be a table of settings")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UserError(f"unknown setting {unknown[0]!r}: known ones are {', '.join(known)}")
        kwargs: dict[str, Any] = {}
        for name, value in values.items():
            if name == "rounding":
                if not isinstance(value, dict):
                    raise UserError("rounding must be a table with a method, e.g. {method = 'brecq'}")
                kwargs[name] = rounding_from_dict(_nones(value))
            elif name in SECTIONS:
                kwargs[name] = _section(SECTIONS[name], value, name)
            else:
                kwargs[name] = _field_value(known[name], value, name, cls)
        return cls(**kwargs)


SECTIONS: dict[str, type] = {
    "weights": Weights, "activations": Activations, "calibration": Calibration, "float_phase": FloatPhase,
    "tuning": Tuning, "engine": Engine, "mixed_precision": MixedPrecision, "validation": Validation,
    "accuracy": AccuracyTarget,
}


def _plain(value: Any) -> Any:
    return list(_plain(v) for v in value) if isinstance(value, tuple) else value


def _nones(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (_nones(v) if isinstance(v, dict) else None if v == NONE else v) for k, v in values.items()}


def _section(kind: type, values: Any, path: str) -> Any:
    if not isinstance(values, dict):
        raise UserError(f"{path} must be a table of settings, got {values!r}")
    known = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"unknown setting {path}.{unknown[0]}: known ones are {', '.join(known)}")
    return kind(**{k: _field_value(known[k], v, f"{path}.{k}", kind) for k, v in values.items()})


def _field_value(f: dataclasses.Field, value: Any, path: str, owner: type) -> Any:
    """``value`` from a file or an override as the field wants it: "none" -> None, list -> tuple."""
    hint = typing.get_type_hints(owner)[f.name]
    if value == NONE and _optional(hint):
        return None
    if isinstance(value, list) and path != "weights.bit_plan":
        return tuple(value)
    return value


def _optional(hint: Any) -> bool:
    return (isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union) and \
        type(None) in typing.get_args(hint)
