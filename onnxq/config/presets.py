"""Named configurations for what users do most (``--preset NAME``), each the best setting our
benchmarks know for its job.

Every preset is a TOML file in ``onnxq/config/presets/`` (copy one to start a ``--config`` file); its
first comment lines say what it is for and where its figures are. ``onnxq quantize --preset NAME
--print-config`` shows the whole resolved configuration.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from onnxq.errors import UserError

_FOLDER = "presets"


def _files() -> dict[str, Any]:
    folder = resources.files("onnxq.config").joinpath(_FOLDER)
    return {p.name.removesuffix(".toml"): p for p in folder.iterdir() if p.name.endswith(".toml")}


def preset_names() -> list[str]:
    """The names of the bundled presets, sorted."""
    return sorted(_files())


def preset_text(name: str) -> str:
    """The TOML text of preset ``name`` (an unknown name is a one-line error)."""
    files = _files()
    if name not in files:
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(sorted(files))}")
    return files[name].read_text(encoding="utf-8")


def preset(name: str) -> dict[str, Any]:
    """The settings of preset ``name`` as a dict in :meth:`onnxq.config.Config.to_dict`'s form."""
    from onnxq.config.files import tomllib

    return tomllib.loads(preset_text(name))


def preset_description(name: str) -> str:
    """The preset's leading comment, as one line."""
    lines = []
    for line in preset_text(name).splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    return " ".join(lines)
