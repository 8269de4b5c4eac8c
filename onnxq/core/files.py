"""Writing files safely: atomically, with the user's umask, never over an input, nothing left behind.

Every file onnxq writes goes through :func:`atomic_write`: the bytes go to a temporary file in the
destination folder (``.onnxq-XXXXXXXX.tmp``, a short name so a long output name never overflows the
folder's name limit twice), which then replaces the target with ``os.replace``. A reader never sees
a half-written file and a failed write leaves the old one intact. The file gets the permissions a
plain ``open(path, "w")`` would give (``0o666`` less the umask), not ``mkstemp``'s ``0o600``.

:class:`OutputGuard` runs before any work: it refuses an output path that names an input (resolved,
so links and ``..`` do not hide it), that is a folder, whose folder is a file or not writable, or
whose name is longer than the file system allows; it creates the missing output folders and removes
them again (when still empty) after a failed run.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from onnxq.errors import UserError

log = logging.getLogger(__name__)

TEMP_PREFIX = ".onnxq-"
TEMP_SUFFIX = ".tmp"
_umask_lock = threading.Lock()


def file_mode() -> int:
    """The mode a new file gets from ``open()``: ``0o666`` less the process umask."""
    with _umask_lock:
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then move it onto ``path``."""
    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=out.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of UTF-8 text, flushed to disk before the rename."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    return atomic_write(path, write)


def same_file(a: Path, b: Path) -> bool:
    """``a`` and ``b`` name the same file (resolved paths, or the same inode when both exist)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


class OutputGuard:
    """The files one command will write, checked against its inputs before any work starts.

    ``outputs`` maps a role ("model", "report", ...) to a path; ``inputs`` are every file the command
    reads (the model, its external data, calibration files, a config file). :meth:`prepare` raises a
    one-line :class:`UserError` on the first problem and creates missing folders; :meth:`abandon`
    removes the folders it created if they are still empty (a failed run leaves nothing behind).
    """

    def __init__(self, outputs: dict[str, Path], inputs: Iterable[Path]):
        self.outputs = {role: Path(p) for role, p in outputs.items()}
        self.inputs = [Path(p) for p in inputs]
        self.created: list[Path] = []

    def check(self) -> None:
        for role, out in self.outputs.items():
            parent = _existing_parent(out)
            if not parent.is_dir():
                raise UserError(f"cannot write {out}: {parent} is a file, not a folder: choose another -o path")
            too_long = [part for part in out.parts if len(part.encode()) > _name_max(parent)]
            if too_long:
                raise UserError(f"the {role} path holds a name of {len(too_long[0].encode())} bytes "
                                f"({too_long[0][:24]}...), longer than the file system allows: "
                                "choose a shorter -o path")
            for src in self.inputs:
                if same_file(out, src):
                    raise UserError(f"the {role} file {out} would overwrite the input {src}: "
                                    "choose another -o path (inputs are never modified)")
            if out.is_dir():
                raise UserError(f"the {role} path {out} is a folder: remove it or choose another -o path")

    def prepare(self) -> None:
        """:meth:`check`, then create the output folders and prove each one writable."""
        self.check()
        for folder in sorted({p.parent for p in self.outputs.values()}):
            self._make_folder(folder)
            try:
                fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=folder)
                os.close(fd)
                os.unlink(probe)
            except OSError as exc:
                self.abandon()
                raise UserError(f"cannot write into {folder} ({exc.strerror or exc}): "
                                "choose a writable folder for -o") from None

    def _make_folder(self, folder: Path) -> None:
        missing = []
        p = folder
        while not p.exists():
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
        for m in reversed(missing):
            try:
                m.mkdir()
            except OSError as exc:
                self.abandon()
                raise UserError(f"cannot create the folder {m} ({exc.strerror or exc}): "
                                "choose another -o path") from None
            self.created.append(m)

    def abandon(self) -> None:
        """Remove the folders :meth:`prepare` created, deepest first, when empty."""
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    log.debug("could not remove %s: %s", folder, exc)
        self.created = []


def _existing_parent(path: Path) -> Path:
    """The nearest existing ancestor folder (or file) of ``path``."""
    p = path.parent
    while not p.exists() and p.parent != p:
        p = p.parent
    return p
