"""Command line: ``onnxq quantize | inspect | validate | check | presets``. Parses arguments, builds the
configuration, and calls the API only.

The configuration of ``quantize`` and ``inspect`` comes in layers, each over the one before: the
defaults, ``--preset NAME``, ``--config FILE`` (TOML), the flags of :mod:`onnxq.config.flags`, and
``--set SECTION.FIELD=VALUE``. ``--print-config`` shows the resolved result as TOML.

A user mistake (:class:`UserError`), or a file the operating system refuses, prints one line
``onnxq: error: ...`` and exits with status 2, before any heavy work where it can be known then
(outputs are checked against every input, the checkpoint folder against files onnxq did not write).
A failed validation exits 1 without writing the model. An internal error prints one line with the
path of a file holding its traceback and exits 3; a failed run leaves no new files or folders
(except a reconstruction checkpoint, kept to resume).
``onnxq check`` exits 0 when the model obeys the target, 1 with one line per violation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxq.config import Config
from onnxq.config.choices import DEFAULT_ROUNDING, RUNTIMES, UNTRAINED_ROUNDING
from onnxq.config.flags import FLAGS, Flag, flag_layer
from onnxq.errors import UserError

log = logging.getLogger("onnxq")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``onnxq: error: ...``, exit status 2), like every other mistake."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"onnxq: error: {message}\n")


def _parser(show_all: bool = False) -> argparse.ArgumentParser:
    p = _Parser(prog="onnxq", description="Post-training quantization of ONNX models to QDQ.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a float ONNX model to QDQ",
                       description="Quantize a float ONNX model to QDQ. --help-all lists every flag; any setting "
                                   "can also be given with --set SECTION.FIELD=VALUE or in a --config TOML file.")
    q.add_argument("model", nargs="?", help="input .onnx file (never modified)")
    q.add_argument("-o", "--output", help="output .onnx file (a .report.json is written next to it)")
    _add_calib_args(q, flag="--calib", show_all=show_all)
    q.add_argument("--validation", default=None,
                   help="held-out data for the fidelity check (default: part of --calib)" if show_all
                   else argparse.SUPPRESS)
    _add_config_args(q)
    q.add_argument("--exclude", nargs="*", default=None, help="node names or op types to keep in float")
    q.add_argument("--no-validate", action="store_true", help="skip the onnxruntime validation")
    q.add_argument("--allow-degraded", action="store_true",
                   help="write the model even when validation fails (by default it is not written)")
    q.add_argument("--print-config", action="store_true", help="print the resolved configuration as TOML and exit")
    q.add_argument("--help-all", action="store_true", help="show every flag")
    _add_flags(q, show_all)

    i = sub.add_parser("inspect", help="list ops, what will be quantized and why not")
    i.add_argument("model")
    _add_config_args(i)
    for name in ("--target", "--weights"):
        _add_flag(i, next(f for f in FLAGS if f.name == name), True)
    i.add_argument("--max-chain", type=int, default=None, help="longest chain of plain layers in one block")
    i.add_argument("--json", action="store_true", help="print the plan as JSON")

    v = sub.add_parser("validate", help="compare a quantized model with its float original in onnxruntime")
    v.add_argument("float_model")
    v.add_argument("quant_model")
    _add_calib_args(v, flag="--data", show_all=True)
    v.add_argument("--json", default=None, help="also write the report to this JSON file")
    v.add_argument("--runtime", choices=RUNTIMES, default="ort-cpu",
                   help="what runs the model: ort-cpu (judge onnxruntime's fused kernels) or qdq (another runtime "
                        "executes the QDQ graph: judge the simulation)")
    v.add_argument("--not-portable", action="store_true",
                   help="accept weights that saturate onnxruntime's int8 kernels on x86 CPUs without VNNI")
    v.add_argument("--min-top1", type=float, default=None, help="floor of top-1 agreement with the float model")
    v.add_argument("--min-cosine", type=float, default=None, help="floor of cosine with the float model")

    c = sub.add_parser("check", help="check a QDQ model (any tool's) against a target profile's rules")
    c.add_argument("model")
    c.add_argument("--target", required=True, help="target profile: " + ", ".join(_target_names()))
    c.add_argument("--json", action="store_true", help="print the violations as JSON")

    sub.add_parser("presets", help="list the named configurations of --preset")
    return p


def _target_names() -> tuple[str, ...]:
    from onnxq.config.flags import TARGET_NAMES

    return TARGET_NAMES


def _add_calib_args(p: argparse.ArgumentParser, *, flag: str, show_all: bool) -> None:
    p.add_argument(flag, dest="data", help="calibration data: .npz (keys = input names), .npy, or a folder of images")
    p.add_argument("--recipe", default=None,
                   help="image preprocessing: a preset (imagenet, efficientnet-lite, raw) or "
                        "'resize=256,crop=224,scale=255,mean=...,std=...,layout=NCHW,order=RGB'")
    p.add_argument("--batch-size", type=int, default=1,
                   help="samples per batch for file data (default: 1)" if show_all else argparse.SUPPRESS)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="a named configuration (onnxq presets lists them)")
    p.add_argument("--config", default=None, metavar="FILE", help="a TOML configuration; flags override it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set any configuration field, e.g. rounding.iters=600 (repeatable)")


def _add_flags(p: argparse.ArgumentParser, show_all: bool) -> None:
    for flag in FLAGS:
        _add_flag(p, flag, show_all or flag.common)


def _add_flag(p: argparse.ArgumentParser, flag: Flag, shown: bool) -> None:
    text = argparse.SUPPRESS
    if shown:
        default = _default_text(flag)
        text = flag.help + (f" (default: {default})" if default is not None else "")
    dest = "flag" + flag.name.replace("-", "_")
    if flag.switch:
        p.add_argument(flag.name, dest=dest, action="store_const", const=True, default=None, help=text)
    else:
        metavar = flag.metavar or (None if flag.choices else flag.name.lstrip("-").upper().replace("-", "_"))
        p.add_argument(flag.name, dest=dest, type=flag.type, choices=flag.choices, default=None, help=text,
                       metavar=metavar)


#: Settings whose unset value the target decides (:meth:`onnxq.targets.profiles.Target.resolve`).
_TARGET_CHOSEN = ("scale", "activations.dtype", "activations.bits", "activations.add_inputs")


def _default_text(flag: Flag) -> str | None:
    """The dataclass default behind ``flag`` as help text (a choice's name where the flag has choices that
    set several fields, e.g. --weights int8); None where there is no single default."""
    defaults = _defaults()
    if flag.choices and flag.to_settings:
        hits = [c for c in flag.choices if all(_lookup(defaults, p) == v for p, v in flag.settings(c).items())]
        return str(hits[0]) if hits else None
    value = _lookup(defaults, flag.path)
    if value is None:
        return "the target's choice" if flag.path in _TARGET_CHOSEN else None
    return str(value).lower() if isinstance(value, bool) else str(value)


def _defaults() -> dict[str, Any]:
    """The defaults of every field: the config's, and the learned rounding methods' (e.g. the schedule)."""
    from onnxq.config.rounding import BRECQ, AdaQuant, QDrop, rounding_to_dict

    rounding: dict[str, Any] = {}
    for kind in (AdaQuant, QDrop, BRECQ):
        rounding.update(rounding_to_dict(kind()))
    return {**Config().to_dict(), "rounding": {**rounding, "method": DEFAULT_ROUNDING}}


def _lookup(values: Any, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(values, dict) or key not in values:
            return None
        values = values[key]
    return values


# ---------------------------------------------------------------------------- configuration
def build_config(args: argparse.Namespace) -> Config:
    """The layers defaults < preset < --config < flags < --set, as one :class:`Config`."""
    from onnxq.config.files import load_toml, merge, nested, parse_override
    from onnxq.config.presets import preset

    layer: dict[str, Any] = {}
    if args.preset:
        layer = merge(layer, preset(args.preset))
    if args.config:
        layer = merge(layer, load_toml(args.config))
    given = {f.name: getattr(args, "flag" + f.name.replace("-", "_"), None) for f in FLAGS}
    layer = merge(layer, flag_layer({k: v for k, v in given.items() if v is not None}))
    if getattr(args, "exclude", None) is not None:  # with --float-plan: both lists
        layer = merge(layer, {"exclude": list(dict.fromkeys([*layer.get("exclude", []), *args.exclude]))})
    if getattr(args, "no_validate", False):
        layer = merge(layer, {"validation": {"enabled": False}})
    for text in args.set:
        path, value = parse_override(text)
        layer = merge(layer, nested(path, value))
    return Config.from_dict(layer)


def _with_checkpoint(config: Config, out: Path) -> Config:
    """A learned method without a checkpoint folder keeps one next to the output (``<output>.ckpt``)."""
    if config.method in UNTRAINED_ROUNDING or config.engine.checkpoint_dir:
        return config
    return config.replace(engine=dataclasses.replace(config.engine, checkpoint_dir=str(out) + ".ckpt"))


def _input_files(args: argparse.Namespace) -> list[Path]:
    """Every file the command reads: models (with their external data), data files, a config file."""
    from onnxq.core.graph import model_files

    files: list[Path] = []
    for name in ("model", "float_model", "quant_model"):
        if getattr(args, name, None):
            files += model_files(getattr(args, name))
    for name in ("data", "validation", "config"):
        value = getattr(args, name, None)
        if value and Path(value).is_dir():
            files += [p for p in Path(value).rglob("*") if p.is_file()]
        elif value:
            files.append(Path(value))
    return files


def _output_guard(outputs: dict[str, Path], args: argparse.Namespace, config: Config | None = None):
    """Check ``outputs`` against the inputs and the checkpoint folder, create their folders."""
    from onnxq.blocks.checkpoint import check_folder
    from onnxq.core.files import OutputGuard

    guard = OutputGuard(outputs, _input_files(args))
    if config is not None and config.engine.checkpoint_dir:
        check_folder(config.engine.checkpoint_dir)
    guard.prepare()
    return guard


def _recipe(text: str | None):
    if text is None:
        return None
    from onnxq.data.loaders import ImageRecipe

    return ImageRecipe.from_string(text)


def _quantize(args: argparse.Namespace) -> int:
    if args.help_all:
        _parser(show_all=True).parse_args(["quantize", "--help"])  # exits 0 after printing
    config = build_config(args)
    if args.print_config:
        from onnxq.config.files import to_toml
        from onnxq.targets.profiles import resolve_config

        sys.stdout.write(to_toml(resolve_config(config)))
        return 0
    if not args.model:
        raise UserError("quantize needs a model: onnxq quantize MODEL.onnx -o OUTPUT.onnx --calib DATA")
    if not args.output:
        raise UserError("quantize needs an output path: add -o OUTPUT.onnx")
    if not args.data:
        raise UserError("quantize needs calibration data: add --calib FILE_OR_FOLDER")
    out = Path(args.output)
    if out.suffix != ".onnx":
        raise UserError(f"output path {out} should end in .onnx")
    config = _with_checkpoint(config, out)
    from onnxq.api import quantize
    from onnxq.pipeline.result import output_files

    guard = _output_guard(output_files(out), args, config)
    try:
        result = quantize(args.model, args.data, config, validation=args.validation,
                          recipe=_recipe(args.recipe), batch_size=args.batch_size)
        val = result.validation
        problem = val.reason if val is not None and not val.ok else result.report.get("nothing_quantized")
        if problem and not args.allow_degraded:
            if val is not None:
                sys.stdout.write(val.summary() + "\n")
            what = "validation failed" if val is not None and not val.ok else "nothing to quantize"
            sys.stderr.write(f"onnxq: error: {what}, {out} not written: {problem} (or pass "
                             "--allow-degraded to write it anyway)\n")
            guard.abandon()
            return 1
        path = result.save(out)
    except BaseException:
        from onnxq.blocks.checkpoint import release_if_unused

        release_if_unused(config.engine.checkpoint_dir)
        guard.abandon()
        raise
    if result.bit_plan is not None:
        p = result.bit_plan
        sys.stdout.write(f"wrote {result.bit_plan_path(path)}: size ratio {p.size_ratio:.4f}, bops ratio "
                         f"{p.bops_ratio:.4f}, predicted {p.measure} {p.degradation:.4g}, widths "
                         f"{p.to_dict()['predicted']['layers_per_width']}\n")
    if result.float_plan is not None:
        t = result.report["accuracy_target"]
        sys.stdout.write(f"wrote {output_files(path)['float plan']}: {len(result.float_plan.nodes)} ops kept float, "
                         f"drop ({t['metric']}) {t['drop']['quantized']} -> {t['drop']['planned']} on the search "
                         f"samples, {t['drop']['validation']} on the validation samples (--max-drop {t['max_drop']})\n")
    sys.stdout.write(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) and {output_files(path)['report']}\n")
    if result.validation is not None:
        sys.stdout.write(result.validation.summary() + "\n")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from onnxq.pipeline.inspect import format_plan, inspect_model

    config = build_config(args)
    max_chain = args.max_chain
    if max_chain is not None and hasattr(config.rounding, "max_chain"):
        config = config.replace(rounding=dataclasses.replace(config.rounding, max_chain=max_chain))
    plan = inspect_model(args.model, config, max_chain=max_chain if max_chain is not None else 3)
    if args.json:
        sys.stdout.write(json.dumps(plan, indent=2) + "\n")
    else:
        sys.stdout.write(format_plan(plan) + "\n")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from onnxq.core.files import atomic_write_text
    from onnxq.core.graph import load_model
    from onnxq.data.loaders import load_calibration, model_inputs
    from onnxq.report.validate import report_path, validate, write_report

    if not args.data:
        raise UserError("validate needs data: add --data FILE_OR_FOLDER")

    outputs = {"JSON report": Path(args.json)} if args.json else {"report": report_path(args.quant_model)}
    guard = _output_guard(outputs, args)
    try:
        float_model = load_model(args.float_model)
        quant_model = load_model(args.quant_model)
        feeds = load_calibration(args.data, model_inputs(float_model), recipe=_recipe(args.recipe),
                                 batch_size=args.batch_size)
        criteria = _validate_criteria(args)
        report = validate(float_model, quant_model, feeds, criteria=criteria)
        sys.stdout.write(report.summary() + "\n")
        if args.json:
            atomic_write_text(args.json, json.dumps(report.to_dict(), indent=2))
        else:
            write_report(report.to_dict(), args.quant_model)
    except BaseException:
        guard.abandon()
        raise
    return 0 if report.ok else 1


def _validate_criteria(args: argparse.Namespace):
    """The validator's criteria from ``onnxq validate``'s flags (defaults: :class:`onnxq.config.Validation`)."""
    from onnxq.config import Validation
    from onnxq.report.verdict import Criteria

    defaults = Validation()
    try:
        floors = Validation(min_top1_agreement=defaults.min_top1_agreement if args.min_top1 is None else args.min_top1,
                            min_cosine=defaults.min_cosine if args.min_cosine is None else args.min_cosine)
    except UserError as exc:
        raise UserError(str(exc).replace("validation.min_top1_agreement", "--min-top1")
                        .replace("validation.min_cosine", "--min-cosine")) from None
    return Criteria(min_top1_agreement=floors.min_top1_agreement, min_cosine=floors.min_cosine,
                    levels_max_gap=floors.levels_max_gap, runtime=args.runtime, portable=not args.not_portable)


def _check(args: argparse.Namespace) -> int:
    from onnxq.core.graph import load_model
    from onnxq.targets.profiles import get_target
    from onnxq.targets.rules import check_target

    target = get_target(args.target)
    violations = check_target(load_model(args.model), target)
    if args.json:
        rows = [{"rule": v.rule, "node": v.node, "message": v.message} for v in violations]
        sys.stdout.write(json.dumps({"target": target.name, "ok": not violations, "violations": rows},
                                    indent=2) + "\n")
    elif violations:
        sys.stdout.write("".join(f"{v}\n" for v in violations))
    else:
        sys.stdout.write(f"{args.model}: ok for target {target.name}\n")
    return 1 if violations else 0


def _presets(args: argparse.Namespace) -> int:
    from onnxq.config.presets import preset_description, preset_names

    names = preset_names()
    width = max(map(len, names), default=0)
    for name in names:
        sys.stdout.write(f"{name:{width}s}  {preset_description(name)}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a one-line usage error (_Parser.error)
        return int(exc.code or 0)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    handlers = {"quantize": _quantize, "inspect": _inspect, "validate": _validate, "check": _check,
                "presets": _presets}
    previous = _terminate_cleanly()
    try:
        return handlers[args.command](args)
    except _Terminated:
        sys.stderr.write("onnxq: terminated (SIGTERM); run the same command again to resume\n")
        return 143
    except UserError as exc:
        sys.stderr.write(f"onnxq: error: {' '.join(str(exc).split())}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("onnxq: interrupted\n")
        return 130
    except SystemExit as exc:  # --help-all
        return int(exc.code or 0)
    except BrokenPipeError:  # the reader of our output went away (onnxq presets | head): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # the disk, not onnxq: a full disk, a folder made read-only mid-run, ...
        where = f" {exc.filename}" if exc.filename else ""
        sys.stderr.write(f"onnxq: error: cannot access{where}: {exc.strerror or exc}: check the path, "
                         "its permissions and free space\n")
        return 2
    except Exception as exc:  # an onnxq bug: one line, the traceback kept in a file for the report
        sys.stderr.write(f"onnxq: internal error ({type(exc).__name__}: {_first_line(exc)}); the traceback "
                         f"is in {_save_traceback(exc)}: please report it\n")
        return 3
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that temporary files and new folders are cleaned up."""


def _terminate_cleanly():
    """Turn SIGTERM into :class:`_Terminated` (main thread only); returns the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise _Terminated()

    return signal.signal(signal.SIGTERM, handler)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "no message")[:200]


def _save_traceback(exc: BaseException) -> str:
    """Write the traceback of ``exc`` to a new file in the temp folder; returns its path."""
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="onnxq-error-", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(f"onnxq {' '.join(sys.argv[1:])}\n\n")
        fh.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return path


def run() -> typing.NoReturn:
    """The ``onnxq`` command: :func:`main`, then exit with its status. Once the status is decided, a
    late Ctrl-C no longer turns a finished run (or a one-line error) into a signal exit."""
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    run()
