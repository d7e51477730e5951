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

    .venv/bin/python benchmarks/red_team.py [--only SUBSTRING ...] [--list] [--output benchmarks/results/red_team.json]

Output: a table on stdout (case, expected, outcome, first line of the error) as cases finish, the counts per
outcome, and a small JSON file. As root, the read-only-directory cases run without the capabilities that bypass file
permissions (`setpriv`), since root writes anywhere otherwise.
"""

import argparse
import atexit
import hashlib
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SDFT = str(ROOT / "scripts" / "sdft.py")
EXTRACT = str(ROOT / "scripts" / "extract_logits.py")
DISTILL = str(ROOT / "scripts" / "distill_sft.py")
CONTINUAL = str(ROOT / "scripts" / "continual.py")
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "red_team.json"

OUTCOMES = ("clear-error", "handled", "traceback", "silent-wrong", "data-lost")
OTHER_OUTCOMES = ("unclear-error", "setup-error", "skipped")
IGNORED_NAMES = {".trl-sdft.lock"}  # the CLIs' advisory lock: bookkeeping, rewritten with each run's pid
ERROR_LINE = re.compile(r"^(?:[\w./ -]+: )?error: \S")
TRACEBACK = "Traceback (most recent call last):"
SURROGATE = "\\ud800"  # as JSON text: the escape of a lone surrogate


# ---------------------------------------------------------------------------------------------------- processes
@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False
    all: list = field(default_factory=list)  # every run of a case with concurrent runs (this one included)


LIVE: set = set()  # processes started and not yet reaped: killed (by process group) on any exit


def _kill_group(popen) -> None:
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@atexit.register
def _kill_live() -> None:
    for popen in list(LIVE):
        _kill_group(popen)
        try:
            popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        LIVE.discard(popen)


def without_dac_override(argv: list[str]) -> list[str] | None:
    """`argv` run so that file permissions hold for it: as root, without the capabilities that bypass them (root
    writes into read-only directories otherwise); None where that cannot be arranged."""
    if os.geteuid() != 0:
        return argv
    if shutil.which("setpriv") is None:
        return None
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--", *argv]


class Proc:
    """One command in its own session (process group); stdout and stderr go to files, so nothing blocks on a pipe."""

    def __init__(self, argv: list[str], cwd: Path, env: dict, log_prefix: Path):
        self.out_path, self.err_path = Path(f"{log_prefix}.out"), Path(f"{log_prefix}.err")
        self.started = time.monotonic()
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        LIVE.add(self.popen)

    def wait(self, deadline: float) -> Result:
        timed_out = False
        try:
            code = self.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(self.popen)
            code = self.popen.wait()
        finally:
            _kill_group(self.popen)  # whatever it started and left behind
            LIVE.discard(self.popen)
        seconds = time.monotonic() - self.started
        out, err = (path.read_bytes().decode("utf-8", errors="replace") for path in (self.out_path, self.err_path))
        return Result(code, out, err, seconds, timed_out)


def child_env(session: Path) -> dict:
    env = dict(os.environ)
    env.pop("TRL_SDFT_TRACEBACK", None)  # it turns the CLIs' error lines back into tracebacks
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        CI="1",  # TRL sends no telemetry under CI
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        HF_HOME=str(session / "hf"),  # datasets' cache of loaded files: in the session, not the user's
        PYTHONUNBUFFERED="1",
    )
    return env


# ------------------------------------------------------------------------------------------------ file snapshots
def _digest(path: str) -> str:
    if os.path.islink(path):
        return "link:" + os.readlink(path)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        return f"unreadable:{err.errno}"
    return digest.hexdigest()


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
                files[f"{label}/{os.path.relpath(path, root)}"] = _digest(path)
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
    for path, digest in before.items():
        if any(_matches(path, "case/" + pattern) for pattern in allowed):
            continue
        if path not in after:
            found.append(f"deleted {path}")
        elif after[path] != digest:
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


def exception_line(stderr: str) -> str:
    """The exception of the last traceback in `stderr` (`Type: message`)."""
    tail = stderr[stderr.rfind(TRACEBACK) :].splitlines()[1:]
    lines = [line for line in tail if line.strip() and not line.startswith((" ", "\t"))]
    return lines[0].strip() if lines else "(traceback)"


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


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


# ------------------------------------------------------------------------------------------------ shared assets
class SetupError(Exception):
    """A case's preparation failed (not the CLI under test)."""


def conversations(n: int = 12) -> list[dict]:
    from trl_sdft.testing import COLORS, NAMES

    return [
        {
            "messages": [
                {"role": "user", "content": f"What color is {NAMES[i % len(NAMES)]}?"},
                {"role": "assistant", "content": f"{NAMES[i % len(NAMES)]} is {COLORS[i % len(COLORS)]}."},
            ]
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


SDFT_FLAGS = {  # tests/test_cli.py's tiny_flags: 2 steps of batch 4 on the tiny model, about 10 s with the imports
    "max_steps": "2",
    "per_device_train_batch_size": "4",
    "num_generations": "2",
    "max_completion_length": "6",
    "distillation_topk": "5",
    "save_strategy": "no",
    "report_to": "none",
    "use_cpu": True,
    "gradient_checkpointing": "false",
    "logging_steps": "1",
    "disable_tqdm": "true",
}


def sdft_argv(model, output, dataset, *extra, **flags) -> list[str]:
    """`scripts/sdft.py` with the tiny flags; a flag set to None is left out, True is a bare flag."""
    values = {"model_name_or_path": model, "output_dir": output, "dataset_path": dataset, **SDFT_FLAGS, **flags}
    argv = [PYTHON, SDFT]
    for name, value in values.items():
        if value is None:
            continue
        argv += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return argv + [str(arg) for arg in extra]


class Assets:
    """Built once per run, on first use: the tiny model, the toy datasets, one extraction, finished SDFT runs."""

    def __init__(self, session: Path, timeout: float):
        self.session, self.root, self.timeout = session, session / "assets", timeout
        self.root.mkdir()
        self.seconds = 0.0  # time spent building, left out of the cases' times
        self._tokenizer = None
        self._building = False

    def _build(self, build):
        if self._building:  # an asset built inside another's build: counted once, by the outer one
            return build()
        started, self._building = time.monotonic(), True
        try:
            return build()
        finally:
            self._building = False
            self.seconds += time.monotonic() - started

    def run(self, argv: list[str], cwd: Path, what: str) -> Result:
        proc = Proc(argv, cwd, child_env(self.session), self.session / "logs" / f"setup-{what}")
        result = proc.wait(time.monotonic() + self.timeout)
        if result.code != 0:
            detail = exception_line(result.stderr) if TRACEBACK in result.stderr else last_line(result.stderr)
            raise SetupError(f"{what}: exit {result.code}: {detail[:200]}")
        return result

    def model(self) -> Path:
        """The tiny Llama and its tokenizer (tests/conftest.py's `tiny_model_dir`), built in a subprocess: the
        tokenizer's trainer writes progress to the terminal."""
        path = self.root / "model"
        if not path.exists():
            code = (
                "import sys; from trl_sdft.testing import build_model, build_tokenizer; tok = build_tokenizer(); "
                "build_model(tok).save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])"
            )
            self._build(lambda: self.run([PYTHON, "-c", code, "model.tmp"], self.root, "tiny-model"))
            (self.root / "model.tmp").rename(path)
        return path

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model())
        return self._tokenizer

    def facts(self) -> Path:
        path = self.root / "facts.jsonl"
        if not path.exists():
            from trl_sdft.testing import facts_rows

            write_jsonl(path, facts_rows())
        return path

    def extraction(self) -> Path:
        """`chat.jsonl` (12 chats), `teacher.parquet` (top-8) and `kept.jsonl`, by extract_logits.py."""
        path = self.root / "extract"
        if not (path / "teacher.parquet").exists():

            def build():
                path.mkdir(exist_ok=True)
                write_jsonl(path / "chat.jsonl", conversations())
                argv = [PYTHON, EXTRACT, "--input_file", "chat.jsonl", "--output_file", "teacher.parquet"]
                argv += ["--filtered_data", "kept.jsonl", "--model_name", str(self.model()), "--topk", "8"]
                self.run(argv + ["--batch_size", "4"], path, "extraction")

            self._build(build)
        return path

    def finished_run(self, teacher: str = "base") -> Path:
        """The output directory of a finished 2-step SDFT run with checkpoint-1 and checkpoint-2."""
        path = self.root / f"run-{teacher}"
        if not (path / "out" / "model.safetensors").exists():

            def build():
                path.mkdir(exist_ok=True)
                argv = sdft_argv(
                    self.model(), "out", self.facts(), save_strategy="steps", save_steps=1, teacher_model_kind=teacher
                )
                self.run(argv, path, f"finished-{teacher}-run")
                if not (path / "out" / "checkpoint-2").is_dir():
                    raise SetupError(f"the finished {teacher} run wrote no checkpoint-2")

            self._build(build)
        return path / "out"


# --------------------------------------------------------------------------------------------------- the cases
@dataclass
class Plan:
    """What a case runs, and how its result is judged."""

    argv: list[str]
    check: Callable[[Result], str | None] | None = None  # on exit 0: None if correct, else what is wrong
    always: Callable[[Result], str | None] | None = None  # on exit 0 and 2 alike (e.g. no code was run)
    allowed: tuple[str, ...] = ()  # pre-existing files (patterns under the case directory) the run may change
    concurrent: list[list[str]] = field(default_factory=list)  # started at the same moment as `argv`
    permissions: bool = False  # file permissions must hold (as root: without the capabilities that bypass them)
    note: str = ""  # shown for `handled`
    names: tuple[str, ...] = ()  # what a clear error must name (a file, a flag): else it is `unclear-error`


@dataclass
class Case:
    name: str
    category: str
    expected: str
    build: Callable[["Ctx"], Plan]


CASES: list[Case] = []


def case(name: str, category: str, expected: str):
    assert expected in OUTCOMES, expected

    def register(build):
        assert all(c.name != name for c in CASES), name
        CASES.append(Case(name, category, expected, build))
        return build

    return register


class Ctx:
    """A case's directory (the subprocess's working directory) and helpers to fill it."""

    def __init__(self, directory: Path, assets: Assets):
        self.dir, self.assets = directory, assets

    def path(self, name: str) -> Path:
        return self.dir / name

    def write(self, name: str, text: str) -> Path:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def jsonl(self, name: str, rows) -> Path:
        return write_jsonl(self.dir / name, rows)

    def model_copy(self, name: str = "model") -> Path:
        return Path(shutil.copytree(self.assets.model(), self.dir / name))

    def run_copy(self, teacher: str = "base", name: str = "out") -> Path:
        return Path(shutil.copytree(self.assets.finished_run(teacher), self.dir / name, symlinks=True))

    # scripts/sdft.py
    def sdft(self, *extra, model=None, out="out", dataset=None, **flags) -> list[str]:
        dataset = str(self.assets.facts()) if dataset is None else (dataset or None)
        return sdft_argv(str(model or self.assets.model()), out, dataset, *extra, **flags)

    # scripts/extract_logits.py
    def chats(self, name: str = "chat.jsonl", records=None) -> Path:
        return self.jsonl(name, conversations() if records is None else records)

    def extract(self, *extra, data="chat.jsonl", output="t.parquet", filtered="kept.jsonl", model=None, topk=8):
        argv = [PYTHON, EXTRACT, "--input_file", str(data), "--output_file", str(output)]
        argv += ["--filtered_data", str(filtered), "--model_name", str(model or self.assets.model())]
        return argv + ["--topk", str(topk), "--batch_size", "4", *map(str, extra)]

    # scripts/distill_sft.py
    def offline_files(self) -> tuple[Path, Path]:
        """Copies of the shared extraction's kept JSONL and Parquet in the case directory."""
        source = self.assets.extraction()
        kept = Path(shutil.copy(source / "kept.jsonl", self.dir / "kept.jsonl"))
        return kept, Path(shutil.copy(source / "teacher.parquet", self.dir / "teacher.parquet"))

    def distill(self, *extra, output="out", student=None, kept=None, logits=None, raw=None, **overrides):
        """distill_sft.py on a copy of the tiny model (the student) and the extraction's files; `overrides` replace
        keys of the JSON config (tests/test_offline_hardening.py's shape), `raw` replaces the whole file."""
        if kept is None or logits is None:
            default_kept, default_logits = self.offline_files()
            kept, logits = kept or default_kept, logits or default_logits
        if student is None:
            student = self.model_copy("student") if not self.path("student").exists() else self.path("student")
        config = {
            "model_name": str(student),
            "trainer": {"max_steps": 2, "per_device_train_batch_size": 4, "save_strategy": "no", "logging_steps": 1},
            "train": {"data_path": str(kept), "teacher_logits": str(logits)},
            "max_seq_length": 128,
            **overrides,
        }
        self.write("distill.json", raw if raw is not None else json.dumps(config))
        return [PYTHON, DISTILL, "--config_file", "distill.json", "--output_dir", str(output), *map(str, extra)]

    # scripts/continual.py
    def continual(self, *extra, tasks="facts", out="cont") -> list[str]:
        """A comparison cut to the bone (SFT, 1 step, 2 rows) so that a wrongly accepted input ends soon."""
        argv = [PYTHON, CONTINUAL, "--model", str(self.assets.model()), "--method", "sft", "--steps", "1"]
        argv += ["--max_train_rows", "2", "--max_test_rows", "2", "--num_probes", "2", "--learning_rates", "1e-4"]
        return argv + ["--tasks", tasks, "--output_dir", out, *map(str, extra)]


# ---- checks
def weights_problem(directory: Path) -> str | None:
    """None when `directory` holds a model.safetensors with finite weights."""
    import torch
    from safetensors import safe_open

    path = directory / "model.safetensors"
    if not path.is_file():
        return f"no model was saved ({path.name} missing in {directory.name}/)"
    try:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                if not torch.isfinite(f.get_tensor(name)).all():
                    return f"non-finite weights saved ({name} in {directory.name}/)"
    except Exception as err:  # any failure to read is the finding
        return f"saved weights unreadable ({type(err).__name__}: {str(err).splitlines()[0][:100]})"
    return None


def model_saved(directory: Path, why: str | None = None) -> Callable[[Result], str | None]:
    """exit 0 is right when a finite model was saved (else: what is wrong); with `why`, exit 0 is wrong anyway."""

    def check(result: Result) -> str | None:
        problem = weights_problem(directory)
        if why:
            return f"{why}; {problem}" if problem else why
        return problem

    return check


def accepted(what: str) -> Callable[[Result], str]:
    return lambda result: f"exit 0: {what}"


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def rewrite_parquet(src: Path, dst: Path, change=None, metadata="keep", drop=()) -> Path:
    """The Parquet at `src` with its rows changed by `change(rows)`, written to `dst` with pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(src)
    rows = table.to_pylist()
    if change:
        change(rows)
    new = pa.Table.from_pylist(rows, schema=table.schema)
    if metadata != "keep":
        new = new.replace_schema_metadata(metadata)
    if drop:
        new = new.drop_columns(list(drop))
    pq.write_table(new, dst)
    return dst


def poison_weights(model_dir: Path, tensor: str = "lm_head.weight", row: int | None = 7) -> None:
    """NaN into one row (or all) of a saved tensor."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    if row is None:
        tensors[tensor].fill_(math.nan)
    else:
        tensors[tensor][row] = math.nan
    save_file(tensors, str(path), metadata={"format": "pt"})


def no_code_ran(marker: Path) -> Callable[[Result], str | None]:
    def check(result: Result) -> str | None:
        if marker.exists() or any(line.strip() == "pwned" for line in result.stdout.splitlines()):
            return "the YAML tag RAN CODE (os.system)"
        return None

    return check


def pwn_tag(marker: Path) -> str:
    return f'!!python/object/apply:os.system ["echo pwned && touch {marker}"]'


# ========================================================================================= output directories
@case("sdft-output-finished-run", "output dirs", "clear-error")
def _(c: Ctx) -> Plan:
    c.run_copy()
    return Plan(c.sdft(), check=model_saved(c.path("out"), "exit 0 into a finished run's --output_dir"))


@case("sdft-output-finished-run-overwrite", "output dirs", "handled")
def _(c: Ctx) -> Plan:
    out = c.run_copy()
    old = _digest(str(out / "model.safetensors"))

    def check(result: Result) -> str | None:
        if any(out.glob("checkpoint-*")):
            return "the earlier run's checkpoints were kept (a later `resume true` would pick one)"
        if _digest(str(out / "model.safetensors")) == old:
            return "the earlier model was not replaced"
        return weights_problem(out)

    argv = c.sdft("--overwrite_output_dir", max_steps=1)  # 1 step: other weights than the earlier 2-step run's
    return Plan(argv, check=check, allowed=("out/**",), note="replaced, old checkpoints gone")


@case("sdft-two-runs-one-output-dir", "output dirs", "clear-error")
def _(c: Ctx) -> Plan:
    argv = c.sdft(max_steps=4)

    def winner(result: Result) -> str | None:
        if all(r.code == 0 for r in result.all):
            return "both runs exited 0 writing into one --output_dir"
        if result.code == 2 and not any(r.code == 0 for r in result.all):
            return None  # both refused: judged by the error line
        return weights_problem(c.path("out")) if result.code == 2 else None

    return Plan(argv, concurrent=[argv], always=winner)


@case("sdft-output-dir-is-model-dir", "output dirs", "clear-error")
def _(c: Ctx) -> Plan:
    model = c.model_copy()
    return Plan(c.sdft(model="model", out="model"), check=accepted(f"trained into its own model dir {model.name}/"))


@case("sdft-output-dir-is-dataset-file", "output dirs", "clear-error")
def _(c: Ctx) -> Plan:
    shutil.copy(c.assets.facts(), c.path("facts.jsonl"))
    return Plan(c.sdft(out="facts.jsonl", dataset="facts.jsonl"))


@case("sdft-output-under-a-file", "output dirs", "clear-error")
def _(c: Ctx) -> Plan:
    c.write("notes.txt", "my notes\n")
    return Plan(c.sdft(out="notes.txt/run"))


@case("sdft-output-read-only", "output dirs", "clear-error")
def _(c: Ctx) -> Plan:
    readonly = c.path("ro")
    readonly.mkdir()
    readonly.chmod(0o555)
    return Plan(c.sdft(out="ro/run"), permissions=True)


@case("extract-filtered-equals-input", "output dirs", "clear-error")
def _(c: Ctx) -> Plan:
    c.chats()
    return Plan(c.extract(filtered="chat.jsonl"))


@case("extract-filtered-symlink-to-input", "output dirs", "clear-error")
def _(c: Ctx) -> Plan:
    c.chats()
    c.path("link.jsonl").symlink_to("chat.jsonl")
    return Plan(c.extract(filtered="link.jsonl"))


@case("extract-output-equals-input", "output dirs", "clear-error")
def _(c: Ctx) -> Plan:
    c.chats()
    c.path("sub").mkdir()
    return Plan(c.extract(output="sub/../chat.jsonl"))


@case("extract-output-equals-filtered", "output dirs", "clear-error")
def _(c: Ctx) -> Plan:
    c.chats()
    return Plan(c.extract(output="t.parquet", filtered="t.parquet"))


@case("extract-output-under-a-file", "output dirs", "clear-error")
def _(c: Ctx) -> Plan:
    c.chats()
    return Plan(c.extract(output="chat.jsonl/t.parquet"))


@case("extract-output-read-only", "output dirs", "clear-error")
def _(c: Ctx) -> Plan:
    c.chats()
    readonly = c.path("ro")
    readonly.mkdir()
    readonly.chmod(0o555)
    return Plan(c.extract(output="ro/t.parquet"), permissions=True)


@case("extract-output-exists-not-parquet", "output dirs", "clear-error")
def _(c: Ctx) -> Plan:
    c.chats()
    c.write("t.parquet", "my own file, not a parquet\n")
    return Plan(c.extract())


@case("extract-output-from-other-settings", "output dirs", "clear-error")
def _(c: Ctx) -> Plan:
    source = c.assets.extraction()
    for name in ("chat.jsonl", "teacher.parquet", "kept.jsonl"):
        shutil.copy(source / name, c.path(name))
    return Plan(c.extract(output="teacher.parquet", topk=4))


@case("extract-rerun-same-settings", "output dirs", "handled")
def _(c: Ctx) -> Plan:
    source = c.assets.extraction()
    for name in ("chat.jsonl", "teacher.parquet", "kept.jsonl"):
        shutil.copy(source / name, c.path(name))
    return Plan(c.extract(output="teacher.parquet"), check=lambda r: None, note="complete already: nothing redone")


@case("distill-output-is-student-dir", "output dirs", "clear-error")
def _(c: Ctx) -> Plan:
    c.model_copy("student")
    return Plan(c.distill(output="student"), check=accepted("wrote the distilled model over its own student"))


@case("distill-output-holds-a-model", "output dirs", "clear-error")
def _(c: Ctx) -> Plan:
    c.model_copy("earlier")
    return Plan(c.distill(output="earlier"), check=accepted("replaced the model in --output_dir unasked"))


@case("distill-output-holds-a-model-overwrite", "output dirs", "handled")
def _(c: Ctx) -> Plan:
    c.model_copy("earlier")
    argv = c.distill("--overwrite", output="earlier")
    return Plan(argv, check=model_saved(c.path("earlier")), allowed=("earlier/**",), note="replaced on request")


@case("distill-output-under-a-file", "output dirs", "clear-error")
def _(c: Ctx) -> Plan:
    return Plan(c.distill(output="distill.json/out"))


@case("continual-output-exists", "output dirs", "clear-error")
def _(c: Ctx) -> Plan:
    c.write("cont/retention.json", json.dumps({"config": {}, "runs": []}))
    return Plan(c.continual())


@case("continual-output-is-a-file", "output dirs", "clear-error")
def _(c: Ctx) -> Plan:
    c.write("notes.txt", "my notes\n")
    return Plan(c.continual(out="notes.txt"))


# ================================================================================================ checkpoints
@case("resume-missing-dir", "checkpoints", "clear-error")
def _(c: Ctx) -> Plan:
    return Plan(c.sdft(resume_from_checkpoint="out/checkpoint-99"))


@case("resume-true-without-checkpoints", "checkpoints", "clear-error")
def _(c: Ctx) -> Plan:
    return Plan(c.sdft(resume_from_checkpoint="true"), check=accepted("started from scratch though asked to resume"))


@case("resume-true-with-checkpoints", "checkpoints", "handled")
def _(c: Ctx) -> Plan:
    out = c.run_copy()

    def check(result: Result) -> str | None:
        state = out / "checkpoint-3" / "trainer_state.json"
        if not state.is_file():
            return "no checkpoint-3 after resuming to step 3"
        if json.loads(state.read_text()).get("global_step") != 3:
            return "checkpoint-3 is not at step 3"
        return weights_problem(out)

    argv = c.sdft(resume_from_checkpoint="true", max_steps=3, save_strategy="steps", save_steps=1)
    return Plan(argv, check=check, allowed=("out/*",), note="resumed at step 2, checkpoint-3 written")


@case("resume-explicit-checkpoint", "checkpoints", "handled")
def _(c: Ctx) -> Plan:
    out = c.run_copy()

    def check(result: Result) -> str | None:
        state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
        return "checkpoint-2 not rewritten at step 2" if state.get("global_step") != 2 else weights_problem(out)

    argv = c.sdft(resume_from_checkpoint="out/checkpoint-1", save_strategy="steps", save_steps=1)
    return Plan(argv, check=check, allowed=("out/*", "out/checkpoint-2/**"), note="resumed at step 1")


@case("resume-truncated-trainer-state", "checkpoints", "clear-error")
def _(c: Ctx) -> Plan:
    out = c.run_copy()
    truncate(out / "checkpoint-2" / "trainer_state.json")
    return Plan(c.sdft(resume_from_checkpoint="out/checkpoint-2"))


@case("resume-true-newest-truncated", "checkpoints", "handled")
def _(c: Ctx) -> Plan:
    out = c.run_copy()
    truncate(out / "checkpoint-2" / "trainer_state.json")

    def check(result: Result) -> str | None:
        if "checkpoint-2" not in result.stderr:
            return "no warning that the cut-short checkpoint-2 was skipped"
        state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
        return "checkpoint-2 not rewritten at step 2" if state.get("global_step") != 2 else weights_problem(out)

    argv = c.sdft(resume_from_checkpoint="true", save_strategy="steps", save_steps=1)
    return Plan(argv, check=check, allowed=("out/*", "out/checkpoint-2/**"), note="fell back to checkpoint-1, warned")


@case("resume-true-all-truncated", "checkpoints", "clear-error")
def _(c: Ctx) -> Plan:
    out = c.run_copy()
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        truncate(out / checkpoint / "trainer_state.json")
    return Plan(c.sdft(resume_from_checkpoint="true"))


@case("resume-truncated-model-safetensors", "checkpoints", "clear-error")
def _(c: Ctx) -> Plan:
    out = c.run_copy()
    truncate(out / "checkpoint-2" / "model.safetensors")
    return Plan(c.sdft(resume_from_checkpoint="out/checkpoint-2"))


@case("resume-checkpoint-is-a-file", "checkpoints", "clear-error")
def _(c: Ctx) -> Plan:
    out = c.run_copy()
    return Plan(c.sdft(resume_from_checkpoint=str((out / "checkpoint-2" / "trainer_state.json").relative_to(c.dir))))


@case("resume-ema-run-with-base-teacher", "checkpoints", "handled")
def _(c: Ctx) -> Plan:
    out = c.run_copy("ema")

    def check(result: Result) -> str | None:
        warned = any(re.search(r"\bema\b.*teacher|teacher.*\bema\b", line, re.I) for line in result.stderr.splitlines())
        return weights_problem(out) or (None if warned else "no warning that the EMA teacher is dropped")

    argv = c.sdft(resume_from_checkpoint="true", teacher_model_kind="base", max_steps=3)
    return Plan(argv, check=check, allowed=("out/*",), note="warned: the EMA teacher is dropped")


@case("resume-base-run-with-ema-teacher", "checkpoints", "clear-error")
def _(c: Ctx) -> Plan:
    c.run_copy("base")
    argv = c.sdft(resume_from_checkpoint="true", teacher_model_kind="ema", max_steps=3)
    return Plan(argv, allowed=("out/*",), check=accepted("resumed an EMA run from a checkpoint with no teacher state"))


# =============================================================================================== offline data
@case("extract-happy-path", "offline data", "handled")
def _(c: Ctx) -> Plan:
    c.chats()

    def check(result: Result) -> str | None:
        import pyarrow.parquet as pq

        table = pq.read_table(c.path("t.parquet"))
        kept = c.path("kept.jsonl").read_text().splitlines()
        if table.num_rows != 12 or len(kept) != 12:
            return f"{table.num_rows} rows and {len(kept)} kept records, expected 12"
        values = [v for row in table.column("topk_values").to_pylist() for v in row]
        return None if all(math.isfinite(v) for v in values) else "non-finite logits written"

    return Plan(c.extract(), check=check, note="12 rows, finite")


@case("extract-nan-teacher", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    c.chats()
    poison_weights(c.model_copy("teacher"))

    def check(result: Result) -> str | None:
        import pyarrow.parquet as pq

        values = [v for row in pq.read_table(c.path("t.parquet")).column("topk_values").to_pylist() for v in row]
        bad = sum(not math.isfinite(v) for v in values)
        return f"exit 0 with {bad} non-finite teacher logits stored" if bad else "exit 0 from a NaN teacher"

    return Plan(c.extract(model="teacher"), check=check)


@case("extract-topk-above-vocab", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    c.chats()
    return Plan(c.extract(topk=100000), check=accepted("--topk 100000 above the vocabulary stored as is"))


@case("extract-topk-zero", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    c.chats()
    return Plan(c.extract(topk=0))


@case("extract-empty-input", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    c.write("chat.jsonl", "")
    return Plan(c.extract(), check=accepted("an extraction of zero records"))


@case("extract-all-rejected", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    c.chats(records=[{"messages": [{"role": "user", "content": "hi"}]}, {"text": "no messages"}, {"messages": []}])
    return Plan(c.extract(), check=accepted("every record rejected, an empty extraction written"))


@case("extract-corrupt-jsonl-line", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    lines = [json.dumps(r) for r in conversations(4)]
    lines[2] = '{"messages": [{"role": "user", "content": "trunc'
    c.jsonl("chat.jsonl", lines)
    return Plan(c.extract(), check=accepted("a corrupt line was dropped silently"))


@case("extract-lone-surrogate", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    lines = [json.dumps(r) for r in conversations(4)]
    lines[1] = (
        f'{{"messages": [{{"role": "user", "content": "hi {SURROGATE}"}}, {{"role": "assistant", "content": "ok"}}]}}'
    )
    c.jsonl("chat.jsonl", lines)
    return Plan(c.extract(), check=accepted("a lone surrogate was accepted"))


@case("extract-missing-input", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    return Plan(c.extract(data="no-such.jsonl"))


@case("extract-missing-model", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    c.chats()
    return Plan(c.extract(model="./no-such-model"))


@case("extract-truncated-model", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    c.chats()
    truncate(c.model_copy("teacher") / "model.safetensors")
    return Plan(c.extract(model="teacher"))


@case("distill-happy-path", "offline data", "handled")
def _(c: Ctx) -> Plan:
    return Plan(c.distill(), check=model_saved(c.path("out")), note="student saved, finite")


def _poisoned(c: Ctx, change, why: str) -> Plan:
    kept, logits = c.offline_files()
    rewrite_parquet(logits, c.path("bad.parquet"), change)
    return Plan(c.distill(kept=kept, logits=c.path("bad.parquet")), check=model_saved(c.path("out"), why))


@case("distill-nan-logits", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    return _poisoned(c, lambda rows: rows[5]["topk_values"].__setitem__(3, math.nan), "NaN teacher logits accepted")


@case("distill-inf-logits", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    return _poisoned(c, lambda rows: rows[0]["topk_values"].__setitem__(0, math.inf), "inf teacher logits accepted")


@case("distill-out-of-vocab-index", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    vocab = len(c.assets.tokenizer())
    return _poisoned(c, lambda rows: rows[2]["topk_indices"].__setitem__(1, vocab + 7), "an index >= vocab accepted")


@case("distill-negative-index", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    return _poisoned(c, lambda rows: rows[7]["topk_indices"].__setitem__(1, -1), "a negative index accepted")


@case("distill-parquet-rows-reordered", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    def swap(rows):
        rows[0], rows[1] = rows[1], rows[0]

    return _poisoned(c, swap, "Parquet rows out of the JSONL's order accepted")


@case("distill-ragged-row", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    def cut(rows):
        rows[3]["topk_indices"].pop()
        rows[3]["topk_values"].pop()

    return _poisoned(c, cut, "a row with a partial position accepted")


@case("distill-records-swapped-same-length", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    import pyarrow.parquet as pq

    kept, logits = c.offline_files()
    records = [json.loads(line) for line in kept.read_text().splitlines()]
    lengths = [len(row) for row in pq.read_table(logits).column("topk_indices").to_pylist()]
    pair = next(
        (
            (i, j)
            for i in range(len(records))
            for j in range(i + 1, len(records))
            if lengths[i] == lengths[j] and records[i]["messages"] != records[j]["messages"]
        ),
        None,
    )
    if pair is None:
        raise SetupError("no two kept records with the same number of assistant tokens")
    a, b = pair
    records[a]["messages"], records[b]["messages"] = records[b]["messages"], records[a]["messages"]  # idx kept
    c.jsonl("kept.jsonl", records)
    return Plan(
        c.distill(kept=kept, logits=logits), check=accepted(f"records {a} and {b} trained on each other's logits")
    )


@case("distill-answer-edited-same-tokens", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    from trl_sdft.testing import COLORS

    kept, logits = c.offline_files()
    records = [json.loads(line) for line in kept.read_text().splitlines()]
    tokenizer = c.assets.tokenizer()
    answer = records[0]["messages"][-1]["content"]
    count = len(tokenizer(answer)["input_ids"])
    edited = next(
        (
            answer.replace(COLORS[0], other)
            for other in COLORS[1:]
            if len(tokenizer(answer.replace(COLORS[0], other))["input_ids"]) == count
        ),
        None,
    )
    if edited is None or edited == answer:
        raise SetupError(f"no color gives {answer!r} the same token count")
    records[0]["messages"][-1]["content"] = edited
    c.jsonl("kept.jsonl", records)
    return Plan(c.distill(kept=kept, logits=logits), check=accepted(f"trained {edited!r} on the logits of {answer!r}"))


@case("distill-parquet-without-metadata", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    kept, logits = c.offline_files()
    rewrite_parquet(logits, c.path("bare.parquet"), metadata={})
    return Plan(c.distill(kept=kept, logits=c.path("bare.parquet")))


@case("distill-parquet-missing-column", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    kept, logits = c.offline_files()
    rewrite_parquet(logits, c.path("cut.parquet"), drop=["topk_values"])
    return Plan(c.distill(kept=kept, logits=c.path("cut.parquet")))


@case("distill-garbage-parquet", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    kept, _ = c.offline_files()
    c.write("garbage.parquet", "PAR1 this is not a parquet file")
    return Plan(c.distill(kept=kept, logits=c.path("garbage.parquet")))


@case("distill-truncated-parquet", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    kept, logits = c.offline_files()
    shutil.copy(logits, c.path("truncated.parquet"))
    truncate(c.path("truncated.parquet"))
    return Plan(c.distill(kept=kept, logits=c.path("truncated.parquet")))


@case("distill-kept-corrupt-line", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    kept, logits = c.offline_files()
    lines = kept.read_text().splitlines()
    lines[3] = lines[3][: len(lines[3]) // 2]
    c.jsonl("kept.jsonl", lines)
    return Plan(c.distill(kept=kept, logits=logits))


@case("distill-kept-lone-surrogate", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    kept, logits = c.offline_files()
    lines = kept.read_text().splitlines()
    lines[0] = lines[0].replace("What color", f"What {SURROGATE} color", 1)
    c.jsonl("kept.jsonl", lines)
    return Plan(c.distill(kept=kept, logits=logits))


@case("distill-student-missing", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    return Plan(c.distill(student="./no-such-model"))


@case("distill-student-truncated-weights", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    truncate(c.model_copy("student") / "model.safetensors")
    return Plan(c.distill())


def _config_case(c: Ctx, why: str, **overrides) -> Plan:
    return Plan(c.distill(**overrides), check=model_saved(c.path("out"), why))


@case("distill-config-loss-multi-string", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    return _config_case(c, "loss_multi 'abc' accepted", loss_multi="abc")


@case("distill-config-loss-multi-nan", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    return _config_case(c, "loss_multi NaN accepted", loss_multi=math.nan)


@case("distill-config-loss-multi-negative", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    return _config_case(c, "loss_multi -1 accepted (maximises the KL)", loss_multi=-1.0)


@case("distill-config-max-seq-length-string", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    return _config_case(c, "max_seq_length '10' accepted", max_seq_length="10")


@case("distill-config-trainer-list", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    return _config_case(c, "trainer as a list accepted", trainer=[{"max_steps": 2}])


@case("distill-config-train-string", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    return _config_case(c, "train as a string accepted", train="kept.jsonl")


@case("distill-config-data-path-number", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    return _config_case(c, "data_path 3 accepted", train={"data_path": 3, "teacher_logits": "teacher.parquet"})


@case("distill-config-unknown-key", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    return _config_case(c, "an unknown key accepted", los_multi=0.5)


@case("distill-config-invalid-json", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    return Plan(c.distill(raw='{"model_name": "student", "train": {"data_path": "kept.jsonl",}'))


@case("distill-config-missing", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    return Plan([PYTHON, DISTILL, "--config_file", "no-such.json", "--output_dir", "out"])


@case("distill-max-seq-length-below-every-record", "offline data", "clear-error")
def _(c: Ctx) -> Plan:
    return _config_case(c, "trained on no record", max_seq_length=4)


# ============================================================================================== config values
def _sdft_bad_value(c: Ctx, why: str, *extra, **flags) -> Plan:
    return Plan(c.sdft(*extra, **flags), check=model_saved(c.path("out"), why))


@case("sdft-is-clip-nan", "config values", "clear-error")
def _(c: Ctx) -> Plan:
    return _sdft_bad_value(c, "--distillation_is_clip nan accepted", distillation_is_clip="nan")


@case("sdft-temperature-inf", "config values", "clear-error")
def _(c: Ctx) -> Plan:
    return _sdft_bad_value(c, "--temperature inf accepted", temperature="inf")


@case("sdft-temperature-zero", "config values", "clear-error")
def _(c: Ctx) -> Plan:
    return _sdft_bad_value(c, "--temperature 0 accepted (logits / 0)", temperature="0")


@case("sdft-learning-rate-nan", "config values", "clear-error")
def _(c: Ctx) -> Plan:
    return _sdft_bad_value(c, "--learning_rate nan accepted", learning_rate="nan")


@case("sdft-skip-every-completion-token", "config values", "clear-error")
def _(c: Ctx) -> Plan:
    why = "trained on nothing: every completion token skipped"
    return _sdft_bad_value(c, why, num_loss_tokens_to_skip=6, max_completion_length=6)


@case("sdft-batch-not-divisible", "config values", "clear-error")
def _(c: Ctx) -> Plan:
    return _sdft_bad_value(c, "batch 3 with 2 generations accepted", per_device_train_batch_size=3)


@case("sdft-template-without-context", "config values", "clear-error")
def _(c: Ctx) -> Plan:
    return _sdft_bad_value(c, "a teacher template without {privileged_context}", teacher_prompt_template="{prompt}")


@case("sdft-unknown-flag", "config values", "clear-error")
def _(c: Ctx) -> Plan:
    return _sdft_bad_value(c, "an unknown flag accepted", "--learnig_rate", "1e-3")


@case("sdft-int-flag-not-a-number", "config values", "clear-error")
def _(c: Ctx) -> Plan:
    return _sdft_bad_value(c, "--max_steps two accepted", max_steps="two")


@case("sdft-generation-kwargs-json", "config values", "handled")
def _(c: Ctx) -> Plan:
    return Plan(c.sdft(generation_kwargs='{"do_sample": true}'), check=model_saved(c.path("out")), note="JSON accepted")


@case("sdft-generation-kwargs-bad-json", "config values", "clear-error")
def _(c: Ctx) -> Plan:
    return _sdft_bad_value(c, "unparsable --generation_kwargs accepted", generation_kwargs="{do_sample: true")


def _yaml_case(c: Ctx, text: str, why: str, **flags) -> Plan:
    c.write("run.yaml", text)
    return Plan(c.sdft("--config", "run.yaml", **flags), check=model_saved(c.path("out"), why))


@case("sdft-yaml-float-for-int", "config values", "clear-error")
def _(c: Ctx) -> Plan:
    return _yaml_case(c, "num_generations: 2.0\n", "num_generations: 2.0 accepted", num_generations=None)


@case("sdft-yaml-duplicate-keys", "config values", "clear-error")
def _(c: Ctx) -> Plan:
    text = "max_steps: 2\nlearning_rate: 1.0e-3\nmax_steps: 3\n"
    return _yaml_case(c, text, "a key given twice accepted (the last wins)", max_steps=None)


@case("sdft-yaml-python-object-tag", "config values", "clear-error")
def _(c: Ctx) -> Plan:
    marker = c.path("PWNED")
    plan = _yaml_case(c, f"learning_rate: 1.0e-3\nx: {pwn_tag(marker)}\n", "a python object tag accepted")
    plan.always = no_code_ran(marker)
    return plan


@case("sdft-yaml-unknown-key", "config values", "clear-error")
def _(c: Ctx) -> Plan:
    return _yaml_case(c, "learnig_rate: 1.0e-3\n", "a misspelt option accepted")


@case("sdft-yaml-not-a-mapping", "config values", "clear-error")
def _(c: Ctx) -> Plan:
    return _yaml_case(c, "- max_steps\n- 2\n", "a YAML list accepted")


@case("sdft-yaml-syntax-error", "config values", "clear-error")
def _(c: Ctx) -> Plan:
    return _yaml_case(c, "max_steps: [2, 3\nlearning_rate: 1\n", "broken YAML accepted", max_steps=None)


@case("sdft-yaml-empty", "config values", "clear-error")
def _(c: Ctx) -> Plan:
    return _yaml_case(c, "# nothing here\n", "an empty config accepted")


@case("sdft-config-missing", "config values", "clear-error")
def _(c: Ctx) -> Plan:
    return _sdft_bad_value(c, "a missing --config ignored", "--config", "nope/run.yaml")


@case("sdft-config-without-path", "config values", "clear-error")
def _(c: Ctx) -> Plan:
    return _sdft_bad_value(c, "--config without a path ignored", "--config")


# ============================================================================================= context limits
@case("sdft-completion-fills-the-context", "context limits", "clear-error")
def _(c: Ctx) -> Plan:
    why = "--max_completion_length 256 = the model's context accepted"
    return _sdft_bad_value(c, why, max_completion_length=256, max_steps=1)


@case("sdft-completion-beyond-the-context", "context limits", "clear-error")
def _(c: Ctx) -> Plan:
    return _sdft_bad_value(
        c, "--max_completion_length 1000 > context accepted", max_completion_length=1000, max_steps=1
    )


def _long_rows(prompt_repeat: int = 0, context_repeat: int = 0) -> list[dict]:
    from trl_sdft.testing import facts_rows

    rows = facts_rows()
    if prompt_repeat:
        rows[2]["prompt"] = "What color is Zorbo? " * prompt_repeat
    if context_repeat:
        rows[1]["privileged_context"] = "Quilla is blue. " + "Filler words about nothing. " * context_repeat
    return rows


@case("sdft-long-prompt-with-max-prompt-length", "context limits", "handled")
def _(c: Ctx) -> Plan:
    c.jsonl("rows.jsonl", _long_rows(prompt_repeat=400))
    argv = c.sdft(dataset="rows.jsonl", max_prompt_length=64)
    return Plan(argv, check=model_saved(c.path("out")), note="prompt cut from the left")


@case("sdft-long-prompt-default-length", "context limits", "clear-error")
def _(c: Ctx) -> Plan:
    c.jsonl("rows.jsonl", _long_rows(prompt_repeat=400))
    return Plan(c.sdft(dataset="rows.jsonl"), check=model_saved(c.path("out"), "a prompt beyond the context accepted"))


@case("sdft-long-privileged-context", "context limits", "handled")
def _(c: Ctx) -> Plan:
    c.jsonl("rows.jsonl", _long_rows(context_repeat=300))

    def check(result: Result) -> str | None:
        if "privileged context" not in result.stderr.lower():
            return "no warning that the privileged context is cut"
        return weights_problem(c.path("out"))

    return Plan(c.sdft(dataset="rows.jsonl"), check=check, note="context end cut, warned")


# =================================================================================================== datasets
def _dataset_case(c: Ctx, name: str, text_or_rows, why: str, **flags) -> Plan:
    if isinstance(text_or_rows, str):
        c.write(name, text_or_rows)
    else:
        c.jsonl(name, text_or_rows)
    return Plan(c.sdft(dataset=name, **flags), check=model_saved(c.path("out"), why))


def _facts(n: int = 8, chat: bool = False) -> list[dict]:
    from trl_sdft.testing import facts_rows

    return facts_rows(n, chat=chat)


@case("dataset-empty-file", "datasets", "clear-error")
def _(c: Ctx) -> Plan:
    return _dataset_case(c, "rows.jsonl", "", "trained on an empty file")


@case("dataset-empty-json-array", "datasets", "clear-error")
def _(c: Ctx) -> Plan:
    return _dataset_case(c, "rows.json", "[]", "trained on no rows")


@case("dataset-mixed-text-and-chat", "datasets", "clear-error")
def _(c: Ctx) -> Plan:
    rows = _facts(4) + _facts(4, chat=True)
    return _dataset_case(c, "rows.jsonl", rows, "text and chat prompts mixed in one batch")


@case("dataset-missing-context-column", "datasets", "clear-error")
def _(c: Ctx) -> Plan:
    rows = [{"prompt": r["prompt"], "answer": r["privileged_context"]} for r in _facts()]
    return _dataset_case(c, "rows.jsonl", rows, "no privileged_context column")


@case("dataset-missing-prompt-column", "datasets", "clear-error")
def _(c: Ctx) -> Plan:
    rows = [{"question": r["prompt"], "privileged_context": r["privileged_context"]} for r in _facts()]
    return _dataset_case(c, "rows.jsonl", rows, "no prompt column")


@case("dataset-none-context", "datasets", "clear-error")
def _(c: Ctx) -> Plan:
    rows = _facts()
    rows[3]["privileged_context"] = None
    return _dataset_case(c, "rows.jsonl", rows, "a None privileged_context accepted")


@case("dataset-empty-context", "datasets", "clear-error")
def _(c: Ctx) -> Plan:
    rows = _facts()
    rows[5]["privileged_context"] = "   "
    return _dataset_case(c, "rows.jsonl", rows, "an empty privileged_context accepted")


@case("dataset-corrupt-jsonl-line", "datasets", "clear-error")
def _(c: Ctx) -> Plan:
    lines = [json.dumps(r) for r in _facts()]
    lines[4] = lines[4][:20]
    return _dataset_case(c, "rows.jsonl", "\n".join(lines) + "\n", "a corrupt line dropped")


@case("dataset-lone-surrogate", "datasets", "clear-error")
def _(c: Ctx) -> Plan:
    lines = [json.dumps(r) for r in _facts()]
    lines[2] = json.dumps({"prompt": "What color is X?", "privileged_context": "X is red."}).replace("X?", SURROGATE)
    return _dataset_case(c, "rows.jsonl", "\n".join(lines) + "\n", "a lone surrogate accepted")


@case("dataset-chat-ends-with-assistant", "datasets", "clear-error")
def _(c: Ctx) -> Plan:
    rows = _facts(chat=True)
    rows[1]["prompt"] = rows[1]["prompt"] + [{"role": "assistant", "content": "red"}]
    return _dataset_case(c, "rows.jsonl", rows, "a chat prompt ending with an assistant turn")


@case("dataset-prompt-is-a-number", "datasets", "clear-error")
def _(c: Ctx) -> Plan:
    rows = [{"prompt": i, "privileged_context": r["privileged_context"]} for i, r in enumerate(_facts())]
    return _dataset_case(c, "rows.jsonl", rows, "numbers as prompts accepted")


@case("dataset-missing-path", "datasets", "clear-error")
def _(c: Ctx) -> Plan:
    return Plan(c.sdft(dataset="no-such.jsonl"))


@case("dataset-unknown-extension", "datasets", "clear-error")
def _(c: Ctx) -> Plan:
    return _dataset_case(c, "rows.txt", "What color is Zorbo?\n", "a .txt file accepted")


@case("dataset-garbage-parquet", "datasets", "clear-error")
def _(c: Ctx) -> Plan:
    return _dataset_case(c, "rows.parquet", "junk, not parquet", "junk read as Parquet")


@case("dataset-csv", "datasets", "handled")
def _(c: Ctx) -> Plan:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ["prompt", "privileged_context"])
    writer.writeheader()
    writer.writerows(_facts())
    c.write("rows.csv", buffer.getvalue())
    return Plan(c.sdft(dataset="rows.csv"), check=model_saved(c.path("out")), note="trained")


@case("dataset-chat-prompts", "datasets", "handled")
def _(c: Ctx) -> Plan:
    c.jsonl("rows.jsonl", _facts(chat=True))
    return Plan(c.sdft(dataset="rows.jsonl"), check=model_saved(c.path("out")), note="trained")


@case("model-missing-path", "datasets", "clear-error")
def _(c: Ctx) -> Plan:
    return Plan(c.sdft(model="./no-such-model"))


@case("model-truncated-weights", "datasets", "clear-error")
def _(c: Ctx) -> Plan:
    truncate(c.model_copy() / "model.safetensors")
    return Plan(c.sdft(model="model"))


@case("model-dir-without-config", "datasets", "clear-error")
def _(c: Ctx) -> Plan:
    (c.model_copy() / "config.json").unlink()
    return Plan(c.sdft(model="model"))


@case("model-nan-weights", "datasets", "clear-error")
def _(c: Ctx) -> Plan:
    poison_weights(c.model_copy(), row=None)
    return Plan(c.sdft(model="model"), check=model_saved(c.path("out"), "trained a model whose head is NaN"))


# ================================================================================================== continual
def _continual_case(c: Ctx, *extra, tasks="facts") -> Plan:
    return Plan(c.continual(*extra, tasks=tasks), check=accepted("the comparison ran"))


@case("continual-missing-task-file", "continual", "clear-error")
def _(c: Ctx) -> Plan:
    return _continual_case(c, tasks="facts,my_tasks/units.jsonl")


@case("continual-corrupt-task-file", "continual", "clear-error")
def _(c: Ctx) -> Plan:
    row = {"split": "train", "prompt": "How many grams in a zorg?", "privileged_context": "40", "demonstration": "40"}
    c.write("units.jsonl", json.dumps(row) + "\n" + '{"split": "test", "prompt": "What does\n')
    return _continual_case(c, tasks="units.jsonl")


@case("continual-task-without-test-rows", "continual", "clear-error")
def _(c: Ctx) -> Plan:
    row = {"split": "train", "prompt": "How many grams in a zorg?", "privileged_context": "40", "demonstration": "40"}
    c.jsonl("units.jsonl", [row, row])
    return _continual_case(c, tasks="units.jsonl")


@case("continual-same-task-twice", "continual", "clear-error")
def _(c: Ctx) -> Plan:
    return _continual_case(c, tasks="facts,facts")


@case("continual-no-tasks", "continual", "clear-error")
def _(c: Ctx) -> Plan:
    return _continual_case(c, tasks=",")


@case("continual-grid-alpha-out-of-range", "continual", "clear-error")
def _(c: Ctx) -> Plan:
    c.write("grid.yaml", "- {method: sdft, learning_rate: 1.0e-4, alpha: 2}\n")
    return _continual_case(c, "--grid", "grid.yaml")


@case("continual-grid-missing", "continual", "clear-error")
def _(c: Ctx) -> Plan:
    return _continual_case(c, "--grid", "configs/nope.yaml")


@case("continual-grid-not-a-list", "continual", "clear-error")
def _(c: Ctx) -> Plan:
    c.write("grid.yaml", "method: sft\nlearning_rate: 1.0e-4\n")
    return _continual_case(c, "--grid", "grid.yaml")


@case("continual-grid-duplicate-point", "continual", "clear-error")
def _(c: Ctx) -> Plan:
    c.write("grid.jsonl", '{"method": "sft", "learning_rate": 1e-4}\n{"method": "sft", "learning_rate": 0.0001}\n')
    return _continual_case(c, "--grid", "grid.jsonl")


@case("continual-grid-python-object-tag", "continual", "clear-error")
def _(c: Ctx) -> Plan:
    marker = c.path("PWNED")
    c.write("grid.yaml", f"- {pwn_tag(marker)}\n")
    plan = _continual_case(c, "--grid", "grid.yaml")
    plan.always = no_code_ran(marker)
    return plan


@case("continual-learning-rates-not-numbers", "continual", "clear-error")
def _(c: Ctx) -> Plan:
    return _continual_case(c, "--learning_rates", "fast,slow")


@case("continual-learning-rate-negative", "continual", "clear-error")
def _(c: Ctx) -> Plan:
    return _continual_case(c, "--learning_rates=-1e-4")


@case("continual-alpha-out-of-range", "continual", "clear-error")
def _(c: Ctx) -> Plan:
    return _continual_case(c, "--method", "both", "--alphas", "2")


@case("continual-batch-not-divisible", "continual", "clear-error")
def _(c: Ctx) -> Plan:
    return _continual_case(c, "--method", "both", "--batch_size", "3", "--num_generations", "2")


@case("continual-zero-steps", "continual", "clear-error")
def _(c: Ctx) -> Plan:
    return _continual_case(c, "--steps", "0")


# =================================================================================================== security
@case("vllm-serve-default-host", "security", "handled")
def _(c: Ctx) -> Plan:
    code = (
        "import json, sys; from trl_sdft.cli import vllm_serve_command; "
        "command, _ = vllm_serve_command(['--model', sys.argv[1]], cuda=False); print(json.dumps(command))"
    )

    def check(result: Result) -> str | None:
        command = json.loads(result.stdout.strip().splitlines()[-1])
        host = command[command.index("--host") + 1] if "--host" in command else "(vLLM's default)"
        return None if host == "127.0.0.1" else f"vllm-serve binds {host} by default (reachable from the network)"

    return Plan([PYTHON, "-c", code, str(c.assets.model())], check=check, note="binds 127.0.0.1")


@case("vllm-serve-help", "security", "handled")
def _(c: Ctx) -> Plan:
    def check(result: Result) -> str | None:
        text = " ".join(result.stdout.split())
        if "--host" not in text:
            return "no --host in the help"
        return None if "127.0.0.1" in text else "the help does not say the server binds 127.0.0.1 by default"

    return Plan([PYTHON, SDFT, "vllm-serve", "--help"], check=check, note="help printed, no server")


# ================================================================================================ round two
# Cases aimed at what the first round added (the output-dir rule and its lock, --overwrite_output_dir, resume, chat
# templates, tools, encodings): the second hardening round (issue 30).
TOOL_MODULE = '''
def lookup(name: str) -> str:
    """Look up a name.

    Args:
        name: The name.
    """
    return name.upper()
'''


def _chat_facts(c: Ctx) -> str:
    from trl_sdft.testing import facts_rows

    c.jsonl("chat.jsonl", facts_rows(chat=True))
    return "chat.jsonl"


def _other_model(c: Ctx, name: str = "wide") -> Path:
    """A model of another shape (hidden size 64) with the same tokenizer: a checkpoint of the tiny model does not fit."""
    from trl_sdft.testing import build_model

    path = c.path(name)
    build_model(c.assets.tokenizer(), hidden_size=64, heads=2).save_pretrained(path)
    c.assets.tokenizer().save_pretrained(path)
    return path


def _peak_rss(argv: list[str]) -> list[str]:
    """`argv` (a Python script) run so that its peak RSS (KiB) is printed to stderr at exit."""
    code = (
        "import atexit, resource, runpy, sys; atexit.register(lambda: print('peak_rss_kib', "
        "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)); sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    return [PYTHON, "-c", code, *argv[1:]]


@case("sdft-start-model-in-output-checkpoint-overwrite", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    c.run_copy()
    argv = c.sdft("--overwrite_output_dir", model="out/checkpoint-2")
    return Plan(
        argv, check=accepted("trained from a checkpoint --overwrite_output_dir removes"), names=("checkpoint-2",)
    )


@case("sdft-dataset-in-output-checkpoint-overwrite", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    out = c.run_copy()
    shutil.copy(c.assets.facts(), out / "checkpoint-1" / "facts.jsonl")
    argv = c.sdft("--overwrite_output_dir", dataset="out/checkpoint-1/facts.jsonl")
    return Plan(argv, check=accepted("read a dataset that --overwrite_output_dir removes"), names=("facts.jsonl",))


@case("sdft-resume-from-other-dir-into-finished-run", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    c.run_copy(name="first")
    c.run_copy(name="out")
    argv = c.sdft(resume_from_checkpoint="first/checkpoint-1")
    return Plan(argv, check=accepted("replaced a finished run in --output_dir without --overwrite_output_dir"))


@case("sdft-resume-from-other-dir-overwrite", "round two", "handled")
def _(c: Ctx) -> Plan:
    c.run_copy(name="first")
    out = c.run_copy(name="out")

    def check(result: Result) -> str | None:
        if (out / "checkpoint-1").exists():
            return "the replaced run's checkpoints were kept"
        return weights_problem(out)

    argv = c.sdft("--overwrite_output_dir", resume_from_checkpoint="first/checkpoint-1")
    return Plan(argv, check=check, allowed=("out/**",), note="resumed elsewhere, old run replaced on request")


@case("sdft-output-holds-users-readme", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    c.write("out/README.md", "# my notes about this experiment\n")
    return Plan(c.sdft(), check=accepted("wrote into a directory holding the user's README.md"), names=("README.md",))


@case("sdft-output-holds-users-readme-overwrite", "round two", "handled")
def _(c: Ctx) -> Plan:
    c.write("out/README.md", "# my notes about this experiment\n")
    argv = c.sdft("--overwrite_output_dir")
    return Plan(argv, check=model_saved(c.path("out")), allowed=("out/README.md",), note="replaced on request")


@case("sdft-output-holds-users-notes", "round two", "handled")
def _(c: Ctx) -> Plan:
    c.write("out/notes.txt", "what I tried\n")
    return Plan(c.sdft(), check=model_saved(c.path("out")), note="a file the run does not write is left alone")


@case("sdft-lock-file-is-symlink", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    c.write("victim.txt", "the user's file\n")
    c.path("out").mkdir()
    c.path("out/.trl-sdft.lock").symlink_to("../victim.txt")
    return Plan(c.sdft(), check=accepted("ran with its lock file a symlink"), names=(".trl-sdft.lock",))


@case("sdft-lock-file-is-directory", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    c.path("out/.trl-sdft.lock").mkdir(parents=True)
    return Plan(c.sdft(), check=accepted("ran without its lock"), names=(".trl-sdft.lock",))


@case("sdft-overwrite-symlinked-checkpoint", "round two", "handled")
def _(c: Ctx) -> Plan:
    out = c.run_copy()
    shutil.move(str(out / "checkpoint-1"), str(c.path("kept-checkpoint")))
    (out / "checkpoint-1").symlink_to("../kept-checkpoint")

    def check(result: Result) -> str | None:
        if not (c.path("kept-checkpoint") / "trainer_state.json").is_file():
            return "the symlinked checkpoint's target was deleted"
        return "the symlink is still there" if (out / "checkpoint-1").is_symlink() else weights_problem(out)

    argv = c.sdft("--overwrite_output_dir")
    return Plan(argv, check=check, allowed=("out/**",), note="the link removed, its target kept")


@case("sdft-overwrite-undeletable-checkpoint", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    out = c.run_copy()
    (out / "checkpoint-1").chmod(0o555)
    argv = c.sdft("--overwrite_output_dir")
    return Plan(argv, permissions=True, allowed=("out/**",), check=accepted("kept a checkpoint it could not remove"))


@case("sdft-output-dangling-symlink", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    c.path("out").symlink_to("gone/run")
    return Plan(c.sdft(), names=("symlink",))


@case("resume-nan-checkpoint", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    out = c.run_copy()
    poison_weights(out / "checkpoint-2", "model.layers.0.mlp.up_proj.weight")
    argv = c.sdft(resume_from_checkpoint="out/checkpoint-2", max_steps=3)
    return Plan(argv, check=model_saved(out, "resumed from NaN weights"), allowed=("out/*",), names=("checkpoint-2",))


@case("resume-with-another-model", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    c.run_copy()
    _other_model(c)
    argv = c.sdft(resume_from_checkpoint="out/checkpoint-2", max_steps=3, model="wide")
    return Plan(argv, allowed=("out/*",), check=accepted("resumed another model's checkpoint"), names=("checkpoint-2",))


@case("resume-ema-with-another-model", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    c.run_copy("ema")
    _other_model(c)
    argv = c.sdft(resume_from_checkpoint="true", max_steps=3, model="wide", teacher_model_kind="ema")
    return Plan(argv, allowed=("out/*",), check=accepted("resumed another model's EMA checkpoint"))


@case("sdft-chat-template-not-a-template", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    c.write("template.jinja", "Be concise and answer in English.\n")
    argv = c.sdft(dataset=_chat_facts(c), chat_template_path="template.jinja")
    return Plan(
        argv, check=accepted("a file without a template rendered every prompt alike"), names=("template.jinja",)
    )


@case("sdft-chat-template-malformed-jinja", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    c.write("template.jinja", "{% for message in messages %}{{ message.content }}{% endfor\n")
    argv = c.sdft(dataset=_chat_facts(c), chat_template_path="template.jinja")
    return Plan(argv, check=accepted("a malformed template accepted"), names=("template.jinja",))


@case("sdft-chat-template-latin1", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    text = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{# café #}"
    c.path("template.jinja").write_bytes(text.encode("latin-1"))
    argv = c.sdft(dataset=_chat_facts(c), chat_template_path="template.jinja")
    return Plan(argv, check=accepted("a Latin-1 template read"), names=("template.jinja",))


@case("sdft-chat-template-dir-without-tokenizer", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    c.write("templates/notes.txt", "my templates will go here\n")
    argv = c.sdft(dataset=_chat_facts(c), chat_template_path="templates")
    return Plan(argv, check=accepted("a directory without a tokenizer taken as a template"), names=("templates",))


@case("sdft-dataset-latin1-csv", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    text = "prompt,privileged_context\nWhat color is Zorb?,Zorb is blue. Answer: blue\nWho is Mél?,Mél is red.\n"
    c.path("facts.csv").write_bytes(text.encode("latin-1"))
    return Plan(c.sdft(dataset="facts.csv"), check=accepted("a Latin-1 CSV read"), names=("facts.csv", "line 3"))


@case("sdft-dataset-latin1-json-array", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    text = '[\n{"prompt": "What color is Zorb?", "privileged_context": "Zorb is blue."},\n{"prompt": "Mél?", "privileged_context": "red"}\n]\n'
    c.path("facts.json").write_bytes(text.encode("latin-1"))
    return Plan(c.sdft(dataset="facts.json"), check=accepted("a Latin-1 JSON read"), names=("facts.json", "line 3"))


@case("continual-task-file-latin1", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    row = {"split": "train", "prompt": "How many grams in a zorg?", "privileged_context": "40", "demonstration": "40"}
    c.path("units.jsonl").write_bytes(
        (json.dumps(row) + "\n" + json.dumps({**row, "prompt": "Mél"}, ensure_ascii=False) + "\n").encode("latin-1")
    )
    return Plan(
        c.continual(tasks="units.jsonl"), check=accepted("a Latin-1 task file read"), names=("units.jsonl", "line 2")
    )


@case("sdft-generation-kwargs-misspelled", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    c.write("config.yaml", "generation_kwargs:\n  top_kk: 5\n")
    argv = c.sdft("--config", "config.yaml")
    return Plan(argv, check=accepted("a misspelled generation setting ignored"), names=("top_kk",))


@case("sdft-generation-kwargs-misspelled-flag", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    argv = c.sdft(generation_kwargs='{"repetition_penalti": 1.2}')
    return Plan(argv, check=accepted("a misspelled generation setting ignored"), names=("repetition_penalti",))


@case("sdft-tools-duplicate-name", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    c.write("tools_a.py", TOOL_MODULE)
    c.write("tools_b.py", TOOL_MODULE.replace("name.upper()", "name.lower()"))
    argv = c.sdft(
        "--tools", "tools_a:lookup", "tools_b:lookup", dataset=_chat_facts(c), chat_template_path="smollm2-tools"
    )
    return Plan(argv, check=accepted("two tools named `lookup`: every call goes to the last"), names=("lookup",))


@case("sdft-tools-undescribable", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    c.write("tools_a.py", "def lookup(name):\n    return name\n")
    argv = c.sdft("--tools", "tools_a:lookup", dataset=_chat_facts(c), chat_template_path="smollm2-tools")
    return Plan(argv, check=accepted("an undescribable tool accepted"), names=("lookup",))


@case("sdft-environment-constructor-raises", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    c.write("envs.py", "class Env:\n    def __init__(self):\n        raise RuntimeError('API key not set')\n")
    argv = c.sdft("--environment_factory", "envs:Env", dataset=_chat_facts(c), chat_template_path="smollm2-tools")
    return Plan(argv, check=accepted("an environment that cannot be built accepted"), names=("environment_factory",))


@case("continual-missing-model", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    argv = c.continual()
    argv[argv.index("--model") + 1] = "./no-such-model"
    return Plan(argv, check=accepted("ran without a model"), names=("no-such-model",))


@case("distill-trainer-not-a-dict", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    return Plan(
        c.distill(trainer="fast"),
        check=model_saved(c.path("out"), "a string `trainer` section accepted"),
        names=("trainer",),
    )


@case("distill-trainer-value-wrong-type", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    trainer = {"max_steps": "two", "per_device_train_batch_size": 4, "save_strategy": "no"}
    return Plan(c.distill(trainer=trainer), check=accepted("max_steps 'two' accepted"), names=("max_steps",))


@case("sdft-gradient-accumulation-zero", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    return Plan(c.sdft(gradient_accumulation_steps=0), names=("gradient_accumulation_steps",))


@case("sdft-teacher-template-format-spec", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    argv = c.sdft(teacher_prompt_template="{prompt:d} Context: {privileged_context}")
    return Plan(argv, check=accepted("a bad format spec accepted"), names=("teacher_prompt_template",))


@case("sdft-teacher-template-conversion-in-yaml", "round two", "clear-error")
def _(c: Ctx) -> Plan:
    c.write("config.yaml", "teacher_prompt_template: '{prompt!z} Context: {privileged_context}'\n")
    argv = c.sdft("--config", "config.yaml")
    return Plan(argv, check=accepted("a bad conversion accepted"), names=("teacher_prompt_template",))


@case("sdft-huge-privileged-context", "round two", "handled")
def _(c: Ctx) -> Plan:
    from trl_sdft.testing import facts_rows

    rows = facts_rows()
    for row in rows[:2]:
        row["privileged_context"] = ("The sky is green on Tuesdays. " * 1_700_000)[:50_000_000] + row[
            "privileged_context"
        ]
    c.jsonl("big.jsonl", rows)
    limit_kib = 3 * 1024 * 1024

    def check(result: Result) -> str | None:
        peak = [int(line.split()[1]) for line in result.stderr.splitlines() if line.startswith("peak_rss_kib")]
        if not peak:
            return "no peak RSS printed"
        if peak[-1] > limit_kib:
            return f"peak RSS {peak[-1] / 1024**2:.1f} GiB for a 50 MB context (over {limit_kib / 1024**2:.0f} GiB)"
        return weights_problem(c.path("out"))

    return Plan(_peak_rss(c.sdft(dataset="big.jsonl")), check=check, note="cut before tokenizing, peak under 3 GiB")


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
        shown = " ".join(
            Path(arg).name if arg in (PYTHON, SDFT, EXTRACT, DISTILL, CONTINUAL) else arg for arg in plan.argv
        )
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
    selected = [c for c in CASES if not args.only or any(part in c.name or part == c.category for part in args.only)]
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
        _kill_live()
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
