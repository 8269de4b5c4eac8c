"""Resumable reconstruction: after every finished block, its new constants are saved.

Layout of the checkpoint folder::

    state.json        {"fingerprint": ..., "done": [block indices], "results": {index: {...}}}
    block_0007.npz    the constants block 7 changed (weight codes, scales, requantized biases)

The fingerprint hashes the round-to-nearest QDQ model, the reconstruction settings and the source of
the installed onnxq package (:func:`code_fingerprint`), so a checkpoint is only reused for the very
same run by the very same code: blocks written by another onnxq version, or by a working tree edited
since, are reconstructed again instead of being mixed with new ones. Files are written atomically (temporary file,
then ``os.replace``), so a run killed at any moment leaves a consistent checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def fingerprint(model_bytes: bytes, settings: dict[str, Any]) -> str:
    h = hashlib.sha256(model_bytes)
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(code_fingerprint().encode())
    return h.hexdigest()[:32]


@functools.lru_cache(maxsize=None)
def code_fingerprint() -> str:
    """SHA-256 of every ``.py`` file of the onnxq package and of ``onnxq.passes`` (paths and bytes).

    The files are found where Python finds the packages (``onnxq.passes`` may live in another folder
    of a source tree, see pyproject.toml), without importing them.
    """
    h = hashlib.sha256()
    for name, root in package_roots():
        for path in sorted(root.rglob("*.py")):
            h.update(f"{name}/{path.relative_to(root).as_posix()}".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def package_roots() -> list[tuple[str, Path]]:
    """(name, folder) of the onnxq package and of ``onnxq.passes``."""
    roots = []
    for name in ("onnxq", "onnxq.passes"):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"package {name} not found: reinstall onnxq")
        roots.append((name, Path(next(iter(spec.submodule_search_locations))).resolve()))
    return roots


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class Checkpoint:
    """Finished blocks of one reconstruction run; ``folder=None`` keeps nothing."""

    def __init__(self, folder: str | Path | None, fp: str):
        self.folder = Path(folder) if folder else None
        self.fp = fp
        self.done: list[int] = []
        self.results: dict[str, Any] = {}
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        state = self.folder / "state.json"
        if state.exists():
            data = json.loads(state.read_text())
            if data.get("fingerprint") == fp:
                self.done = [int(i) for i in data.get("done", [])]
                self.results = data.get("results", {})
                log.info("resuming reconstruction: %d block(s) already done", len(self.done))
            else:
                log.warning("checkpoint in %s belongs to another run (model, settings or onnxq code); starting over",
                            self.folder)
                for f in self.folder.glob("block_*.npz"):
                    f.unlink()

    def load(self, index: int) -> dict[str, np.ndarray]:
        assert self.folder is not None
        with np.load(self.folder / f"block_{index:04d}.npz", allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def save(self, index: int, constants: dict[str, np.ndarray], result: dict[str, Any]) -> None:
        self.done.append(index)
        self.results[str(index)] = result
        if self.folder is None:
            return
        npz = self.folder / f"block_{index:04d}.npz"
        _atomic_write(npz, lambda tmp: _save_npz(tmp, constants))
        state = {"fingerprint": self.fp, "done": self.done, "results": self.results}
        _atomic_write(self.folder / "state.json", lambda tmp: Path(tmp).write_text(json.dumps(state, indent=1)))

    def clear(self) -> None:
        if self.folder is None or not self.folder.exists():
            return
        for f in self.folder.iterdir():
            f.unlink()
        self.folder.rmdir()


def _save_npz(path: str, constants: dict[str, np.ndarray]) -> None:
    # ml_dtypes arrays (int4) are stored as int8 views' values and cast back by the caller's dtype.
    plain = {k: (v.astype(np.int8) if v.dtype.name in ("int4", "uint4", "int2", "uint2") else v)
             for k, v in constants.items()}
    with open(path, "wb") as f:
        np.savez(f, **plain)
