"""Flag combinations: contradictions, no-ops, out-of-range and non-numeric numbers, bad --set/--preset/--config.

Every case quantizes the base model (rtn unless the flags say otherwise) with the flags appended.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.fuzz.harness import FAST, Case
from tests.fuzz.models import write_base

Builder = Callable[[Path], list[str]]
#: the dynamic-batch model for the learned methods (mini-batches of the calibration set)
LEARNED = ["--method", "adaround", "--iters", "5"]


def flags_build(words: list[str], method: list[str] | None = None, batch: int | str = 1,
                files: dict[str, bytes] | None = None, command: str = "quantize") -> Builder:
    def build(d: Path) -> list[str]:
        write_base(d, batch=batch)
        for name, data in (files or {}).items():
            p = d / name
            if data == b"<dir>":
                p.mkdir()
            else:
                p.write_bytes(data)
        return [command, "m.onnx", "-o", "out.onnx", "--calib", "d.npz", *(FAST if method is None else method),
                *words]
    return build


def _c(cid: str, words: list[str], fast: bool = False, **kw: object) -> Case:
    return Case(cid, flags_build(words, **kw), fast=fast)  # type: ignore[arg-type]


def _learned(cid: str, words: list[str], method: str = "adaround", fast: bool = False) -> Case:
    return Case(cid, flags_build(words, method=["--method", method, "--iters", "5"], batch="N"), fast=fast)


CONTRADICTIONS = [
    ["--scale", "pow2", "--target", "tensorrt"],
    ["--activations", "int8", "--target", "openvino"],
    ["--activations", "uint8", "--target", "tensorrt"],
    ["--activations", "uint8", "--target", "npu-pow2"],
    ["--scale", "float", "--target", "npu-pow2"],
    ["--scale", "pow2", "--target", "qnn"],
    ["--weights", "ternary", "--target", "tensorrt"],
    ["--weights", "int2", "--target", "openvino"],
    ["--weights", "int4", "--target", "qnn-a16"],
    ["--activation-bits", "4", "--target", "tensorrt"],
    ["--activation-bits", "4", "--activations", "uint8"],
    ["--per-tensor", "--weight-asymmetric"],
    ["--weight-asymmetric", "--target", "tensorrt"],
    ["--weights", "int4", "--first-last", "same"],
    ["--weights", "int2", "--first-last", "same", "--activation-bits", "4"],
    ["--weights", "ternary", "--ternary-storage", "int2", "--target", "qnn"],
    ["--ternary-storage", "int2"],
    ["--target", "ort-cpu", "--target", "tensorrt"],
    ["--equalize", "--relu6", "replace", "--target", "npu-pow2"],
    ["--bias-correction", "bn"],
    ["--bias-absorb", "bn"],
    ["--bias-correction", "data", "--bias-tuning", "--stats-tuning"],
    ["--calib-method", "entropy", "--activations", "int8"],
    ["--calib-method", "percentile", "--percentile", "100"],
    ["--calib-method", "mse", "--scale", "pow2"],
    ["--no-validate", "--allow-degraded"],
    ["--allow-degraded", "--set", "validation.min_cosine=1.5"],
    ["--no-validate", "--set", "validation.min_cosine=1.5"],
    ["--add-inputs", "residual", "--target", "qnn"],
    ["--add-inputs", "sum"],
]

NO_OPS = [
    ["--iters", "5"],
    ["--device", "cuda"],
    ["--device", "cuda:7"],
    ["--device", "tpu"],
    ["--device", ""],
    ["--learn-weight-scale"],
    ["--drop-prob", "0.3"],
    ["--mrecg-k", "2"],
    ["--fisher"],
    ["--augment", "3"],
    ["--ternary-method", "twn"],
    ["--percentile", "50"],
    ["--round-weight", "0"],
    ["--schedule", "paper"],
    ["--adaquant-mode", "parallel"],
    ["--recon-order", "two-pass"],
    ["--size-budget", "0.5"],
    ["--mp-widths", "8,4"],
    ["--keep-checkpoint"],
    ["--add-inputs", "residual"],
    ["--add-inputs", "all", "--target", "tensorrt"],
]

NUMBERS = [
    ["--seed", "99999999999999999999999"],
    ["--seed", "-1"],
    ["--seed", "-99999999999999999999"],
    ["--seed", str(2 ** 63)],
    ["--seed", str(2 ** 64)],
    ["--seed", "abc"],
    ["--seed", "1e3"],
    ["--seed", ""],
    ["--iters", "abc"],
    ["--iters", "1.5"],
    ["--percentile", "abc"],
    ["--percentile", "150", "--calib-method", "percentile"],
    ["--percentile", "-1", "--calib-method", "percentile"],
    ["--percentile", "nan", "--calib-method", "percentile"],
    ["--percentile", "inf", "--calib-method", "percentile"],
    ["--percentile", "0", "--calib-method", "percentile"],
    ["--batch-size", "abc"],
    ["--calib-samples", "1000000000"],
    ["--calib-samples", "1.5"],
    ["--round-weight", "nan"],
    ["--mp-widths", "abc"],
    ["--mp-widths", ""],
    ["--mixed-precision", "--size-budget", "0"],
    ["--mixed-precision", "--size-budget", "-1"],
    ["--mixed-precision", "--size-budget", "nan"],
    ["--mixed-precision", "--size-budget", "1e308"],
    ["--mixed-precision", "--bops-budget", "0.01"],
    ["--mixed-precision", "--max-degradation", "inf"],
    ["--mixed-precision", "--mp-widths", "8,3"],
    ["--mixed-precision", "--mp-widths", "8,8,8"],
    ["--mixed-precision", "--mp-holdout", "0", "--size-budget", "0.5"],
    ["--mixed-precision", "--mp-holdout", "100000", "--size-budget", "0.5"],
    ["--mixed-precision"],
    ["--max-chain", "0"],
    ["--max-chain", "-1"],
]

LEARNED_NUMBERS = [
    ["--iters", "0"],
    ["--iters", "-5"],
    ["--recon-batch-size", "0"],
    ["--recon-samples", "0"],
    ["--round-lr", "-1"],
    ["--round-lr", "nan"],
    ["--round-weight", "inf"],
    ["--drop-prob", "2"],
    ["--act-iters", "-1"],
    ["--augment", "-2"],
    ["--device", "cuda"],
    ["--device", "cuda:7"],
    ["--device", "meta"],
    ["--learn-weight-scale"],
    ["--fisher"],
    ["--max-chain", "0"],
    ["--seed", "99999999999999999999999"],
]

EXCLUDES = [
    ["--exclude", "no_such_node"],
    ["--exclude"],
    ["--exclude", "conv", "fc"],
    ["--exclude", "Conv", "Gemm", "Relu", "GlobalAveragePool"],
    ["--exclude", ""],
    ["--exclude", "*"],
    ["--exclude", "conv", "--exclude", "fc"],
    ["--set", "exclude=5"],
    ["--set", 'exclude=["conv", 3]'],
]

SETS = [
    ["--set", "foo.bar=1"],
    ["--set", "rounding.nonexistent=1"],
    ["--set", "foo"],
    ["--set", "=1"],
    ["--set", "a..b=1"],
    ["--set", "rounding.method=nope"],
    ["--set", "weights.bits=3"],
    ["--set", 'weights.bits="8"'],
    ["--set", "weights.bits=8.5"],
    ["--set", "weights.bits=true"],
    ["--set", "weights=5"],
    ["--set", "seed=-1"],
    ["--set", "seed=99999999999999999999999"],
    ["--set", "seed=nan"],
    ["--set", "validation.min_cosine=abc"],
    ["--set", "validation.min_cosine=nan"],
    ["--set", "validation.enabled=maybe"],
    ["--set", "validation.holdout_fraction=1.0"],
    ["--set", "validation.holdout_fraction=-0.5"],
    ["--set", "validation.holdout_min=0"],
    ["--set", "engine.cache_budget_mb=-1"],
    ["--set", "engine.cache_budget_mb=0"],
    ["--set", "calibration.samples=0"],
    ["--set", "calibration.method=[1, 2]"],
    ["--set", "rounding=[]"],
    ["--set", "opset=7"],
    ["--set", "opset=99"],
    ["--set", "opset=-1"],
    ["--set", "target=gpu"],
    ["--set", "kernels=fast"],
    ["--set", "scale=pow3"],
    ["--set", "activations.bits=16"],
    ["--set", "activations.dtype=int16"],
    ["--set", "weights.per_channel=false", "--set", "weights.symmetric=false"],
    ["--set", "float_phase.fold_batchnorm=false"],
    ["--set", "rounding.method=adaround"],
    ["--set", "weights.bit_plan={conv=3}"],
    ["--set", "weights.bit_plan=[1]"],
    ["--set", "mixed_precision.widths=[]"],
    ["--set", "rounding.damping=-1", "--method", "gptq"],
    ["--set", "rounding.damping=nan", "--method", "gptq"],
]

PRESETS = [
    ["--preset", "nope"],
    ["--preset", ""],
    ["--preset", "../w8a8"],
    ["--preset", "W8A8"],
    ["--preset", "w8a8-tensorrt"],
    ["--preset", "npu-pow2"],
    ["--preset", "w4a8-fast", "--method", "rtn"],
    ["--preset", "w2a4", "--method", "rtn", "--schedule", "fast"],
    ["--preset", "w8a8", "--preset", "w4a4", "--method", "rtn"],
]

MISC = [
    ["--frobnicate"],
    ["extra_positional.onnx"],
    ["-o", "other.onnx"],
    ["--help-all"],
    ["-h"],
    ["--print-config"],
    ["--print-config", "--set", "weights.bits=3"],
    ["--print-config", "--seed", "99999999999999999999999"],
    ["--recipe", "imagenet"],
    ["--recipe", "resize=abc"],
    ["--method", "gptq", "--weights", "int4"],
    ["--weights", "int2"],
    ["--weights", "ternary"],
    ["--weights", "ternary", "--ternary-method", "mquant"],
    ["--activation-bits", "4"],
    ["--target", "qnn"],
    ["--target", "qnn-a16"],
    ["--target", "openvino"],
    ["--target", "npu-pow2"],
    ["--equalize", "--bias-correction", "data"],
    ["--calib-method", "entropy"],
    ["--calib-method", "mse", "--weight-method", "mse"],
]


def _config_case(cid: str, content: bytes | None, name: str = "c.toml", fast: bool = False) -> Case:
    files = {} if content is None else {name: content}
    return Case(cid, flags_build(["--config", name], files=files), fast=fast)


CONFIGS = [
    _config_case("config-missing", None),
    _config_case("config-malformed", b"[rounding\nmethod = ", fast=True),
    _config_case("config-binary", bytes(range(256))),
    _config_case("config-empty", b""),
    _config_case("config-is-folder", b"<dir>"),
    _config_case("config-unknown-table", b"[nonsense]\nx = 1\n"),
    _config_case("config-unknown-key", b"[weights]\nbitz = 4\n"),
    _config_case("config-wrong-type", b'[weights]\nbits = "eight"\n'),
    _config_case("config-rounding-not-table", b'rounding = "rtn"\n'),
    _config_case("config-negative-iters", b'[rounding]\nmethod = "adaround"\niters = -5\n'),
    _config_case("config-huge-int", b"seed = 99999999999999999999999\n"),
    _config_case("config-nan", b"[validation]\nmin_cosine = nan\n"),
    _config_case("config-json", b'{"weights": {"bits": 4}}'),
    _config_case("config-utf16", "seed = 1\n".encode("utf-16")),
    _config_case("config-bom", b"\xef\xbb\xbfseed = 1\n"),
    _config_case("config-checkpoint-dir-dot", b'[engine]\ncheckpoint_dir = "."\n'),
]


def _slug(words: list[str]) -> str:
    text = "_".join(w.strip("-").replace("=", "-").replace(".", "") for w in words) or "none"
    text = "".join(ch if ch.isalnum() or ch in "_-" else "" for ch in text)
    return text[:60] or "blank"


def _cases(prefix: str, groups: list[list[str]], fast_first: bool = False, **kw: object) -> list[Case]:
    out, seen = [], set()
    for k, words in enumerate(groups):
        cid = f"{prefix}-{_slug(words)}"
        while cid in seen:
            cid += "_"
        seen.add(cid)
        out.append(_c(cid, words, fast=fast_first and k == 0, **kw))
    return out


CASES: list[Case] = [
    *_cases("flags-contra", CONTRADICTIONS, fast_first=True),
    *_cases("flags-noop", NO_OPS, fast_first=True),
    *_cases("flags-num", NUMBERS),
    *[_learned(f"flags-learned-{_slug(w)}", w) for w in LEARNED_NUMBERS],
    *_cases("flags-exclude", EXCLUDES),
    *_cases("flags-set", SETS, fast_first=True),
    *_cases("flags-preset", PRESETS),
    *_cases("flags-misc", MISC),
    *CONFIGS,
    Case("flags-verbose-ok", lambda d: ["-vv", *flags_build([])(d)]),
    Case("flags-verbose-error", lambda d: ["-v", *flags_build(["--set", "foo.bar=1"])(d)]),
    Case("flags-no-subcommand", lambda d: []),
    Case("flags-quantize-no-args", lambda d: ["quantize"]),
    Case("flags-quantize-no-output", lambda d: (write_base(d), ["quantize", "m.onnx", "--calib", "d.npz"])[1]),
    Case("flags-quantize-no-calib", lambda d: (write_base(d), ["quantize", "m.onnx", "-o", "out.onnx"])[1]),
    Case("flags-presets", lambda d: ["presets"]),
    _learned("flags-learned-brecq-long", ["--schedule", "long", "--iters", "3"], method="brecq"),
    _learned("flags-learned-qdrop", ["--drop-prob", "0.0"], method="qdrop"),
    _learned("flags-learned-adaquant-parallel", ["--adaquant-mode", "parallel"], method="adaquant"),
    _learned("flags-learned-mrecg-k-99", ["--mrecg-k", "99"], method="mrecg"),
]

#: groups of words the Hypothesis test combines at random (test_fuzz_flags.py)
POOL: list[list[str]] = [*CONTRADICTIONS, *NO_OPS, *NUMBERS[:8], *EXCLUDES[:4], *SETS[:12], *MISC[8:]]
