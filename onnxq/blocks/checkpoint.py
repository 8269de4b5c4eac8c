"""Resumable reconstruction: after every finished block, its new constants are saved.

Layout of the checkpoint folder::

    .onnxq-checkpoint  the marker: onnxq made this folder and may delete the files it wrote here
    state.json         {"fingerprint": ..., "done": [block indices], "results": {index: {...}}}
    block_0007.npz     the constants block 7 changed (weight codes, scales, requantized biases)

A folder is only used when it is new, empty, or holds the marker (:func:`claim_folder`), and
clearing a finished run deletes only the files onnxq wrote, then the folder if nothing else is in it
(:func:`release_folder`): a checkpoint folder pointed at the user's own files never deletes them.
A ``state.json`` or block file that cannot be read (a disk error, an edit) is dropped with a
warning and its blocks reconstructed again.

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
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.core.files import TEMP_PREFIX, TEMP_SUFFIX, atomic_write, atomic_write_text
from onnxq.errors import UserError

log = logging.getLogger(__name__)

MARKER = ".onnxq-checkpoint"
_MARKER_TEXT = ("onnxq checkpoint folder: finished blocks of a reconstruction run, to resume it.\n"
                "onnxq deletes only the files it wrote here, and the folder when it is then empty.\n")


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


def check_folder(folder: str | Path) -> None:
    """Refuse a checkpoint path that is a file, or a folder holding files onnxq did not put there."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise UserError(f"checkpoint path {path} is a file: name a folder for --checkpoint-dir")
    if path.is_dir() and not (path / MARKER).exists() and any(path.iterdir()):
        raise UserError(f"checkpoint folder {path} holds files onnxq did not write: name a new or empty folder "
                        "for --checkpoint-dir (onnxq deletes its checkpoint after the run)")


def claim_folder(folder: str | Path) -> Path:
    """Create ``folder`` (or reuse an empty or marked one) and write the marker."""
    path = Path(folder)
    check_folder(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not (path / MARKER).exists():
            atomic_write_text(path / MARKER, _MARKER_TEXT)
    except OSError as exc:
        raise UserError(f"cannot create the checkpoint folder {path} ({exc.strerror or exc}): "
                        "choose a writable --checkpoint-dir") from None
    return path


def release_folder(folder: str | Path, names: Iterable[str]) -> None:
    """Delete the files ``names`` onnxq wrote in ``folder``, its temporary files and the marker; then
    the folder itself if nothing else is left in it."""
    path = Path(folder)
    if not (path / MARKER).is_file():
        return
    for name in names:
        (path / name).unlink(missing_ok=True)
    for tmp in path.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
    if any(p.name != MARKER for p in path.iterdir()):
        log.info("checkpoint folder %s keeps files onnxq did not write; left in place", path)
        return
    (path / MARKER).unlink()
    path.rmdir()


def release_if_unused(folder: str | Path | None) -> None:
    """After a failed run: remove an onnxq checkpoint folder (and its marked subfolders) that holds no
    finished block, so a run that failed early leaves nothing behind; one with blocks is kept to resume."""
    if folder is None:
        return
    path = Path(folder)
    if not (path / MARKER).is_file() or any(path.rglob("block_*.npz")) or any(path.rglob("first_pass.json")):
        return
    for sub in sorted((p for p in path.iterdir() if p.is_dir()), reverse=True):
        release_folder(sub, ["state.json"])
    release_folder(path, ["state.json"])


def _readable_npz(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


class Checkpoint:
    """Finished blocks of one reconstruction run; ``folder=None`` keeps nothing."""

    def __init__(self, folder: str | Path | None, fp: str):
        self.folder = Path(folder) if folder else None
        self.fp = fp
        self.done: list[int] = []
        self.results: dict[str, Any] = {}
        if self.folder is None:
            return
        claim_folder(self.folder)
        state = self.folder / "state.json"
        if state.exists():
            try:
                data = json.loads(state.read_text())
                done = [int(i) for i in data.get("done", [])]
                results = dict(data.get("results", {}))
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                log.warning("checkpoint state %s is unreadable (%s); starting over", state, exc)
                data, done, results = {}, [], {}
            if data.get("fingerprint") == fp:
                self.done = [i for i in done if _readable_npz(self._block_file(i))]
                self.results = {k: v for k, v in results.items() if int(k) in self.done}
                if len(self.done) < len(done):
                    log.warning("checkpoint %s: %d unreadable block file(s) dropped; they are reconstructed "
                                "again", self.folder, len(done) - len(self.done))
                log.info("resuming reconstruction: %d block(s) already done", len(self.done))
            else:
                log.warning("checkpoint in %s belongs to another run (model, settings or onnxq code); starting over",
                            self.folder)
                for f in self.folder.glob("block_*.npz"):
                    f.unlink()

    def _block_file(self, index: int) -> Path:
        assert self.folder is not None
        return self.folder / f"block_{index:04d}.npz"

    def load(self, index: int) -> dict[str, np.ndarray]:
        with np.load(self._block_file(index), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def save(self, index: int, constants: dict[str, np.ndarray], result: dict[str, Any]) -> None:
        self.done.append(index)
        self.results[str(index)] = result
        if self.folder is None:
            return
        atomic_write(self._block_file(index), lambda tmp: _save_npz(tmp, constants))
        state = {"fingerprint": self.fp, "done": self.done, "results": self.results}
        atomic_write_text(self.folder / "state.json", json.dumps(state, indent=1))

    def clear(self) -> None:
        """Delete this run's files (state and blocks), then the folder if onnxq made it and it is empty."""
        if self.folder is None or not self.folder.exists():
            return
        release_folder(self.folder, ["state.json", *(f.name for f in self.folder.glob("block_*.npz"))])


def _save_npz(path: str, constants: dict[str, np.ndarray]) -> None:
    # ml_dtypes arrays (int4) are stored as int8 views' values and cast back by the caller's dtype.
    plain = {k: (v.astype(np.int8) if v.dtype.name in ("int4", "uint4", "int2", "uint2") else v)
             for k, v in constants.items()}
    with open(path, "wb") as f:
        np.savez(f, **plain)
