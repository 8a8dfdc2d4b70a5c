#!/usr/bin/env python3
"""A small, dependency-free mutation runner: does the test suite notice when a guarantee is gone?

Each mutant in ``scripts/mutants.toml`` removes one feature from the code (an exact snippet
replaced by a weaker one). For each mutant this script

  1. copies the repository's working tree (uncommitted changes included) into a temp dir,
  2. applies the replacement there (never in the real tree),
  3. runs pytest in that copy with the project's venv python, ``import chunkd`` resolving to the
     copy (checked, see below), first the mutant's own ``tests`` (if any), then the full suite,
  4. reports "killed" (pytest failed: good), "survived" (the suite passed: a missing test),
     "timeout" (counts as killed), "invalid" (the snippet is not in the file exactly once, or its
     ``tests`` do not exist) or "error" (pytest could not run: usage error, no tests, crash).

An unmutated copy runs first ("baseline"); it must pass, else nothing is run.

Making sure the copy is what gets tested: the venv has chunkd installed editable, pointing at
/work/main (a meta-path finder appended to ``sys.meta_path``). ``PYTHONPATH`` puts the copy first,
so the normal path finder finds the copy's ``chunkd`` before the editable finder is asked -- also
in the ``python -m chunkd`` subprocesses the tests start with another cwd. A pre-flight checks
``chunkd.__file__`` from inside the copy and from an unrelated cwd, and a tiny pytest plugin
(loaded with ``-p``) checks it again inside every pytest run and aborts the whole script (not
"killed") if chunkd came from anywhere else.

Usage (from anywhere; stdlib only, any Python >= 3.11):

    python3 scripts/mutate.py                        # every mutant, one at a time
    python3 scripts/mutate.py --only lease-enforcement --only finalize-claim
    python3 scripts/mutate.py --check                # only validate the snippets, run nothing
    python3 scripts/mutate.py --jobs 2 --markdown /tmp/mutants.md --keep
    python3 scripts/mutate.py --pytest-args "--deselect tests/test_browser.py"
    python3 scripts/mutate.py --repo /tmp/head-export    # another tree (e.g. `git archive HEAD`)

Exit status: 0 only if every selected mutant was killed (or timed out); 1 if any survived, was
invalid or errored; 2 if the baseline failed or the setup is wrong.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MUTANTS = REPO / "scripts" / "mutants.toml"
DEFAULT_PYTHON = REPO / ".venv" / "bin" / "python"  # not resolved: the symlink is the venv
PYTEST_BASE = ["-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]

#: Not copied, relative to the repository root.
EXCLUDE_PATHS = {".git", ".venv", "data", "benchmarks/.peers"}
#: Not copied, at any depth.
EXCLUDE_NAMES = {"__pycache__", ".pytest_cache", "node_modules"}

GUARD_MODULE = "chunkd_mutate_guard"
GUARD_EXIT = 97  # the guard's pytest exit status: the wrong chunkd was imported
GUARD_SOURCE = f'''\
"""Loaded by scripts/mutate.py with -p (before any conftest): chunkd must be the copy's."""
import importlib.util
import os
import sys

ROOT = os.path.realpath(os.environ["CHUNKD_MUTATE_COPY"])


def _ok(path):
    return bool(path) and os.path.realpath(path).startswith(ROOT + os.sep)


def _fail(got):
    sys.stderr.write(f"MUTATE-GUARD: chunkd resolves to {{got}}, not to the copy {{ROOT}}\\n")
    sys.stderr.flush()
    os._exit({GUARD_EXIT})


# Where ``import chunkd`` would come from, found without running chunkd's code (a mutant may
# break it): checked before the conftest imports chunkd.
_spec = importlib.util.find_spec("chunkd")
if not _ok(_spec.origin if _spec else None):
    _fail(_spec.origin if _spec else None)


def pytest_collection_finish(session):
    mod = sys.modules.get("chunkd")  # and the module actually imported
    if mod is not None and not _ok(getattr(mod, "__file__", None)):
        _fail(mod.__file__)


def pytest_runtest_logstart(nodeid, location):
    # which test is running, for a run that times out (-q output does not name tests)
    path = os.environ.get("CHUNKD_MUTATE_CURRENT")
    if path:
        with open(path, "w") as f:
            f.write(nodeid)
'''

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_FIRST_FAILURE = re.compile(r"^(FAILED|ERROR) (\S+)", re.MULTILINE)
_running: set[subprocess.Popen] = set()
_running_lock = threading.Lock()
_print_lock = threading.Lock()


class SetupError(Exception):
    """The runner cannot produce meaningful results (exit status 2)."""


@dataclasses.dataclass
class Mutant:
    name: str
    guarantee: str
    file: str
    old: str
    new: str
    tests: list[str]
    problem: str | None = None  # why it is invalid


@dataclasses.dataclass
class Result:
    mutant: Mutant
    result: str  # killed | survived | timeout | invalid | error
    first_failure: str = ""
    seconds: float = 0.0
    detail: str = ""
    workdir: Path | None = None


def log(msg: str) -> None:
    with _print_lock:
        print(f"[mutate {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- mutants ---------------------------------------------------------------------------------


def load_mutants(path: Path) -> list[Mutant]:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SetupError(f"cannot read {path}: {exc}") from None
    entries = doc.get("mutant", [])
    if not isinstance(entries, list) or not entries:
        raise SetupError(f"{path}: no [[mutant]] entries")
    mutants, seen = [], set()
    for i, e in enumerate(entries, 1):
        where = f"{path.name}: mutant #{i}"
        for key in ("name", "guarantee", "file", "old", "new"):
            if not isinstance(e.get(key), str) or not e[key]:
                raise SetupError(f"{where}: '{key}' must be a non-empty string")
        unknown = set(e) - {"name", "guarantee", "file", "old", "new", "tests"}
        if unknown:
            raise SetupError(f"{where} ({e['name']}): unknown keys {sorted(unknown)}")
        tests = e.get("tests", [])
        if not isinstance(tests, list) or not all(isinstance(t, str) and t for t in tests):
            raise SetupError(f"{where} ({e['name']}): 'tests' must be a list of strings")
        if not _NAME.fullmatch(e["name"]):
            raise SetupError(f"{where}: name {e['name']!r} must match {_NAME.pattern}")
        if e["name"] in seen:
            raise SetupError(f"{where}: duplicate name {e['name']!r}")
        seen.add(e["name"])
        mutants.append(Mutant(e["name"], " ".join(e["guarantee"].split()), e["file"],
                              e["old"], e["new"], list(tests)))
    return mutants


def check_snippet(m: Mutant, tree: Path) -> str | None:
    """Why ``m`` cannot be applied to ``tree`` (None if it can)."""
    if m.old == m.new:
        return "'old' and 'new' are identical"
    target = (tree / m.file).resolve()
    if not target.is_relative_to(tree.resolve()):
        return f"{m.file} is outside the repository"
    try:
        text = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        return f"{m.file} does not exist"
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot read {m.file}: {exc}"
    n = text.count(m.old)
    if n != 1:
        first = m.old.strip().splitlines()[0] if m.old.strip() else m.old
        return f"'old' occurs {n} times in {m.file} (must be exactly once): {first.strip()[:60]!r}"
    return None


def apply(m: Mutant, tree: Path) -> None:
    problem = check_snippet(m, tree)
    if problem:
        raise ValueError(problem)
    target = tree / m.file
    text = target.read_text(encoding="utf-8")
    mutated = text.replace(m.old, m.new, 1)
    target.write_text(mutated, encoding="utf-8")
    if target.read_text(encoding="utf-8") != mutated:  # paranoia: the copy carries the mutant
        raise ValueError(f"writing the mutant to {target} did not stick")


# -- copies ----------------------------------------------------------------------------------


def copy_tree(src: Path, dst: Path) -> None:
    src = src.resolve()

    def ignore(folder: str, names: list[str]) -> set[str]:
        rel = Path(folder).resolve().relative_to(src)
        out = set()
        for n in names:
            relpath = (rel / n).as_posix()
            if n in EXCLUDE_NAMES or relpath in EXCLUDE_PATHS:
                out.add(n)
        return out

    shutil.copytree(src, dst, symlinks=True, ignore=ignore)


def make_workdir(snapshot: Path, label: str, root: Path) -> tuple[Path, Path]:
    """A fresh work dir with ``repo/`` (a copy of the snapshot) and the guard plugin."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=root))
    copy = workdir / "repo"
    shutil.copytree(snapshot, copy, symlinks=True)
    guard = workdir / "guard"
    guard.mkdir()
    (guard / f"{GUARD_MODULE}.py").write_text(GUARD_SOURCE)
    return workdir, copy


def run_env(workdir: Path, copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CHUNKD_REQUIRE_BROWSER", None)
    parts = [str(copy), str(workdir / "guard")]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["CHUNKD_MUTATE_COPY"] = str(copy)
    env["CHUNKD_MUTATE_CURRENT"] = str(workdir / "current-test")
    env.pop("PYTHONSAFEPATH", None)  # that would drop the cwd from sys.path; PYTHONPATH stays
    return env


def preflight(python: Path, workdir: Path, copy: Path) -> str:
    """``import chunkd`` must find the copy, from the copy's root and from an unrelated cwd."""
    env = run_env(workdir, copy)
    code = "import chunkd, os; print(os.path.realpath(chunkd.__file__))"
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    want = os.path.realpath(copy / "chunkd" / "__init__.py")
    seen = []
    for cwd in (copy, elsewhere):
        out = subprocess.run([str(python), "-c", code], cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=60)
        got = out.stdout.strip()
        if out.returncode != 0 or got != want:
            raise SetupError(f"pre-flight: with cwd={cwd}, chunkd resolved to {got!r} "
                             f"(want {want!r}); stderr: {out.stderr.strip()[-500:]}")
        seen.append(f"cwd={cwd.name}: {got}")
    # For the record: without PYTHONPATH, an unrelated cwd gets the editable install.
    bare = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(python), "-c", code], cwd=elsewhere, env=bare,
                         capture_output=True, text=True, timeout=60)
    seen.append(f"without PYTHONPATH: {out.stdout.strip() or out.stderr.strip()[-200:]}")
    return "; ".join(seen)


# -- pytest ----------------------------------------------------------------------------------


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)  # pytest and every server it started (same session)
    except (ProcessLookupError, PermissionError):
        pass


def run_pytest(python: Path, workdir: Path, copy: Path, stage: str, extra: list[str],
               targets: list[str], timeout: float) -> tuple[int | None, str, float]:
    """Run pytest once; (exit status or None on timeout, its output, seconds)."""
    basetemp = workdir / f"tmp-{stage}"
    cmd = [str(python), *PYTEST_BASE, "-p", GUARD_MODULE, f"--basetemp={basetemp}",
           *extra, *targets]
    logpath = workdir / f"pytest-{stage}.log"
    start = time.monotonic()
    with open(logpath, "w") as logfile:
        logfile.write("$ " + shlex.join(cmd) + "\n")
        logfile.flush()
        proc = subprocess.Popen(cmd, cwd=copy, env=run_env(workdir, copy), stdin=subprocess.DEVNULL,
                                stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
        with _running_lock:
            _running.add(proc)
        try:
            rc: int | None = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            kill_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            rc = None
        finally:
            kill_group(proc)  # leftovers (servers a test did not stop), or a hung pytest
            proc.wait()
            with _running_lock:
                _running.discard(proc)
    seconds = time.monotonic() - start
    output = logpath.read_text(errors="replace")
    if rc == GUARD_EXIT and "MUTATE-GUARD" in output:
        raise SetupError(_tail(output, 5))
    return rc, output, seconds


def first_failure(output: str) -> str:
    m = _FIRST_FAILURE.search(output)
    if m:
        return m.group(2)
    return ""


def _tail(text: str, n: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def summary_line(output: str) -> str:
    for line in reversed(output.strip().splitlines()):
        if re.search(r"\b(passed|failed|error|errors|no tests ran)\b.* in [\d.]+s", line):
            return line.strip("= ")
    return ""


# -- one mutant ------------------------------------------------------------------------------


def run_mutant(m: Mutant, args: argparse.Namespace, snapshot: Path, root: Path) -> Result:
    workdir, copy = make_workdir(snapshot, f"mutant-{m.name}", root)
    res = Result(m, "error", workdir=workdir)
    try:
        try:
            apply(m, copy)
        except ValueError as exc:
            res.result, res.detail = "invalid", str(exc)
            return res
        stages: list[tuple[str, list[str]]] = []
        if m.tests:
            stages.append(("targeted", m.tests))
        stages.append(("full", []))
        deadline = time.monotonic() + args.timeout
        for stage, targets in stages:
            log(f"{m.name}: {stage} run" + (f" ({' '.join(targets)})" if targets else ""))
            rc, output, seconds = run_pytest(args.python, workdir, copy, stage, args.pytest_args,
                                             targets, deadline - time.monotonic())
            res.seconds += seconds
            if rc is None:
                current = workdir / "current-test"
                running = current.read_text() if current.exists() else "?"
                res.result, res.first_failure = "timeout", f"(running: {running})"
                res.detail = f"{stage} run exceeded the {args.timeout:g} s budget"
                return res
            if rc in (1, 2):  # tests failed / interrupted (e.g. a collection error)
                res.result = "killed"
                res.first_failure = first_failure(output) or f"(pytest exit {rc}, none named)"
                res.detail = f"{stage}: {summary_line(output)}"
                return res
            if rc == 0:
                continue
            if stage == "targeted" and rc in (4, 5):
                res.result = "invalid"
                res.detail = f"its 'tests' could not run (pytest exit {rc}): {_tail(output, 3)}"
                return res
            res.result, res.detail = "error", f"{stage}: pytest exit {rc}: {_tail(output, 8)}"
            return res
        res.result = "survived"
        res.detail = summary_line(output)
        return res
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
            res.workdir = None


# -- report ----------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def table(results: list[Result], baseline: str) -> str:
    lines = []
    if baseline:
        lines += [baseline, ""]
    lines += ["| mutant | guarantee removed | result | first failing test | seconds |",
              "|---|---|---|---|---:|"]
    for r in results:
        first = r.first_failure if r.result != "invalid" else r.detail
        lines.append(f"| {_cell(r.mutant.name)} | {_cell(r.mutant.guarantee)} | {r.result} "
                     f"| {_cell(first)} | {r.seconds:.1f} |")
    return "\n".join(lines) + "\n"


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only this mutant (repeatable)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="mutants run at once (default 1: the tests start servers, 2 cores)")
    p.add_argument("--markdown", type=Path, metavar="PATH", help="also write the table here")
    p.add_argument("--keep", action="store_true", help="keep the temp copies and pytest logs")
    p.add_argument("--timeout", type=float, default=900.0, metavar="SECONDS",
                   help="budget per mutant (targeted + full run) and for the baseline "
                        "(default 900; a timeout counts as killed)")
    p.add_argument("--pytest-args", default="", metavar="ARGS",
                   help='extra pytest arguments, one shell-quoted string, e.g. '
                        '"--deselect tests/test_browser.py::test_x"')
    p.add_argument("--mutants", type=Path, default=DEFAULT_MUTANTS, metavar="TOML",
                   help=f"mutant list (default {DEFAULT_MUTANTS.relative_to(REPO)})")
    p.add_argument("--repo", type=Path, default=REPO,
                   help=f"working tree to copy and mutate (default {REPO})")
    p.add_argument("--python", type=Path, default=DEFAULT_PYTHON,
                   help=f"interpreter with the test dependencies (default {DEFAULT_PYTHON})")
    p.add_argument("--check", action="store_true",
                   help="only check that every snippet applies to the current tree; run nothing")
    args = p.parse_args(argv)
    args.pytest_args = shlex.split(args.pytest_args)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _main(args)
    except SetupError as exc:
        log(f"ERROR: {exc}")
        return 2
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        with _running_lock:
            for proc in list(_running):
                kill_group(proc)


def _main(args: argparse.Namespace) -> int:
    mutants = load_mutants(args.mutants)
    if args.only:
        known = {m.name for m in mutants}
        missing = [n for n in args.only if n not in known]
        if missing:
            raise SetupError(f"--only: no mutant named {', '.join(missing)} "
                             f"(known: {', '.join(sorted(known))})")
        mutants = [m for m in mutants if m.name in args.only]
    if not args.check and not os.access(args.python, os.X_OK):
        raise SetupError(f"{args.python} is not an executable python (make setup?)")

    root = Path(tempfile.mkdtemp(prefix="chunkd-mutate-"))
    try:
        # One snapshot of the working tree, so the baseline and every mutant see the same code
        # even if someone edits the real tree meanwhile.
        snapshot = root / "snapshot"
        t0 = time.monotonic()
        if not (args.repo / "pyproject.toml").is_file():
            raise SetupError(f"{args.repo} does not look like the repository (no pyproject.toml)")
        copy_tree(args.repo, snapshot)
        log(f"snapshot of {args.repo} in {root} ({time.monotonic() - t0:.1f} s)")
        for m in mutants:
            m.problem = check_snippet(m, snapshot)
            if m.problem:
                log(f"INVALID {m.name}: {m.problem}")
        if args.check:
            for m in mutants:
                print(f"{'invalid' if m.problem else 'ok':8} {m.name}: {m.problem or m.file}")
            return 1 if any(m.problem for m in mutants) else 0

        runnable = [m for m in mutants if not m.problem]
        baseline = ""
        if runnable:
            baseline = run_baseline(args, snapshot, root)
        results: dict[str, Result] = {
            m.name: Result(m, "invalid", detail=m.problem or "") for m in mutants if m.problem
        }
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(run_mutant, m, args, snapshot, root): m for m in runnable}
            for fut in concurrent.futures.as_completed(futures):
                r = fut.result()  # a SetupError (guard) propagates and stops everything
                results[r.mutant.name] = r
                where = f" [kept: {r.workdir}]" if r.workdir else ""
                log(f"{r.mutant.name}: {r.result.upper()} {r.first_failure} "
                    f"({r.seconds:.1f} s) {r.detail}{where}")
        ordered = [results[m.name] for m in mutants]
        text = table(ordered, baseline)
        print(text, end="")
        if args.markdown:
            args.markdown.write_text(text)
            log(f"table written to {args.markdown}")
        return 0 if all(r.result in ("killed", "timeout") for r in ordered) else 1
    finally:
        if args.keep:
            shutil.rmtree(root / "snapshot", ignore_errors=True)
            log(f"kept work dirs under {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def run_baseline(args: argparse.Namespace, snapshot: Path, root: Path) -> str:
    workdir, copy = make_workdir(snapshot, "baseline", root)
    try:
        log("pre-flight: " + preflight(args.python, workdir, copy))
        log("baseline: full run of the unmutated copy")
        rc, output, seconds = run_pytest(args.python, workdir, copy, "full", args.pytest_args,
                                         [], args.timeout)
        if rc != 0:
            why = "timed out" if rc is None else f"failed (pytest exit {rc})"
            raise SetupError(
                f"the baseline (unmutated copy) {why} after {seconds:.0f} s, so mutation results "
                f"would mean nothing. First failure: {first_failure(output) or '-'}\n"
                + textwrap.indent(_tail(output), "    "))
        line = f"Baseline (unmutated): passed in {seconds:.1f} s ({summary_line(output)})."
        log(line)
        return line
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
