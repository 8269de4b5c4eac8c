"""Configuration files (TOML), ``--set section.field=value`` overrides, and how layers of settings merge.

A run's settings come in layers, each overriding the one before: the defaults of :class:`Config`,
a ``--preset``, a ``--config run.toml`` file, then the command line's flags and ``--set`` values.
Each layer is a nested dict in :meth:`Config.to_dict`'s form; :func:`merge` stacks two of them.
One rule keeps a rounding table consistent: a layer that names a different rounding ``method``
replaces the lower layers' rounding table (keeping only its ``schedule``, where the new method has
schedules), since settings of one method mean nothing to another. The dropped settings that the new
method also takes are named in a warning, so that ``--preset w2a4 --set rounding.method=brecq`` does
not silently lose the preset's ``iters``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from onnxq.config.choices import DEFAULT_ROUNDING
from onnxq.config.rounding import method_settings
from onnxq.config.run import NONE, Config
from onnxq.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)


def load_toml(path: str | Path) -> dict[str, Any]:
    """The tables of a TOML file; a missing or malformed file is a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{p} is not a UTF-8 text file: give a TOML configuration") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{p} is not valid TOML ({exc}): fix the file") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"rounding.iters=600"`` -> (["rounding", "iters"], 600). The value is read as a TOML value
    (numbers, true/false, "strings", [lists]); anything else is taken as a bare string."""
    key, sep, raw = text.partition("=")
    path = [p.strip() for p in key.split(".")]
    if not sep or not all(path):
        raise UserError(f"--set {text!r} is not SECTION.FIELD=VALUE: e.g. --set rounding.iters=600")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def nested(path: list[str], value: Any) -> dict[str, Any]:
    """``{path[0]: {path[1]: ... value}}``."""
    out: Any = value
    for key in reversed(path):
        out = {key: out}
    return out


def merge(lower: dict[str, Any], higher: dict[str, Any]) -> dict[str, Any]:
    """``higher``'s settings over ``lower``'s, table by table (see the module docstring)."""
    out = dict(lower)
    for key, value in higher.items():
        if key == "rounding" and isinstance(value, dict) and isinstance(out.get(key), dict):
            base = out[key]
            if "method" in value and value["method"] != base.get("method", DEFAULT_ROUNDING):
                settings = method_settings(value["method"])
                dropped = sorted((set(base) & settings) - {"schedule"} - set(value))
                if dropped:
                    log.warning("rounding.method=%s replaces the %s settings below it: %s not carried over "
                                "(set them again, e.g. --set rounding.%s=%s, to keep them)", value["method"],
                                base.get("method", DEFAULT_ROUNDING),
                                ", ".join(f"{k}={base[k]!r}" for k in dropped), dropped[0], base[dropped[0]])
                base = {"schedule": base["schedule"]} if "schedule" in base and "schedule" in settings else {}
            out[key] = merge(base, value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict) and key != "bit_plan":
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def to_toml(config: Config) -> str:
    """The config as a TOML document that :func:`load_toml` + :meth:`Config.from_dict` read back.

    A ``None`` is left out where it is the field's default and written "none" where it is not."""
    values = _drop_default_nones(config.to_dict(), _defaults(config))
    lines: list[str] = []
    _table(lines, [], values)
    return "\n".join(lines).strip() + "\n"


def _defaults(config: Config) -> dict[str, Any]:
    """The defaults of ``config``'s fields (its rounding table: its method's)."""
    from onnxq.config.rounding import rounding_to_dict

    return {**Config().to_dict(), "rounding": rounding_to_dict(type(config.rounding)())}


def _drop_default_nones(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        default = defaults.get(key) if isinstance(defaults, dict) else None
        if isinstance(value, dict):
            out[key] = _drop_default_nones(value, default if isinstance(default, dict) else {})
        elif value is not None or default is not None:
            out[key] = value
    return out


def _table(lines: list[str], path: list[str], values: dict[str, Any]) -> None:
    scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in values.items() if isinstance(v, dict)}
    if path:
        lines.append("")
        lines.append("[" + ".".join(_key(p) for p in path) + "]")
    for key, value in scalars.items():
        lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in tables.items():
        _table(lines, [*path, key], value)


def _key(key: str) -> str:
    bare = key and all(c.isalnum() or c in "-_" for c in key)
    return key if bare else json.dumps(key)


def _value(value: Any) -> str:
    if value is None:
        return json.dumps(NONE)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} cannot be written to TOML")
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _read_plan(path: str | Path, what: str, missing: str, example: str) -> tuple[Path, Any]:
    """The parsed JSON of a plan file, or a one-line error naming ``what`` it should be."""
    p = Path(path)
    try:
        return p, json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"{what} {p} does not exist: give the path of {missing}") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{what} {p} is not readable JSON ({exc}): give a file like {example}") from None


def load_float_plan(path: str | Path) -> tuple[str, ...]:
    """The nodes of a float-plan JSON file (:mod:`onnxq.fallback.plan`: ``{"keep_float": [{"node": ...}]}``)."""
    p, data = _read_plan(path, "float plan", "a written OUTPUT.floatplan.json", '{"keep_float": [{"node": "name"}]}')
    entries = data.get("keep_float") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise UserError(f'float plan {p} has no "keep_float" list: write {{"keep_float": [{{"node": "name"}}]}}')
    nodes = []
    for i, entry in enumerate(entries):
        node = entry.get("node") if isinstance(entry, dict) else entry
        if not isinstance(node, str) or not node:
            raise UserError(f'float plan {p}: entry {i} names no node: write {{"node": "node name"}}')
        nodes.append(node)
    return tuple(dict.fromkeys(nodes))


def load_bit_plan(path: str | Path) -> tuple[tuple[str, int], ...]:
    """The ``layers`` of a bit-plan JSON file as ``Config.weights.bit_plan`` pairs."""
    p, data = _read_plan(path, "bit plan", "a JSON plan", '{"layers": {"node": 4, ...}}')
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise UserError(f'bit plan {p} has no "layers" mapping: write {{"layers": {{"node name": bits, ...}}}}')
    return tuple((str(k), v) for k, v in layers.items())
