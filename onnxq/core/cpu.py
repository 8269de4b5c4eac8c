"""The instruction-set family of a CPU, as onnxruntime's integer kernels (MLAS) tell them apart.

MLAS picks its 8-bit GEMM kernel by CPUID at start-up (``platform.cpp``):

* ``vnni``: x86-64 with AVX-VNNI, AVX512-VNNI or AMX: ``vpdpbusd``/``tdpbusd`` multiply and accumulate
  bytes into int32 with no intermediate rounding: exact.
* ``avx512``: x86-64 with AVX-512F/BW but no VNNI (e.g. Skylake-SP), and ``avx2``: x86-64 with AVX2 but
  no VNNI (e.g. Haswell to Coffee Lake, AMD Zen 1-3): ``vpmaddubsw`` multiplies unsigned by signed bytes
  and adds adjacent pairs into a *saturating* int16 before ``vpmaddwd`` widens them (see
  :mod:`onnxq.targets.ort_kernels`).
* ``arm64``: AArch64 (``sdot``/``udot``, or widening multiplies): exact.
* ``other``: anything else (SSE-only x86, other architectures); treated like the saturating families.

The family is read through numpy's runtime dispatch (``numpy._core._multiarray_umath.__cpu_features__``),
which asks CPUID itself, so it is what the process really runs on (also under an emulator).
"""

from __future__ import annotations

import functools
import platform

FAMILIES = ("vnni", "avx512", "avx2", "arm64", "other")


@functools.lru_cache(maxsize=None)
def cpu_features() -> frozenset[str]:
    """The CPU features numpy's dispatcher found on this machine (e.g. "AVX2", "AVX512VNNI", "ASIMDDP")."""
    import importlib

    try:
        module = importlib.import_module("numpy._core._multiarray_umath")
    except ImportError:  # numpy 1.x
        module = importlib.import_module("numpy.core._multiarray_umath")
    found: dict[str, bool] = module.__cpu_features__
    return frozenset(name for name, present in found.items() if present)


def family_of(features: frozenset[str] | set[str], machine: str) -> str:
    """The family of a CPU with ``features`` (numpy's names) and ``platform.machine()`` ``machine``."""
    if machine.lower() in ("aarch64", "arm64"):
        return "arm64"
    if features & {"AVX512VNNI", "AVXVNNI", "AVX512_VNNI", "AVX_VNNI"}:
        return "vnni"
    if {"AVX512F", "AVX512BW"} <= set(features):
        return "avx512"
    if "AVX2" in features:
        return "avx2"
    return "other"


def cpu_family() -> str:
    """This machine's family (see the module docstring)."""
    return family_of(cpu_features(), platform.machine())


def describe() -> str:
    """One line for reports: the family and the features it was read from."""
    shown = sorted(cpu_features() & {"AVX2", "FMA3", "AVX512F", "AVX512BW", "AVX512VNNI", "AVXVNNI", "ASIMD",
                                     "ASIMDDP"})
    return f"{cpu_family()} ({platform.machine()}: {', '.join(shown) or 'baseline'})"
