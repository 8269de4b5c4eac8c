"""Command line: ``onnxq quantize | inspect | validate | check``. Parses arguments and calls the API only.

A user mistake (:class:`UserError`) prints one line ``onnxq: error: ...`` and exits with status 2.
``onnxq check`` exits 0 when the model obeys the target, 1 with one line per violation.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from onnxq.config.legacy import (
    CALIB_METHODS,
    MP_RECONSTRUCT,
    RECON_METHODS,
    SCHEDULES,
    TERNARY_STORAGES,
    QuantConfig,
)
from onnxq.errors import UserError
from onnxq.ternary.operators import ALIASES, METHODS, MQUANT_DEFAULT

log = logging.getLogger("onnxq")

_TARGET_NAMES = "ort-cpu, tensorrt, openvino, qnn, qnn-a16, npu-pow2"
WEIGHT_BITS_OF = {"int8": 8, "int4": 4, "int2": 2, "ternary": 2}
WEIGHT_CHOICES = tuple(WEIGHT_BITS_OF)
TERNARY_CHOICES = (*METHODS, *ALIASES)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onnxq", description="Post-training quantization of ONNX models to QDQ.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a float ONNX model to QDQ")
    q.add_argument("model", help="input .onnx file (never modified)")
    q.add_argument("-o", "--output", required=True, help="output .onnx file (a .report.json is written next to it)")
    q.add_argument("--target", default="ort-cpu", help=f"target profile: {_TARGET_NAMES} (default: ort-cpu)")
    q.add_argument("--weights", choices=WEIGHT_CHOICES, default="int8",
                   help="weight type: int8, int4, int2 (4-level grid [-2, 1] with per-channel zero-points, "
                        "ort-cpu) or ternary ({-1, 0, 1} x per-channel scale; default: int8)")
    q.add_argument("--ternary-method", default="rtn", metavar="{" + ",".join(TERNARY_CHOICES) + "}",
                   help="ternary operator for --weights ternary: rtn, twn, tquant, mquant-a, mquant-b; "
                        f"mquant = {MQUANT_DEFAULT} (the variant with the lower weight error on EfficientNet-Lite0; "
                        "default: rtn)")
    q.add_argument("--ternary-storage", choices=TERNARY_STORAGES, default="auto",
                   help="container of 2-bit codes (ternary or int2): int2 (opset 25), int4 (opset 21), int8, or auto (the "
                        "narrowest the target allows; default: auto)")
    q.add_argument("--learn-weight-scale", action="store_true",
                   help="reconstruction also learns the per-channel weight scales (LSQ), from the operator's")
    q.add_argument("--activations", choices=("uint8", "int8"), default=None,
                   help="activation type: uint8 asymmetric or int8 symmetric (default: the target's choice)")
    q.add_argument("--scale", choices=("float", "pow2"), default=None,
                   help="scale kind (default: the target's choice)")
    q.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor instead of per channel")
    q.add_argument("--first-last", choices=("8", "same"), default="8",
                   help="bits of the first and last weighted layers when --weights int4/int2/ternary (default: 8)")
    _add_calib_args(q, required=True)
    q.add_argument("--calib-method", choices=CALIB_METHODS, default="minmax", help="activation range method")
    q.add_argument("--weight-method", choices=("minmax", "mse"), default="minmax", help="weight range method")
    q.add_argument("--weight-asymmetric", action="store_true",
                   help="per-channel asymmetric weights with zero-points (BRECQ/QDrop's quantizers; ort-cpu only)")
    q.add_argument("--percentile", type=float, default=99.999, help="for --calib-method percentile")
    q.add_argument("--calib-samples", type=int, default=None, help="use at most this many calibration samples")
    q.add_argument("--validation", default=None, help="held-out data for the fidelity check (default: part of --calib)")
    q.add_argument("--exclude", nargs="*", default=(), help="node names or op types to keep in float")
    q.add_argument("--no-validate", action="store_true", help="skip the onnxruntime validation")
    q.add_argument("--activation-bits", type=int, choices=(8, 4), default=8,
                   help="activation bit width (4: stored as QCDQ in 8-bit containers; default 8)")
    q.add_argument("--seed", type=int, default=0)
    f = q.add_argument_group("data-free quantization (DFQ)")
    f.add_argument("--equalize", action="store_true", help="cross-layer equalization of Conv/Gemm pairs")
    f.add_argument("--relu6", choices=("skip", "replace"), default="skip",
                   help="equalization across ReLU6: skip the pair, or replace ReLU6 by Relu (changes the model)")
    f.add_argument("--bias-absorb", choices=("bn", "data"), default=None, help="high-bias absorption across Relu")
    f.add_argument("--bias-correction", choices=("data", "bn"), default=None,
                   help="correct the output shift that weight rounding causes")
    r = q.add_argument_group("reconstruction (torch engine)")
    r.add_argument("--method", choices=RECON_METHODS, default="rtn",
                   help="rtn (round to nearest), adaround (layer-wise), brecq (block-wise), qdrop, adaquant "
                        "(layer-wise weights, bias and ranges), mrecg (brecq/qdrop on merged neighbour blocks)")
    r.add_argument("--schedule", choices=SCHEDULES, default="fast",
                   help="fast: sized for a 2-core CPU (300 iterations a block); long: 1000 iterations on "
                        "each calibration image and 3 views of it (W4A8 EfficientNet-Lite0: 25 min, 10.2 GB "
                        "on 2 cores); paper: 20k iterations, batch 32, 1024 samples")
    r.add_argument("--iters", type=int, default=None, help="iterations per block (overrides the schedule)")
    r.add_argument("--recon-batch-size", type=int, default=None, help="mini-batch size (overrides the schedule)")
    r.add_argument("--recon-samples", type=int, default=None,
                   help="calibration samples cached per block (overrides the schedule)")
    r.add_argument("--fisher", action="store_true", help="weight the block error by the diagonal Fisher")
    r.add_argument("--round-weight", type=float, default=None, metavar="LAMBDA",
                   help="AdaRound regulariser weight (default: 10 with the fast and long schedules, "
                        "0.01 with paper)")
    r.add_argument("--round-lr", type=float, default=None, metavar="LR",
                   help="Adam learning rate of the rounding variables (default: 5e-2 with fast and long, "
                        "1e-3 with paper)")
    r.add_argument("--act-iters", type=int, default=None, metavar="N",
                   help="brecq: activation step-size iterations per block (default: 0 with 8-bit "
                        "activations on the fast and long schedules, else a quarter of --iters); 0 keeps the "
                        "calibrated ranges")
    r.add_argument("--augment", type=int, default=None, metavar="K",
                   help="fit the rounding on K augmented views of every calibration image too (a flip, then "
                        "random resized crops); image models only (default: 3 on the long schedule, "
                        "else 0)")
    r.add_argument("--drop-prob", type=float, default=0.5, help="QDrop: probability of keeping an element float")
    r.add_argument("--weight-phase-inputs", choices=("quantized", "weights-only"), default=None,
                   help="block inputs of the adaround/brecq weight phase (default: weights-only, or "
                        "quantized for interleaved brecq)")
    r.add_argument("--recon-order", choices=("interleaved", "two-pass"), default=None,
                   help="brecq: as BRECQ's reference, all weights first, then all activation steps "
                        "(two-pass, the default with 8-bit activations), or each block's steps right after "
                        "its weights (interleaved, the default with 4-bit activations)")
    r.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    r.add_argument("--max-chain", type=int, default=3, help="longest chain of plain layers in one block")
    r.add_argument("--checkpoint-dir", default=None,
                   help="where finished blocks are saved to resume an interrupted run (default: OUTPUT.ckpt)")
    r.add_argument("--keep-checkpoint", action="store_true",
                   help="keep the checkpoint after a finished run: a re-run with the same reconstruction "
                        "settings reuses it (e.g. to try --stats-tuning or --bias-tuning on top)")
    _add_adaquant_mrecg_args(r)
    _add_mixed_args(q)

    i = sub.add_parser("inspect", help="list ops, what will be quantized and why not")
    i.add_argument("model")
    i.add_argument("--target", default="ort-cpu")
    i.add_argument("--weights", choices=WEIGHT_CHOICES, default="int8")
    i.add_argument("--max-chain", type=int, default=3, help="longest chain of plain layers in one block")
    i.add_argument("--json", action="store_true", help="print the plan as JSON")

    v = sub.add_parser("validate", help="compare a quantized model with its float original in onnxruntime")
    v.add_argument("float_model")
    v.add_argument("quant_model")
    _add_calib_args(v, required=True, flag="--data")
    v.add_argument("--json", default=None, help="also write the report to this JSON file")

    c = sub.add_parser("check", help="check a QDQ model (any tool's) against a target profile's rules")
    c.add_argument("model")
    c.add_argument("--target", required=True, help=f"target profile: {_TARGET_NAMES}")
    c.add_argument("--json", action="store_true", help="print the violations as JSON")
    return p


def _add_calib_args(p: argparse.ArgumentParser, *, required: bool, flag: str = "--calib") -> None:
    p.add_argument(flag, dest="data", required=required,
                   help="calibration data: .npz (keys = input names), .npy, or a folder of images")
    p.add_argument("--recipe", default=None,
                   help="image preprocessing: a preset (imagenet, efficientnet-lite, raw) or "
                        "'resize=256,crop=224,scale=255,mean=...,std=...,layout=NCHW,order=RGB'")
    p.add_argument("--batch-size", type=int, default=1, help="samples per batch for file data (default: 1)")


def _recipe(text: str | None):
    if text is None:
        return None
    from onnxq.data.loaders import ImageRecipe

    return ImageRecipe.from_string(text)


def _quantize(args: argparse.Namespace) -> int:
    from onnxq.api import quantize

    out = Path(args.output)
    if out.exists() and out.resolve() == Path(args.model).resolve():
        raise UserError(f"output path {out} is the input model: choose another -o path")
    if out.suffix != ".onnx":
        raise UserError(f"output path {out} should end in .onnx")
    explicit = _explicit_target_options(args)
    if args.ternary_method not in TERNARY_CHOICES:
        raise UserError(f"--ternary-method {args.ternary_method!r} is unknown: use one of "
                        f"{', '.join(TERNARY_CHOICES)}")
    config = QuantConfig(
        target=args.target, weight_bits=WEIGHT_BITS_OF[args.weights], ternary_method=args.ternary_method,
        ternary_storage=args.ternary_storage, learn_weight_scale=args.learn_weight_scale,
        per_channel=not args.per_tensor,
        **explicit, calib_method=args.calib_method,
        weight_method=args.weight_method, **_weight_grid(args), percentile=args.percentile,
        calib_samples=args.calib_samples,
        first_last_bits=8 if args.first_last == "8" else None, exclude=tuple(args.exclude),
        validate=not args.no_validate, seed=args.seed, activation_bits=args.activation_bits,
        method=args.method, schedule=args.schedule, recon_iters=args.iters,
        recon_batch_size=args.recon_batch_size, recon_samples=args.recon_samples, fisher=args.fisher,
        recon_round_weight=args.round_weight, recon_round_lr=args.round_lr,
        recon_act_iters=args.act_iters, recon_augment=args.augment,
        drop_prob=args.drop_prob, device=args.device,
        weight_phase_inputs=args.weight_phase_inputs.replace("-", "_") if args.weight_phase_inputs else None,
        recon_order=args.recon_order.replace("-", "_") if args.recon_order else None,
        max_chain=args.max_chain, equalize=args.equalize,
        relu6=args.relu6, bias_absorb=args.bias_absorb, bias_correction=args.bias_correction,
        checkpoint_dir=args.checkpoint_dir or (str(out) + ".ckpt" if args.method != "rtn" else None),
        keep_checkpoint=args.keep_checkpoint,
        bit_plan=_bit_plan_arg(args), bias_tuning=args.bias_tuning, stats_tuning=args.stats_tuning,
        adaquant_mode=args.adaquant_mode, mrecg_base=args.mrecg_base, mrecg_k=_mrecg_k_arg(args.mrecg_k),
        mrecg_capacity=args.mrecg_capacity, mrecg_iters=args.mrecg_iters,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    budget = _budget_arg(args)
    if budget is None:
        result = quantize(args.model, args.data, config, validation=args.validation, recipe=_recipe(args.recipe),
                          batch_size=args.batch_size)
    else:
        result = _quantize_mixed(args, config, budget, out)
    path = result.save(out)
    sys.stdout.write(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) and {path.with_suffix('.report.json')}\n")
    if result.validation is not None:
        sys.stdout.write(result.validation.summary() + "\n")
    return 0


def _add_mixed_args(q: argparse.ArgumentParser) -> None:
    m = q.add_argument_group("mixed precision and tuning after quantization")
    m.add_argument("--bit-plan", default=None, metavar="FILE",
                   help='per-layer weight widths, JSON {"layers": {"node name": 8|4|2, ...}} (e.g. a written '
                        "OUTPUT.bitplan.json); the named layers override --weights and --first-last")
    m.add_argument("--mixed-precision", action="store_true",
                   help="measure each layer's sensitivity, pick widths by integer programming under "
                        "--size-budget, --bops-budget or --max-degradation, quantize; writes OUTPUT.bitplan.json")
    m.add_argument("--size-budget", type=float, default=None, metavar="R",
                   help="weight size at most R times the all-8-bit weights (e.g. 0.55 ~ W4 with 8-bit first/last)")
    m.add_argument("--bops-budget", type=float, default=None, metavar="R",
                   help="bit operations (w bits x a bits x MACs) at most R times those of 8-bit weights")
    m.add_argument("--max-degradation", type=float, default=None, metavar="D",
                   help="the dual: the smallest model whose summed sensitivity increase is at most D")
    m.add_argument("--mp-widths", default="8,4,2", help="candidate weight widths (default: 8,4,2)")
    m.add_argument("--mp-measure", choices=("mse", "cosine", "fisher"), default="mse",
                   help="sensitivity measure: output MSE, 1 - cosine, or BRECQ's Fisher estimate (default: mse)")
    m.add_argument("--mp-reconstruct", choices=MP_RECONSTRUCT, default="rtn",
                   help="the sensitivity table's weights at each width: round to nearest (default) or "
                        "parallel AdaQuant per layer (CalibTIP; one AdaQuant pass per width, --iters long)")
    m.add_argument("--mp-holdout", type=int, default=None, metavar="N",
                   help="calibration samples held out to measure the sensitivity (default: a fifth, at most 64)")
    m.add_argument("--bias-tuning", action="store_true",
                   help="tune each layer's bias to the float output mean, layer by layer (after quantization)")
    m.add_argument("--stats-tuning", action="store_true",
                   help="restore each layer's per-channel output mean and std to the float model's")


def _add_adaquant_mrecg_args(r) -> None:
    """AdaQuant and MRECG options (values are checked by QuantConfig: a bad one is a one-line error)."""
    r.add_argument("--adaquant-mode", default="sequential", metavar="{parallel,sequential}",
                   help="--method adaquant: inputs from the model quantized so far (sequential, default) "
                        "or from the float model (parallel: layers independent)")
    r.add_argument("--mrecg-base", default="brecq", metavar="{brecq,qdrop}",
                   help="--method mrecg: the base reconstruction (default: brecq)")
    r.add_argument("--mrecg-k", default="4", metavar="K",
                   help="--method mrecg: merge the K adjacent block pairs with the largest capacity gaps "
                        "(default: 4)")
    r.add_argument("--mrecg-capacity", default="data", metavar="{data,proxy}",
                   help="--method mrecg: block losses of a first, shorter pass (data, default) or our "
                        "data-free proxy (relative weight quantization noise per block)")
    r.add_argument("--mrecg-iters", default=None, metavar="{per_unit,per_block}",
                   help="--method mrecg: every unit runs --iters (per_unit, the paper) or a merged unit of n "
                        "blocks runs n x --iters (per_block); default: per_block on the fast and long "
                        "schedules, per_unit on the paper's")


def _mrecg_k_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--mrecg-k {text!r} is not an integer: give the number of block pairs to merge, "
                        "e.g. 4") from None


def _bit_plan_arg(args: argparse.Namespace) -> tuple:
    if args.bit_plan is None:
        return ()
    if args.mixed_precision:
        raise UserError("--bit-plan and --mixed-precision exclude each other: mixed precision writes its own plan")
    from onnxq.mixed.plan import load_bit_plan

    return load_bit_plan(args.bit_plan)


def _budget_arg(args: argparse.Namespace):
    """The mixed-precision budget, or None without --mixed-precision."""
    flags = {"size": "--size-budget", "bops": "--bops-budget", "degradation": "--max-degradation"}
    given = {k: v for k, v in (("size", args.size_budget), ("bops", args.bops_budget),
                               ("degradation", args.max_degradation)) if v is not None}
    if not args.mixed_precision:
        if given:
            raise UserError(f"{flags[next(iter(given))]} needs --mixed-precision: add it")
        return None
    if len(given) != 1:
        raise UserError("--mixed-precision needs exactly one of --size-budget R, --bops-budget R, --max-degradation D")
    from onnxq.mixed.plan import Budget

    kind, value = next(iter(given.items()))
    return Budget(kind, value)


def _quantize_mixed(args: argparse.Namespace, config: QuantConfig, budget, out: Path):
    from onnxq.mixed.plan import quantize_mixed

    try:
        widths = tuple(int(w) for w in args.mp_widths.split(",") if w.strip())
    except ValueError:
        raise UserError(f"--mp-widths {args.mp_widths!r} is not a comma-separated list of widths: e.g. 8,4,2") from None
    mixed = quantize_mixed(args.model, args.data, config, budget=budget, widths=widths, measure=args.mp_measure,
                           holdout=args.mp_holdout, reconstruct=args.mp_reconstruct, validation=args.validation,
                           recipe=_recipe(args.recipe), batch_size=args.batch_size)
    plan_path = mixed.plan.save(out.with_suffix(".bitplan.json"))
    p = mixed.plan
    sys.stdout.write(f"wrote {plan_path}: size ratio {p.size_ratio:.4f}, bops ratio {p.bops_ratio:.4f}, "
                     f"predicted {p.measure} {p.degradation:.4g}, widths {p.to_dict()['predicted']['layers_per_width']}\n")
    return mixed.result


def _explicit_target_options(args: argparse.Namespace) -> dict[str, str]:
    """The --activations/--scale values the user gave; one the target forbids is a UserError."""
    from onnxq.targets.profiles import get_target

    target = get_target(args.target)
    given = {"activation_dtype": (args.activations, target.activation_dtypes),
             "scale_kind": (args.scale, target.scale_kinds)}
    for name, (value, allowed) in given.items():
        if value is not None and value not in allowed:
            flag = "--activations" if name == "activation_dtype" else "--scale"
            raise UserError(f"target {target.name} does not allow {flag} {value}: use "
                            f"{' or '.join(allowed)}, or leave {flag} out for the target's choice")
    if args.per_tensor and "tensor" not in target.weight_granularity:
        raise UserError(f"target {target.name} does not allow --per-tensor weights")
    return {name: value for name, (value, _) in given.items() if value is not None}


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


def _weight_grid(args: argparse.Namespace) -> dict[str, object]:
    """QuantConfig's int2_grid and weight_symmetric for --weights (int2 is the 4-level grid with
    zero-points) and --weight-asymmetric (quantize only)."""
    uniform = args.weights == "int2"
    return {"int2_grid": "uniform" if uniform else "ternary",
            "weight_symmetric": not (uniform or getattr(args, "weight_asymmetric", False))}


def _inspect(args: argparse.Namespace) -> int:
    from onnxq.pipeline.inspect import inspect_model

    plan = inspect_model(args.model, QuantConfig(target=args.target, weight_bits=WEIGHT_BITS_OF[args.weights],
                                                 max_chain=args.max_chain, **_weight_grid(args)))
    if args.json:
        sys.stdout.write(json.dumps(plan, indent=2) + "\n")
    else:
        from onnxq.pipeline.inspect import format_plan

        sys.stdout.write(format_plan(plan) + "\n")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from onnxq.core.graph import load_model
    from onnxq.data.loaders import load_calibration, model_inputs
    from onnxq.report.validate import validate, write_report

    float_model = load_model(args.float_model)
    quant_model = load_model(args.quant_model)
    feeds = load_calibration(args.data, model_inputs(float_model), recipe=_recipe(args.recipe),
                             batch_size=args.batch_size)
    report = validate(float_model, quant_model, feeds)
    sys.stdout.write(report.summary() + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    else:
        write_report(report.to_dict(), args.quant_model)
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    handlers = {"quantize": _quantize, "inspect": _inspect, "validate": _validate, "check": _check}
    try:
        return handlers[args.command](args)
    except UserError as exc:
        sys.stderr.write(f"onnxq: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("onnxq: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
