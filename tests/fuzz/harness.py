"""Fuzz harness of the ``onnxq`` command line: run one case as a subprocess and check the invariants.

A :class:`Case` writes its inputs into an empty case folder and returns the command line (the words after
``python -m onnxq``, paths relative to the case folder, which is the working directory of the run).
:func:`run_case` snapshots the folder, runs the command with a timeout and snapshots it again;
:func:`check_invariants` turns the :class:`Outcome` into a list of :class:`Problem` (empty = the case passed):

1. exit 0 with a valid output model (onnx.checker passes, onnxruntime runs it), exit 1 (validation failed,
   nothing written) or exit 2 with stderr exactly one line ``onnxq: error: ...``; 130 only for SIGINT
   cases; never a traceback.
2. no pre-existing file changed (sha256, mtime) or deleted, except declared outputs that are not inputs.
3. no stray files: only the declared outputs are new (and a checkpoint folder the case named); nothing
   new at all after a failed run.
4. no hang (the timeout is a failure).
5. not silently wrong: on exit 0 with a report saying validation ok, the output's cosine with the float
   model on standard-normal inputs is at least 0.9.

Set ``ONNXQ_FUZZ_LOG=/path/file.jsonl`` to append one JSON line per case (id, status, problems).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from onnxq.pipeline.result import output_files

REPO = Path(__file__).resolve().parents[2]
VERIFY = Path(__file__).with_name("verify.py")
MIN_COSINE = 0.9
DEFAULT_TIMEOUT = 60.0

#: fast flags for most cases: rtn rounding (no GPTQ), default everything else
FAST = ["--method", "rtn"]


@dataclasses.dataclass(frozen=True)
class Case:
    """One fuzz case.

    Attributes:
        id: unique id (also the pytest id).
        build: writes the inputs into the case folder and returns the words after ``python -m onnxq``.
        fast: part of the fast (unmarked) subset.
        timeout: seconds before the run counts as a hang.
        sigint_after: send SIGINT this many seconds after the start (exit 130 becomes acceptable); a
            callable ``(case_dir) -> bool`` in ``sigint_when`` sends it when true instead (polled).
        skip: a reason to skip (e.g. permissions when running as root).
    """

    id: str
    build: Callable[[Path], list[str]]
    fast: bool = False
    timeout: float = DEFAULT_TIMEOUT
    sigint_after: float | None = None
    sigint_when: Callable[[Path], bool] | None = None
    skip: str | None = None
    judge: str = "normal"  # the real inputs the output is judged on: "normal" (N(0, 1)) or "pixels" (0..255)


@dataclasses.dataclass
class Entry:
    kind: str  # "file" | "dir" | "link" | "other"
    sha256: str | None = None
    mtime_ns: int | None = None
    size: int | None = None


@dataclasses.dataclass
class Outcome:
    case: Case
    folder: Path
    argv: list[str]
    returncode: int | None  # None: timed out
    stdout: str
    stderr: str
    seconds: float
    before: dict[str, Entry]
    after: dict[str, Entry]
    sigint_sent: bool = False


@dataclasses.dataclass(frozen=True)
class Problem:
    kind: str  # traceback | exit-status | stderr | invalid-output | data-loss | stray-files | silently-wrong | hang
    detail: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.detail}"


# ------------------------------------------------------------------------------------------ snapshots
def sha256_of(path: Path) -> str:
    """The file's SHA-256, read in 1 MB chunks (files of any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def snapshot(root: Path) -> dict[str, Entry]:
    """Every path under ``root`` (recursively, links not followed) -> what it is and its content hash."""
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in list(dirnames) + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            try:
                st = p.lstat()
            except OSError:
                continue
            if p.is_symlink():
                out[rel] = Entry("link", os.readlink(p), st.st_mtime_ns, st.st_size)
            elif p.is_dir():
                out[rel] = Entry("dir")
            elif p.is_file():
                try:
                    digest = sha256_of(p)
                except OSError as exc:
                    digest = f"unreadable: {exc}"
                out[rel] = Entry("file", digest, st.st_mtime_ns, st.st_size)
            else:
                out[rel] = Entry("other")
    return out


# ------------------------------------------------------------------------------------------ running
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONHASHSEED", "0")
    env.pop("ONNXQ_FUZZ_LOG", None)
    return env


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_case(case: Case, folder: Path) -> Outcome:
    """Build ``case`` in the empty ``folder`` and run it (working directory = ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    words = case.build(folder)
    before = snapshot(folder)
    argv = [sys.executable, "-m", "onnxq", *words]
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=folder, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    sent = False
    returncode: int | None
    try:
        if case.sigint_after is not None or case.sigint_when is not None:
            while proc.poll() is None and time.monotonic() - start < case.timeout:
                elapsed = time.monotonic() - start
                due = (case.sigint_after is not None and elapsed >= case.sigint_after) or (
                    case.sigint_when is not None and case.sigint_when(folder))
                if due:
                    proc.send_signal(signal.SIGINT)
                    sent = True
                    break
                time.sleep(0.05)
        out, err = proc.communicate(timeout=max(1.0, case.timeout - (time.monotonic() - start)))
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        returncode = None
    seconds = time.monotonic() - start
    after = snapshot(folder)
    return Outcome(case, folder, argv, returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                   seconds, before, after, sent)


# ------------------------------------------------------------------------------------------ argv parsing
_VALUE_FLAGS = {"-o", "--output", "--calib", "--data", "--validation", "--config", "--bit-plan", "--json",
                "--checkpoint-dir", "--recipe", "--set", "--preset"}


def _option(words: Sequence[str], *names: str) -> str | None:
    """The last value of the option ``names`` (``--x v`` or ``--x=v``)."""
    value = None
    for k, w in enumerate(words):
        for n in names:
            if w == n and k + 1 < len(words):
                value = words[k + 1]
            elif w.startswith(n + "=") and n.startswith("--"):
                value = w[len(n) + 1:]
    return value


def _positionals(words: Sequence[str]) -> list[str]:
    out, skip = [], False
    for w in words[1:]:
        if skip:
            skip = False
            continue
        if w in _VALUE_FLAGS:
            skip = True
            continue
        if w.startswith("-"):
            continue
        out.append(w)
    return out


def _rel(folder: Path, text: str | None) -> str | None:
    """``text`` (relative to ``folder`` or absolute) as a normalised path relative to ``folder``."""
    if not text:
        return None
    p = Path(os.path.normpath(folder / text))
    try:
        return p.relative_to(folder).as_posix()
    except ValueError:
        return None


def _checkpoint_dir(words: Sequence[str]) -> str | None:
    value = _option(words, "--checkpoint-dir")
    for k, w in enumerate(words):
        if w == "--set" and k + 1 < len(words) and words[k + 1].startswith("engine.checkpoint_dir="):
            value = words[k + 1].split("=", 1)[1]
    return value


def declared_outputs(words: Sequence[str], folder: Path) -> tuple[set[str], set[str], set[str]]:
    """(output files, checkpoint roots, input paths) of a command line, relative to ``folder``.

    Output files are ``OUT.onnx`` and its companions for ``quantize -o OUT.onnx``, the ``--json`` file or
    ``QUANT.report.json`` for ``validate``. A checkpoint root is the ``--checkpoint-dir`` (or
    ``OUT.onnx.ckpt`` with ``--keep-checkpoint``): anything new under it is fine after a run that finished.
    Inputs are every other path on the command line that exists.
    """
    outputs: set[str] = set()
    roots: set[str] = set()
    inputs: set[str] = set()
    if not words:
        return outputs, roots, inputs
    command = words[0]
    if command == "quantize":
        out = _rel(folder, _option(words, "-o", "--output"))
        if out:
            outputs |= {out} | {str(p) for p in output_files(out).values()} | {out + ".data"}
            if "--keep-checkpoint" in words:
                roots.add(out + ".ckpt")
        ckpt = _rel(folder, _checkpoint_dir(words))
        if ckpt is not None:
            roots.add(ckpt)
        candidates = _positionals(words) + [_option(words, n) or "" for n in
                                            ("--calib", "--validation", "--config", "--bit-plan", "--float-plan")]
    elif command == "validate":
        json_out = _rel(folder, _option(words, "--json"))
        pos = _positionals(words)
        if json_out:
            outputs.add(json_out)
        elif len(pos) >= 2:
            q = _rel(folder, pos[1])
            if q:
                outputs.add(str(Path(q).with_suffix(".report.json")))
        candidates = pos + [_option(words, "--data") or ""]
    else:
        candidates = _positionals(words) + [_option(words, "--config") or ""]
    for c in candidates:
        r = _rel(folder, c)
        if r is not None and c and (folder / r).exists():
            inputs.add(r)
            inputs |= _external_files(folder, r)
    return outputs, roots, inputs


def _external_files(folder: Path, rel: str) -> set[str]:
    """The external data files a model input refers to (inputs too, whatever their names)."""
    p = folder / rel
    if not p.is_file() or p.stat().st_size > 50_000_000:
        return set()
    try:
        import onnx

        model = onnx.load(str(p), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a model: no external data
        return set()
    out = set()
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                r = _rel(folder, os.path.join(os.path.dirname(rel), entry.value))
                if r is not None:
                    out.add(r)
    return out


# ------------------------------------------------------------------------------------------ invariants
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Warning|Fault)\b[^\n]*)$", re.M)
_FRAME = re.compile(r'^\s*File "([^"]+)", line (\d+), in (\S+)', re.M)


def traceback_summary(text: str) -> str:
    """``ExceptionType: message @ file:line in func`` of the last traceback in ``text``."""
    tail = text[text.rfind("Traceback (most recent call last)"):]
    frames = _FRAME.findall(tail)
    excs = _EXC_LINE.findall(tail)
    plain = [x for x in tail.splitlines() if x.strip() and not x[0].isspace() and not x.startswith("Traceback")
             and not x.startswith("During handling") and not x.startswith("The above exception")]
    exc = (plain[-1] if plain else excs[-1] if excs else "?").strip()
    exc = exc if len(exc) < 200 else exc[:200] + "..."
    if not frames:
        return exc

    def where(frame: tuple[str, str, str]) -> str:
        path, line, func = frame
        path = path.replace(str(REPO) + "/", "")
        if "site-packages/" in path:
            path = path.split("site-packages/", 1)[1]
        return f"{path}:{line} in {func}"
    text = f"{exc} @ {where(frames[-1])}"
    ours = [f for f in frames if f[0].startswith(str(REPO)) and "site-packages" not in f[0]]
    if ours and ours[-1] != frames[-1]:
        text += f" (last onnxq frame {where(ours[-1])})"
    return text


def _under(rel: str, roots: set[str]) -> bool:
    return any(rel == r or rel.startswith(r.rstrip("/") + "/") for r in roots)


def _ancestors(rel: str) -> set[str]:
    parts = rel.split("/")
    return {"/".join(parts[:k]) for k in range(1, len(parts))}


def check_invariants(outcome: Outcome) -> list[Problem]:
    """The problems of one run (an empty list: the case passed)."""
    problems: list[Problem] = []
    words = _command_words(outcome.argv[3:])
    folder = outcome.folder
    rc = outcome.returncode
    outputs, roots, inputs = declared_outputs(words, folder)

    # 4. hang
    if rc is None:
        problems.append(Problem("hang", f"no exit after {outcome.case.timeout:.0f} s"))

    # 1. exit status and messages
    both = outcome.stdout + "\n" + outcome.stderr
    if "Traceback (most recent call last)" in both:
        problems.append(Problem("traceback", traceback_summary(both)))
    if rc is not None:
        allowed = {0, 1, 2} | ({130} if outcome.sigint_sent else set())
        if rc not in allowed:
            last = next((x.strip() for x in reversed(outcome.stderr.splitlines()) if x.strip()), "")
            saved = re.search(r"traceback is in (\S+?):? ", outcome.stderr)
            if saved and os.path.isfile(saved.group(1)):  # the CLI's internal-error report: its last frame
                with open(saved.group(1), errors="replace") as f:
                    last = traceback_summary(f.read())
            problems.append(Problem("exit-status", f"exit status {rc}" + (
                f" (signal {-rc})" if rc < 0 else "") + (f": {last[:240]}" if last else "")))
        if rc == 2:
            lines = outcome.stderr.splitlines()
            if len(lines) != 1 or not lines[0].startswith("onnxq: error:") or not lines[0][13:].strip():
                shown = " | ".join(x.strip() for x in lines[-3:])[:300]
                problems.append(Problem("stderr", f"exit 2 but stderr is {len(lines)} line(s): {shown!r}"))
        if rc == 130 and "Traceback" not in both and not outcome.stderr.strip():
            problems.append(Problem("stderr", "exit 130 without a message"))

    # 2. data loss: pre-existing files changed or deleted
    finished = rc is not None and (rc == 0 or (rc == 1 and bool(words) and words[0] == "validate"))
    writable = outputs - inputs
    for rel, entry in outcome.before.items():
        now = outcome.after.get(rel)
        if rel in writable and finished and entry.kind in ("file", "link"):  # replaced, not followed
            continue
        if now is None:
            problems.append(Problem("data-loss", f"{rel} ({entry.kind}) deleted"))
        elif now.kind != entry.kind:
            problems.append(Problem("data-loss", f"{rel} changed from {entry.kind} to {now.kind}"))
        elif entry.kind in ("file", "link") and (now.sha256 != entry.sha256 or now.mtime_ns != entry.mtime_ns):
            what = "content" if now.sha256 != entry.sha256 else "mtime"
            problems.append(Problem("data-loss", f"{rel} modified ({what})"))

    # 3. stray files
    new = sorted(set(outcome.after) - set(outcome.before))
    interrupted = rc == 130 and outcome.sigint_sent
    ok_new: set[str] = set()
    if finished:
        ok_new = outputs | {a for o in outputs for a in _ancestors(o)}
    if finished or interrupted:
        ok_new |= {a for r in roots for a in _ancestors(r)}
    stray = [r for r in new if r not in ok_new and not ((finished or interrupted) and _under(r, roots))]
    if stray:
        shown = ", ".join(stray[:6]) + (f" (+{len(stray) - 6})" if len(stray) > 6 else "")
        problems.append(Problem("stray-files", f"after exit {rc}: {shown}"))

    # 1 + 5. the written model
    if rc == 0 and words and words[0] == "quantize":
        problems += _check_output(outcome, words, inputs)
    return problems


def _command_words(words: Sequence[str]) -> list[str]:
    """The words from the subcommand on (without the global -v/-vv/--verbose before it)."""
    words = list(words)
    while words and (words[0] == "--verbose" or re.fullmatch(r"-v+", words[0])):
        words.pop(0)
    return words


def _check_output(outcome: Outcome, words: Sequence[str], inputs: set[str]) -> list[Problem]:
    folder = outcome.folder
    out_rel = _rel(folder, _option(words, "-o", "--output"))
    model_words = _positionals(words)
    if "--print-config" in words or "--help-all" in words or "-h" in words or "--help" in words:
        return []
    if not out_rel or not (folder / out_rel).is_file():
        return [Problem("invalid-output", f"exit 0 but no output model at {out_rel}")]
    float_rel = _rel(folder, model_words[0]) if model_words else None
    report_path = folder / (out_rel[: -len(".onnx")] + ".report.json" if out_rel.endswith(".onnx") else out_rel)
    ok = None
    try:
        report = json.loads(report_path.read_text())
        ok = (report.get("validation") or {}).get("ok")
    except (OSError, ValueError, AttributeError):
        report = None
    float_changed = float_rel is None or outcome.before.get(float_rel) != outcome.after.get(float_rel)
    request = {"quant": str(folder / out_rel), "float": None if float_changed else str(folder / float_rel),
               "judge": outcome.case.judge}
    result = verify(request)
    problems = []
    if report is None:
        problems.append(Problem("invalid-output", f"exit 0 but {report_path.name} is missing or not JSON"))
    if result.get("error"):
        problems.append(Problem("invalid-output", result["error"]))
    cos = result.get("cosine")
    if ok is True and result.get("quant_nonfinite") and not result.get("float_nonfinite"):
        problems.append(Problem("silently-wrong", "report says ok but the output is NaN/Inf on normal inputs"))
    elif ok is True and cos is not None and cos < MIN_COSINE:
        problems.append(Problem("silently-wrong", f"report says ok but cosine {cos:.4f} < {MIN_COSINE}"))
    return problems


def verify(request: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Check the written model in a subprocess (tests/fuzz/verify.py: onnx.checker, onnxruntime, cosine)."""
    try:
        proc = subprocess.run([sys.executable, str(VERIFY), json.dumps(request)], capture_output=True,
                              timeout=timeout, env=_env())
    except subprocess.TimeoutExpired:
        return {"error": "verify: onnxruntime hung on the output model"}
    text = proc.stdout.decode("utf-8", "replace").strip().splitlines()
    if proc.returncode != 0 or not text:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        return {"error": f"verify crashed (exit {proc.returncode}): {err[-1] if err else ''}"}
    return json.loads(text[-1])


# ------------------------------------------------------------------------------------------ entry point
def log_outcome(outcome: Outcome, problems: Sequence[Problem]) -> None:
    path = os.environ.get("ONNXQ_FUZZ_LOG")
    if not path:
        return
    row = {"id": outcome.case.id, "rc": outcome.returncode, "seconds": round(outcome.seconds, 2),
           "sigint": outcome.sigint_sent, "argv": outcome.argv[3:],
           "problems": [dataclasses.asdict(p) for p in problems],
           "stderr_tail": outcome.stderr[-600:]}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def describe(outcome: Outcome, problems: Sequence[Problem]) -> str:
    lines = [f"case {outcome.case.id}: onnxq {' '.join(outcome.argv[3:])}",
             f"exit {outcome.returncode} after {outcome.seconds:.1f} s"]
    lines += [f"  {p}" for p in problems]
    lines.append("stderr tail: " + outcome.stderr[-1500:])
    return "\n".join(lines)


def run_and_check(case: Case, folder: Path) -> tuple[Outcome, list[Problem]]:
    outcome = run_case(case, folder)
    problems = check_invariants(outcome)
    log_outcome(outcome, problems)
    return outcome, problems


def assert_case(case: Case, folder: Path) -> None:
    """Run ``case`` and fail the test with every broken invariant."""
    import pytest

    if case.skip:
        pytest.skip(case.skip)
    outcome, problems = run_and_check(case, folder)
    assert not problems, describe(outcome, problems)
