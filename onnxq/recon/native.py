"""One-pass CPU kernels for fake quantization and batch assembly, compiled on first use.

On a CPU, fake quantization costs memory traffic, not arithmetic: the torch path of
:class:`onnxq.recon.fake_quant._FakeQuantFn` runs about ten elementwise operators (divide, clamp, round,
multiply, the QDrop mix, and the masks its backward needs), each a full pass over tensors of tens of MB.
``fake_quant_kernel.c`` does the same float32 operations in the same order in one pass, reading QDrop's
keep mask as packed bits (:mod:`onnxq.recon.drop_mask`), so its outputs are bit-identical to the torch
path's (the tests compare them bit for bit) and a run's bytes do not depend on whether the kernel is
there. Likewise a mini-batch is an index, a cast from float16 and (QDrop's block input) a selection between
two caches, three passes in torch; ``take_rows_kernel.c`` makes one.

The C sources ship with the package; the first use compiles them with the system C compiler (``$CC``, else
``cc``) into ``$ONNXQ_CACHE_DIR/native`` (default ``$XDG_CACHE_HOME/onnxq`` or ``~/.cache/onnxq``), named by a
hash of the sources, the flags and the compiler's version, written atomically; later runs load it
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

__all__ = ["available", "fake_quant_forward", "take_rows", "zero_padded"]

_SOURCES = tuple(Path(__file__).with_name(name) for name in ("fake_quant_kernel.c", "take_rows_kernel.c"))
#: Below this many elements a tensor is one call on the calling thread (thread hand-off costs more).
_MIN_CHUNK = 1 << 16
_FLOAT_P = ctypes.POINTER(ctypes.c_float)
_BYTE_P = ctypes.POINTER(ctypes.c_uint8)
_VOID_P = ctypes.c_void_p


def _flags() -> list[str]:
    flags = ["-O3", "-shared", "-fPIC", "-std=c99", "-ffp-contract=off", "-fno-trapping-math"]
    if platform.machine().lower() in ("x86_64", "amd64") and "AVX2" in cpu_features():
        flags += ["-mavx2", "-msse4.1"]  # vector division and rounding (vroundps), no FMA contraction
        if "F16C" in cpu_features():
            flags.append("-mf16c")  # float16 -> float32 in vector registers (take_rows)
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
    key = hashlib.sha256(b"".join(src.read_bytes() for src in _SOURCES) + " ".join(flags).encode()
                         + version.stdout.encode())
    target = cache_dir() / f"fake_quant-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, *map(str, _SOURCES), "-o", tmp, "-lm"], capture_output=True, text=True,
                       timeout=120, check=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class _Kernels:
    """The compiled library's two entry points, typed for ctypes."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.fake_quant = lib.onnxq_fake_quant_forward
        self.fake_quant.restype = None
        self.fake_quant.argtypes = [_FLOAT_P, _FLOAT_P, _BYTE_P, ctypes.c_int64, ctypes.c_float, ctypes.c_float,
                                    ctypes.c_float, ctypes.c_int, ctypes.c_float, ctypes.c_float, _FLOAT_P, _FLOAT_P,
                                    _FLOAT_P]
        self.fake_quant_padded = lib.onnxq_fake_quant_padded
        self.fake_quant_padded.restype = None
        self.fake_quant_padded.argtypes = [_FLOAT_P, _FLOAT_P, _BYTE_P, *[ctypes.c_int64] * 7, ctypes.c_float,
                                           ctypes.c_float, ctypes.c_float, ctypes.c_int, ctypes.c_float,
                                           ctypes.c_float, _FLOAT_P, _FLOAT_P, _FLOAT_P]
        self.take_rows = lib.onnxq_take_rows
        self.take_rows.restype = None
        self.take_rows.argtypes = [_VOID_P, ctypes.c_int, _VOID_P, ctypes.c_int, _BYTE_P,
                                   ctypes.POINTER(ctypes.c_int64), ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                   _FLOAT_P]


@functools.cache
def _library() -> _Kernels | None:
    cc = compiler()
    if shutil.which(cc) is None:
        log.info("native kernels: no C compiler (%s) found; using torch operators", cc)
        return None
    try:
        path = _compile(cc, _flags())
        kernels = _Kernels(ctypes.CDLL(str(path)))
    except (OSError, subprocess.SubprocessError, AttributeError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.info("native kernels unavailable (%s); using torch operators", str(detail).strip()[:300])
        return None
    log.debug("native kernels: %s", path)
    return kernels


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


def _ptr(t: torch.Tensor | None, offset: int, kind=_FLOAT_P, size: int = 4):
    if t is None:
        return None
    return ctypes.cast(t.data_ptr() + size * offset, kind)


def _row_chunks(rows: int, numel: int) -> list[int]:
    """Bounds of contiguous row ranges, one per thread (one range under ``_MIN_CHUNK`` elements a thread)."""
    workers = max(1, min(torch.get_num_threads(), rows, numel // _MIN_CHUNK))
    return [rows * i // workers for i in range(workers + 1)]


def _clip_args(clip: tuple[float, float] | None) -> tuple[int, float, float]:
    """The kernels' ``has_clip, clo, chi``."""
    return (0, 0.0, 0.0) if clip is None else (1, clip[0], clip[1])


def _run_chunks(bounds: list[int], run) -> None:
    """``run(i)`` for each chunk ``[bounds[i], bounds[i + 1])``, on torch's threads when more than one."""
    if len(bounds) == 2:
        run(0)
    else:
        list(_pool(len(bounds) - 1, os.getpid()).map(run, range(len(bounds) - 1)))


def fake_quant_forward(x: torch.Tensor, keep: torch.Tensor | None, scale: float, lo: float, hi: float,
                       need_inside: bool, need_local: bool, clip: tuple[float, float] | None = None,
                       pad: tuple[tuple[int, int], tuple[int, int]] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """``(out, inside, local)`` of the module docstring's forward for a float32 CPU tensor with one scale;
    ``lo``/``hi`` are ``qmin - z`` and ``qmax - z``; ``keep`` a float mask laid out like ``x`` or packed bits
    (uint8) in its memory order; ``clip`` the bounds of a clip (ReLU6) applied to ``x`` first; ``pad`` the
    ``((top, bottom), (left, right))`` zero padding of ``out`` (a 4-D channels-last ``x``: ``out`` is written
    into the interior of the padded tensor; ``inside`` and ``local`` keep ``x``'s shape). None where the
    kernel cannot run (no compiler, another dtype or device, a strided view, a mask laid out otherwise): the
    caller then takes the torch path."""
    if not (x.dtype == torch.float32 and x.device.type == "cpu" and _memory_order(x)):
        return None
    bits = keep if keep is not None and keep.dtype == torch.uint8 else None
    if bits is not None:
        if not (bits.device.type == "cpu" and bits.is_contiguous() and bits.numel() * 8 >= x.numel()):
            return None
        keep = None
    if keep is not None and not _dense_like(keep, x):
        return None
    if pad is not None and not (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                                and (bits is None or (x.shape[1] * x.shape[3]) % 8 == 0)):
        return None
    if not available():
        return None
    if pad is not None:
        return _padded(x, keep, bits, scale, lo, hi, need_inside, need_local, clip, pad)
    fn = _library().fake_quant  # type: ignore[union-attr]
    out = torch.empty_like(x)
    inside = torch.empty_like(x) if need_inside else None
    local = torch.empty_like(x) if need_local else None
    n = x.numel()
    workers = max(1, min(torch.get_num_threads(), n // _MIN_CHUNK))
    bounds = [min(n, (n * i // workers + 7) // 8 * 8) for i in range(workers + 1)]  # whole bytes of bits
    bounds[-1] = n
    clip_args = _clip_args(clip)

    def run(i: int) -> None:
        a, b = bounds[i], bounds[i + 1]
        fn(_ptr(x, a), _ptr(keep, a), _ptr(bits, a // 8, _BYTE_P, 1), b - a, scale, lo, hi, *clip_args,
           _ptr(out, a), _ptr(inside, a), _ptr(local, a))

    _run_chunks(bounds, run)
    return out, inside, local


def zero_padded(x: torch.Tensor, pad: tuple[tuple[int, int], tuple[int, int]]) -> torch.Tensor:
    """An uninitialised channels-last tensor of ``x`` padded by ``pad`` (see :func:`fake_quant_forward`) whose
    border is zero: the interior is for the caller to write."""
    (top, bottom), (left, right) = pad
    n, c, h, w = x.shape
    out = torch.empty((n, c, h + top + bottom, w + left + right), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    out[:, :, :top].zero_()
    out[:, :, top + h:].zero_()
    out[:, :, top:top + h, :left].zero_()
    out[:, :, top:top + h, left + w:].zero_()
    return out


def _padded(x, keep, bits, scale, lo, hi, need_inside, need_local, clip, pad):
    """:func:`fake_quant_forward` into a zero-padded output, by rows of ``W * C`` elements."""
    fn = _library().fake_quant_padded  # type: ignore[union-attr]
    out = zero_padded(x, pad)
    inside = torch.empty_like(x) if need_inside else None
    local = torch.empty_like(x) if need_local else None
    n, c, h, w = x.shape
    rows, row_len = n * h, w * c
    out_row, plane = out.stride(2), out.stride(0)
    lead = pad[0][0] * out_row + pad[1][0] * c
    bounds = _row_chunks(rows, x.numel())
    clip_args = _clip_args(clip)

    def run(i: int) -> None:
        fn(_ptr(x, 0), _ptr(keep, 0), _ptr(bits, 0, _BYTE_P, 1), bounds[i], bounds[i + 1], row_len, h, plane,
           out_row, lead, scale, lo, hi, *clip_args, _ptr(out, 0), _ptr(inside, 0), _ptr(local, 0))

    _run_chunks(bounds, run)
    return out, inside, local


def _rows_source(t: torch.Tensor) -> bool:
    """A cache whose samples are rows laid out as the batch must be: channels-last when 4-D, else row-major."""
    if t.device.type != "cpu" or t.dtype not in (torch.float16, torch.float32) or t.dim() < 1:
        return False
    return t.is_contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.is_contiguous()


def take_rows(q: torch.Tensor, idx: torch.Tensor, fp: torch.Tensor | None = None,
              bits: torch.Tensor | None = None) -> torch.Tensor | None:
    """``q[idx]`` as float32 (channels-last when 4-D, as :func:`onnxq.recon.batching.take_batch`); with
    ``fp`` and packed ``bits`` (one per element of the batch, in its memory order) the element of ``fp[idx]``
    where the bit is 1. None where the kernel cannot run (see :func:`fake_quant_forward`); the caller then
    takes the torch path."""
    if not (_rows_source(q) and idx.device.type == "cpu" and idx.dtype == torch.int64 and idx.dim() == 1):
        return None
    if (fp is None) != (bits is None):
        raise ValueError("take_rows mixes two caches by bits: give both fp and bits, or neither")
    rows, n = int(idx.numel()), int(q.shape[0])
    if fp is not None and bits is not None:
        if not (_rows_source(fp) and fp.shape == q.shape and fp.stride() == q.stride()):
            return None
        if not (bits.dtype == torch.uint8 and bits.device.type == "cpu" and bits.is_contiguous()):
            return None
        if bits.numel() * 8 < rows * (q.numel() // max(n, 1)):
            raise ValueError(f"{bits.numel()} packed bytes cannot mask a batch of {rows} rows of {tuple(q.shape[1:])}")
    if not available():
        return None
    if rows and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise IndexError(f"batch index out of range for {n} cached samples")
    layout = torch.channels_last if q.dim() == 4 else torch.contiguous_format
    out = torch.empty((rows, *q.shape[1:]), dtype=torch.float32, memory_format=layout)
    row = q.numel() // max(n, 1)
    idx = idx.contiguous()
    fn = _library().take_rows  # type: ignore[union-attr]
    bounds = _row_chunks(rows, rows * row)
    q_half = int(q.dtype == torch.float16)
    fp_half = int(fp is not None and fp.dtype == torch.float16)

    def run(i: int) -> None:
        fn(q.data_ptr(), q_half, fp.data_ptr() if fp is not None else None, fp_half,
           _ptr(bits, 0, _BYTE_P, 1), _ptr(idx, 0, ctypes.POINTER(ctypes.c_int64), 8), bounds[i], bounds[i + 1],
           row, _ptr(out, 0))

    _run_chunks(bounds, run)
    return out
