"""A one-pass CPU kernel for the forward of per-tensor fake quantization, compiled on first use.

On a CPU, fake quantization costs memory traffic, not arithmetic: the torch path of
:class:`onnxq.recon.fake_quant._FakeQuantFn` runs about ten elementwise operators (divide, clamp, round,
multiply, the QDrop mix, and the masks its backward needs), each a full pass over tensors of tens of MB.
``fake_quant_kernel.c`` does the same float32 operations in the same order in one pass, so its outputs
are bit-identical to the torch path's (the tests compare them bit for bit) and a run's bytes do not
depend on whether the kernel is there.

The C source ships with the package; the first use compiles it with the system C compiler (``$CC``, else
``cc``) into ``$ONNXQ_CACHE_DIR/native`` (default ``$XDG_CACHE_HOME/onnxq`` or ``~/.cache/onnxq``), named by a
hash of the source, the flags and the compiler's version, written atomically; later runs load it
(ctypes, which releases the GIL, so the chunks of one tensor run on torch's threads at once). Where no
compiler works, or ``ONNXQ_NATIVE=0``, the torch path runs, said once in the log. Per-channel scales
(weights: small tensors) always take the torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from onnxq.core.cpu import cpu_features

log = logging.getLogger(__name__)

__all__ = ["available", "fake_quant_forward"]

_SOURCE = Path(__file__).with_name("fake_quant_kernel.c")
_SYMBOL = "onnxq_fake_quant_forward"
#: Below this many elements a tensor is one call on the calling thread (thread hand-off costs more).
_MIN_CHUNK = 1 << 16
_FLOAT_P = ctypes.POINTER(ctypes.c_float)


def _flags() -> list[str]:
    flags = ["-O3", "-shared", "-fPIC", "-std=c99", "-ffp-contract=off", "-fno-trapping-math"]
    if platform.machine().lower() in ("x86_64", "amd64") and "AVX2" in cpu_features():
        flags += ["-mavx2", "-msse4.1"]  # vector division and rounding (vroundps), no FMA contraction
    return flags


def compiler() -> str:
    """The C compiler the kernel is built with: ``$CC``, else ``cc``."""
    return os.environ.get("CC") or "cc"


def cache_dir() -> Path:
    """Where compiled kernels live (see the module docstring)."""
    root = os.environ.get("ONNXQ_CACHE_DIR")
    if root:
        return Path(root) / "native"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "onnxq" / "native"


def _compile(cc: str, flags: list[str]) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60, check=True)
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(flags).encode() + version.stdout.encode())
    target = cache_dir() / f"fake_quant-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, str(_SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                       timeout=120, check=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _library() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    cc = compiler()
    if shutil.which(cc) is None:
        log.info("native fake quantization: no C compiler (%s) found; using torch operators", cc)
        return None
    try:
        path = _compile(cc, _flags())
        fn = getattr(ctypes.CDLL(str(path)), _SYMBOL)
    except (OSError, subprocess.SubprocessError, AttributeError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.info("native fake quantization unavailable (%s); using torch operators", str(detail).strip()[:300])
        return None
    fn.restype = None
    fn.argtypes = [_FLOAT_P, _FLOAT_P, ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.c_float,
                   _FLOAT_P, _FLOAT_P, _FLOAT_P]
    log.debug("native fake quantization: %s", path)
    return fn


def available() -> bool:
    """Whether the kernel runs here (a compiler was found and ``ONNXQ_NATIVE`` is not ``0``)."""
    return os.environ.get("ONNXQ_NATIVE", "1") != "0" and _library() is not None


@functools.cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """One pool per process (a forked child has no threads behind its parent's pool)."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="onnxq-fq")


def _dense_like(t: torch.Tensor, x: torch.Tensor) -> bool:
    return t.shape == x.shape and t.stride() == x.stride() and t.dtype == x.dtype and t.device == x.device


def _memory_order(x: torch.Tensor) -> bool:
    """Whether ``x``'s elements fill its storage span without gaps (row-major or channels-last)."""
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def _ptr(t: torch.Tensor | None, offset: int):
    if t is None:
        return None
    return ctypes.cast(t.data_ptr() + 4 * offset, _FLOAT_P)


def fake_quant_forward(x: torch.Tensor, keep: torch.Tensor | None, scale: float, lo: float, hi: float,
                       need_inside: bool, need_local: bool
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """``(out, inside, local)`` of the module docstring's forward for a float32 CPU tensor with one scale;
    ``lo``/``hi`` are ``qmin - z`` and ``qmax - z``. None where the kernel cannot run (no compiler, another
    dtype or device, a strided view, a mask laid out otherwise): the caller then takes the torch path."""
    if not (x.dtype == torch.float32 and x.device.type == "cpu" and _memory_order(x)):
        return None
    if keep is not None and not _dense_like(keep, x):
        return None
    if not available():
        return None
    fn = _library()
    out = torch.empty_like(x)
    inside = torch.empty_like(x) if need_inside else None
    local = torch.empty_like(x) if need_local else None
    n = x.numel()
    workers = max(1, min(torch.get_num_threads(), n // _MIN_CHUNK))
    bounds = [n * i // workers for i in range(workers + 1)]

    def run(i: int) -> None:
        a, b = bounds[i], bounds[i + 1]
        fn(_ptr(x, a), _ptr(keep, a), b - a, scale, lo, hi, _ptr(out, a), _ptr(inside, a), _ptr(local, a))

    if workers == 1:
        run(0)
    else:
        list(_pool(workers, os.getpid()).map(run, range(workers)))
    return out, inside, local
