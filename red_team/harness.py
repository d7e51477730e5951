"""Red team: bad inputs through the real CLIs, as users would give them by mistake and as a hostile input would.

Each case runs the real command line (`scripts/sdft.py`, `scripts/extract_logits.py`, `scripts/distill_sft.py`,
`scripts/continual.py`, `trl-sdft vllm-serve`) in a fresh subprocess (its own process group, killed whole after
`--timeout` seconds, 600 by default), in its own fresh temporary directory, on a tiny local model built once per run
(`trl_sdft.testing`), and classifies what happened:

    clear-error   exit 2, stderr's last line is the one `...: error: ...` line, no traceback, nothing changed
    handled       exit 0 and the documented correct behaviour, checked by the case
    traceback     a Python traceback in stderr, or an exit code other than 0 and 2 (a hang killed by the guard too)
    silent-wrong  exit 0 but the case's check of correct behaviour fails (NaN weights, bad input accepted, ...)
    data-lost     a file the user had was modified or deleted: every file in the case's directory and in the shared
                  assets (model, datasets, extraction) is hashed before and after; files a case may legitimately
                  change (a resumed run's final model) are listed by the case. The CLIs' `.trl-sdft.lock` is ignored.

and, for what fits none of these: `unclear-error` (exit 2, no traceback, but no single error line ending stderr: a
message over several lines, or none; or a line that does not name the file or flag the case says it must),
`setup-error` (the case's own preparation failed, e.g. the shared extraction), `skipped`. Every case declares the outcome it expects; both are reported.

    .venv/bin/python -m red_team [--only SUBSTRING ...] [--list] [--output benchmarks/results/red_team.json]

Output: a table on stdout (case, expected, outcome, first line of the error) as cases finish, the counts per
outcome, and a small JSON file. As root, the read-only-directory cases run without the capabilities that bypass file
permissions (`setpriv`), since root writes anywhere otherwise.
"""

import argparse
import atexit
import json
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from red_team.checks import digest
from red_team.processes import (
    PYTHON,
    ROOT,
    SCRIPTS,
    TRACEBACK,
    Proc,
    Result,
    child_env,
    exception_line,
    kill_live,
    last_line,
    without_dac_override,
)
from red_team.table import load_cases
from red_team.workspace import Assets, Case, Ctx, Plan, SetupError

DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "red_team.json"

OUTCOMES = ("clear-error", "handled", "traceback", "silent-wrong", "data-lost")
OTHER_OUTCOMES = ("unclear-error", "setup-error", "skipped")
IGNORED_NAMES = {".trl-sdft.lock"}  # the CLIs' advisory lock: bookkeeping, rewritten with each run's pid
ERROR_LINE = re.compile(r"^(?:[\w./ -]+: )?error: \S")


# ------------------------------------------------------------------------------------------------ file snapshots
def snapshot(roots: dict[str, Path]) -> dict[str, str]:
    """`label/relative/path` -> content hash of every file (and symlink) under each root."""
    files = {}
    for label, root in roots.items():
        for dirpath, dirnames, filenames in os.walk(root):
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            for name in filenames + links:
                if name in IGNORED_NAMES:
                    continue
                path = os.path.join(dirpath, name)
                files[f"{label}/{os.path.relpath(path, root)}"] = digest(path)
    return files


def _matches(path: str, pattern: str) -> bool:
    """`pattern` segment by segment (`*` stays within a segment); a final `**` matches everything below."""
    import fnmatch

    parts, want = path.split("/"), pattern.split("/")
    if want[-1] == "**":
        want = want[:-1]
        return len(parts) > len(want) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, want))
    return len(parts) == len(want) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, want))


def changes(before: dict, after: dict, allowed: tuple[str, ...]) -> list[str]:
    """Pre-existing files modified or deleted, except those matching `allowed` (patterns under `case/`)."""
    found = []
    for path, content in before.items():
        if any(_matches(path, "case/" + pattern) for pattern in allowed):
            continue
        if path not in after:
            found.append(f"deleted {path}")
        elif after[path] != content:
            found.append(f"modified {path}")
    return found


def force_rmtree(path: Path) -> None:
    def unlock(function, name, _):
        os.chmod(os.path.dirname(name), stat.S_IRWXU)
        function(name)

    if path.exists():
        for dirpath, _, _ in os.walk(path):
            os.chmod(dirpath, stat.S_IRWXU | stat.S_IMODE(os.stat(dirpath).st_mode))
        shutil.rmtree(path, onerror=unlock)


# ---------------------------------------------------------------------------------------------- classification
def error_lines(stderr: str) -> list[str]:
    return [line.strip() for line in stderr.splitlines() if ERROR_LINE.match(line.strip())]


def primary(results: list[Result]) -> Result:
    """The run a case is judged by: a crashed one, else a refused one, else the first."""
    for result in results:
        if result.timed_out or TRACEBACK in result.stderr or result.code not in (0, 2):
            return result
    return next((result for result in results if result.code == 2), results[0])


def classify(result: Result, lost: list[str], plan: "Plan", timeout: float) -> tuple[str, str]:
    """(outcome, first line of the error) of one case."""
    if lost:
        return "data-lost", "; ".join(lost[:4]) + (f"; ... ({len(lost)} in all)" if len(lost) > 4 else "")
    if result.timed_out:
        return "traceback", f"hang: killed after {timeout:.0f} s ({last_line(result.stderr)[:120]})"
    if TRACEBACK in result.stderr:
        return "traceback", exception_line(result.stderr)
    if result.code not in (0, 2):
        return "traceback", f"exit code {result.code}: {last_line(result.stderr)[:200]}"
    always = plan.always(result) if plan.always else None
    if result.code == 2:
        lines = error_lines(result.stderr)
        if always:
            return "silent-wrong", f"{always} (and exit 2: {lines[0] if lines else last_line(result.stderr)})"
        if len(lines) == 1 and last_line(result.stderr) == lines[0]:
            missing = [name for name in plan.names if name not in lines[0]]
            if missing:
                return "unclear-error", f"{lines[0]} (does not name {', '.join(map(repr, missing))})"
            return "clear-error", lines[0]
        if not lines:
            return "unclear-error", f"exit 2 without an error line: {last_line(result.stderr)[:200]}"
        extra = "several error lines" if len(lines) > 1 else "more output after the error line"
        return "unclear-error", f"{lines[0]} ({extra}: {last_line(result.stderr)[:120]})"
    problem = always or (plan.check(result) if plan.check else "exit 0: the bad input was accepted")
    if problem:
        return "silent-wrong", problem
    return "handled", plan.note


# ====================================================================================================== harness
@dataclass
class Outcome:
    name: str
    category: str
    expected: str
    outcome: str
    seconds: float
    error: str
    left_behind: list = field(default_factory=list)

    def as_dict(self) -> dict:
        entry = {
            "name": self.name,
            "category": self.category,
            "expected": self.expected,
            "outcome": self.outcome,
            "seconds": round(self.seconds, 1),
            "error": self.error[:500],
        }
        if self.left_behind:
            entry["left_behind"] = self.left_behind[:5]
        return entry


def run_case(spec: Case, assets: Assets, session: Path, timeout: float, dry_run: bool = False) -> Outcome:
    directory = session / "cases" / spec.name
    directory.mkdir(parents=True)
    asset_seconds = assets.seconds
    started = time.monotonic()

    def done(outcome: str, error: str, left=()) -> Outcome:
        seconds = time.monotonic() - started - (assets.seconds - asset_seconds)
        return Outcome(spec.name, spec.category, spec.expected, outcome, seconds, error, list(left))

    try:
        plan = spec.build(Ctx(directory, assets))
    except SetupError as err:
        return done("setup-error", str(err))
    except Exception as err:  # a broken case must not stop the others
        return done("setup-error", f"{type(err).__name__}: {err} ({traceback.format_exc().splitlines()[-3].strip()})")
    commands = [plan.argv, *plan.concurrent]
    if dry_run:
        shown = " ".join(Path(arg).name if arg in (PYTHON, *SCRIPTS.values()) else arg for arg in plan.argv)
        return done("prepared", shown + (f" (x{len(commands)} at once)" if plan.concurrent else ""))
    if plan.permissions:
        commands = [without_dac_override(argv) for argv in commands]
        if None in commands:
            return done("skipped", "running as root without `setpriv`: file permissions cannot be made to hold")
    roots = {"case": directory, "assets": assets.root}
    before = snapshot(roots)
    env = child_env(session)
    deadline = time.monotonic() + timeout
    logs = session / "logs" / spec.name
    procs = [Proc(argv, directory, env, Path(f"{logs}-{i}")) for i, argv in enumerate(commands)]
    results = [proc.wait(deadline) for proc in procs]
    main = primary(results)
    main.all = results
    after = snapshot(roots)
    lost = changes(before, after, plan.allowed)
    try:
        outcome, error = classify(main, lost, plan, timeout)
    except Exception as err:  # a check that cannot read what it expects is a finding
        outcome, error = "silent-wrong", f"the case's check failed: {type(err).__name__}: {str(err)[:200]}"
    left = sorted(path for path in after if path not in before) if outcome == "clear-error" else []
    return done(outcome, error, left)


def print_row(name_width: int, name: str, expected: str, outcome: str, seconds, error: str) -> None:
    mark = "!" if outcome != expected and outcome in OUTCOMES + OTHER_OUTCOMES else " "
    seconds = f"{seconds:5.1f}" if isinstance(seconds, float) else f"{seconds:>5}"
    print(f"{name:<{name_width}}  {expected:<12} {mark}{outcome:<13} {seconds}  {error[:140]}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        action="append",
        metavar="SUBSTRING",
        help="cases whose name contains it, or of that category (repeatable)",
    )
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="the JSON file of results (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-case hang guard in seconds (default: 600)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories (printed at the end)")
    parser.add_argument(
        "--dry-run", action="store_true", help="prepare each case and show its command; run only the shared setup"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    atexit.register(kill_live)
    cases = load_cases()
    selected = [c for c in cases if not args.only or any(part in c.name or part == c.category for part in args.only)]
    width = max([len(c.name) for c in selected] + [4])
    if args.list:
        for spec in selected:
            print(f"{spec.name:<{width}}  {spec.expected:<12} {spec.category}")
        print(f"{len(selected)} cases")
        return 0
    if not selected:
        parser.error(f"no case matches {args.only}")

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    session = Path(tempfile.mkdtemp(prefix="red-team-"))
    for name in ("logs", "cases", "hf"):
        (session / name).mkdir()
    assets = Assets(session, args.timeout)
    outcomes: list[Outcome] = []
    started, stopped = time.time(), False
    print_row(width, "case", "expected", "outcome", "s", "first line of the error")
    try:
        for spec in selected:
            outcome = run_case(spec, assets, session, args.timeout, args.dry_run)
            outcomes.append(outcome)
            print_row(width, outcome.name, outcome.expected, outcome.outcome, outcome.seconds, outcome.error)
            if not args.keep:
                force_rmtree(session / "cases" / spec.name)
    except KeyboardInterrupt:
        stopped = True
        print("interrupted: writing the results so far", file=sys.stderr)
    finally:
        kill_live()
        if not args.keep:
            force_rmtree(session)
    if args.dry_run:
        problems = [o for o in outcomes if o.outcome != "prepared"]
        print(f"\n{len(outcomes) - len(problems)} of {len(outcomes)} cases prepared; nothing written to {args.output}")
        return 1 if problems else 0
    counts = Counter(o.outcome for o in outcomes)
    matched = sum(o.outcome == o.expected for o in outcomes)
    case_seconds = [o.seconds for o in outcomes if o.outcome not in ("setup-error", "skipped")]
    report = {
        "cases": len(outcomes),
        "counts": {name: counts.get(name, 0) for name in OUTCOMES + OTHER_OUTCOMES if name in OUTCOMES or counts[name]},
        "expected_counts": dict(Counter(o.expected for o in outcomes)),
        "as_expected": matched,
        "seconds_total": round(time.time() - started, 1),
        "seconds_shared_setup": round(assets.seconds, 1),
        "seconds_per_case_mean": round(sum(case_seconds) / len(case_seconds), 1) if case_seconds else None,
        "interrupted": stopped,
        "only": args.only,
        "results": [o.as_dict() for o in outcomes],
    }
    print()
    print("outcomes: " + ", ".join(f"{name} {count}" for name, count in report["counts"].items()))
    print(
        f"as expected: {matched}/{len(outcomes)}; mean {report['seconds_per_case_mean']} s per case, shared setup "
        f"{report['seconds_shared_setup']} s, total {report['seconds_total']} s"
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"results: {output}")
    if args.keep:
        print(f"kept: {session}")
    return 130 if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
