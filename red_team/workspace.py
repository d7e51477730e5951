"""What a case works with: the shared assets (built once per run), its own directory, and the plan it returns."""

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from red_team.processes import (
    CONTINUAL,
    DISTILL,
    EXTRACT,
    PYTHON,
    SDFT,
    TRACEBACK,
    Proc,
    Result,
    child_env,
    exception_line,
    last_line,
)


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

    def chat_facts(self, name: str = "chat.jsonl") -> str:
        """The toy facts with chat prompts, as `name`."""
        from trl_sdft.testing import facts_rows

        self.jsonl(name, facts_rows(chat=True))
        return name

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
    def continual(self, *extra, tasks="facts", out="cont", model=None) -> list[str]:
        """A comparison cut to the bone (SFT, 1 step, 2 rows) so that a wrongly accepted input ends soon."""
        argv = [PYTHON, CONTINUAL, "--model", str(model or self.assets.model()), "--method", "sft", "--steps", "1"]
        argv += ["--max_train_rows", "2", "--max_test_rows", "2", "--num_probes", "2", "--learning_rates", "1e-4"]
        return argv + ["--tasks", tasks, "--output_dir", out, *map(str, extra)]
