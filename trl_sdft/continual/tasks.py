"""Continual-learning tasks: training rows, test rows with a scorer, and a name. Loaded from JSONL.

A task file is JSON lines. An optional first line `{"task": {...}}` holds task-wide settings: `name` (default: the
file name), `kind`, `description`, `teacher_prompt_template`, `max_new_tokens`, and a default scorer (`scorer`,
`answers`, `pattern`, `function`) that test rows may override. Every other line is a row:

    {"split": "train", "prompt": ..., "privileged_context": ..., "demonstration": ...}
    {"split": "test", "prompt": ..., "scorer": "contains", "answers": ["otter"], "privileged_context": ...}

`prompt` is a question string (sent as one user turn) or a list of chat messages. Train rows feed SDFT (`prompt`,
`privileged_context`) and SFT (`prompt` -> `demonstration`). A test row's optional `privileged_context` is used only
to check that the in-context teacher solves the task. Scorers: `exact` (the stripped answer equals one of `answers`),
`contains` (one of `answers` appears as a whole word, case-insensitive), `regex` (`pattern` matches, `re.search`),
`python` (`function` = "module:name" or "file.py:name", called as `function(answer, row) -> bool`).

A task file is code: a `python` scorer imports the module or runs the file it names, with your permissions, as soon
as the task is loaded (before any training). Only run task files you trust, as you would a script.
"""

import importlib
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from datasets import Dataset

from ..demo.knowledge import chat, is_correct, load_probes
from ..jsonl import JSONLineError, json_lines
from ..prompts import build_teacher_prompt, context_to_text, is_chat, resolve_teacher_prompt_template
from ..text_files import read_text

DEFAULT_TEMPLATE = "{prompt}\n\nExample answer: {privileged_context}"
SCORERS = ("exact", "contains", "regex", "python")
SCORER_KEYS = ("scorer", "answers", "pattern", "function")
BUNDLED_TASKS = ("facts", "tool_call", "identity")
PROBES = "probes"

Scorer = Callable[[str, dict], bool]


class TaskError(ValueError):
    """A task file or row that cannot be used; the message names the file, the line and the fix."""


def _import_function(spec: str, where: str) -> Callable:
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        raise TaskError(f"{where}: `function` must be 'module:name' or 'path/to/file.py:name', got {spec!r}.")
    try:
        if module_name.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if module_spec is None or not Path(module_name).exists():
                raise FileNotFoundError(module_name)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        function = getattr(module, name)
    except (ImportError, FileNotFoundError, AttributeError) as err:
        raise TaskError(f"{where}: cannot load the scorer function {spec!r} ({err}).") from None
    if not callable(function):
        raise TaskError(f"{where}: scorer function {spec!r} is not callable.")
    return function


def make_scorer(spec: dict, where: str) -> Scorer:
    """The scoring function of one test row, from its scorer fields (merged with the task's defaults)."""
    kind = spec.get("scorer")
    if callable(kind):
        return kind
    if kind not in SCORERS:
        raise TaskError(f"{where}: unknown scorer {kind!r}; use one of {', '.join(SCORERS)} (or set it in the header).")
    if kind in ("exact", "contains"):
        answers = spec.get("answers")
        answers = [answers] if isinstance(answers, str) else answers
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise TaskError(f"{where}: scorer {kind!r} needs `answers`, a non-empty list of non-empty strings.")
        if kind == "exact":
            targets = {a.strip() for a in answers}
            return lambda answer, row: answer.strip() in targets
        return lambda answer, row: is_correct(answer, answers)
    if kind == "regex":
        try:
            pattern = re.compile(spec.get("pattern") or "")
        except re.error as err:
            raise TaskError(
                f"{where}: `pattern` {spec.get('pattern')!r} is not a valid regular expression ({err})."
            ) from None
        if not pattern.pattern:
            raise TaskError(f"{where}: scorer 'regex' needs a non-empty `pattern`.")
        return lambda answer, row: pattern.search(answer) is not None
    function = spec.get("function")
    if callable(function):
        return function
    if not isinstance(function, str):
        raise TaskError(f"{where}: scorer 'python' needs `function`, e.g. 'my_module:score'.")
    return _import_function(function, where)


@dataclass
class Task:
    """One stage of continual learning: what to train on and how to test it."""

    name: str
    train: list[dict]
    test: list[dict]
    teacher_prompt_template: str = DEFAULT_TEMPLATE
    max_new_tokens: int = 24
    kind: str = ""
    description: str = ""
    scorers: list[Scorer] = field(default_factory=list, repr=False)

    def __post_init__(self):
        where = f"task {self.name!r}"
        self.teacher_prompt_template = resolve_teacher_prompt_template(self.teacher_prompt_template)
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise TaskError(f"{where}: `max_new_tokens` must be a positive integer, got {self.max_new_tokens!r}.")
        if not self.test:
            raise TaskError(f'{where} has no test rows: add rows with "split": "test" and a scorer.')
        if not self.scorers:
            self.scorers = [make_scorer(row, f"{where}, test row {i}") for i, row in enumerate(self.test)]
        if len(self.scorers) != len(self.test):
            raise TaskError(f"{where}: {len(self.scorers)} scorers for {len(self.test)} test rows.")

    def score(self, answers: list[str]) -> list[bool]:
        return [bool(scorer(answer, row)) for scorer, answer, row in zip(self.scorers, answers, self.test)]

    def test_prompts(self, with_context: bool = False) -> list:
        """Chat prompts of the test rows; with the privileged context (the teacher's view) where asked."""
        prompts = []
        for row in self.test:
            prompt = chat(row["prompt"]) if isinstance(row["prompt"], str) else row["prompt"]
            if with_context:
                prompt = build_teacher_prompt(prompt, row["privileged_context"], self.teacher_prompt_template)
            prompts.append(prompt)
        return prompts

    @property
    def has_test_context(self) -> bool:
        return all(row.get("privileged_context") is not None for row in self.test)

    def sdft_dataset(self) -> Dataset:
        rows = [{"prompt": _as_chat(r["prompt"]), "privileged_context": r["privileged_context"]} for r in self.train]
        return Dataset.from_list(rows)

    def sft_dataset(self) -> Dataset:
        """TRL's conversational prompt-completion format: the loss is on the demonstration only."""
        rows = [
            {
                "prompt": _as_chat(r["prompt"]),
                "completion": [{"role": "assistant", "content": context_to_text(r["demonstration"])}],
            }
            for r in self.train
        ]
        return Dataset.from_list(rows)

    def head(self, num_train: int | None, num_test: int | None) -> "Task":
        """The same task on its first rows (for quick runs)."""
        return Task(
            name=self.name,
            train=self.train[:num_train],
            test=self.test[:num_test],
            teacher_prompt_template=self.teacher_prompt_template,
            max_new_tokens=self.max_new_tokens,
            kind=self.kind,
            description=self.description,
            scorers=self.scorers[:num_test],
        )


def _as_chat(prompt: Any) -> list[dict]:
    return chat(prompt) if isinstance(prompt, str) else prompt


def _check_prompt(value: Any, where: str) -> None:
    if isinstance(value, str) and value.strip():
        return
    if is_chat(value) and value[-1].get("role") == "user":
        return
    raise TaskError(f"{where}: `prompt` must be a non-empty string or chat messages ending with a user turn.")


def _check_text(row: dict, key: str, where: str) -> None:
    value = row.get(key)
    try:
        text = context_to_text(value) if value is not None else ""
    except ValueError:
        text = ""
    if not text.strip():
        raise TaskError(
            f"{where}: `{key}` is missing or empty; every train row needs `prompt`, "
            "`privileged_context` (what the SDFT teacher sees) and `demonstration` (the SFT target)."
        )


def task_from_rows(records: list[dict], name: str, source: str = "<rows>") -> Task:
    """Build a Task from parsed JSONL records (header + rows); every problem is a TaskError naming the line."""
    header: dict = {}
    if records and "task" in records[0]:
        header = records[0]["task"]
        if not isinstance(header, dict):
            raise TaskError(f"{source}, line 1: `task` must be an object of task settings.")
        unknown = set(header) - {
            "name",
            "kind",
            "description",
            "teacher_prompt_template",
            "max_new_tokens",
            *SCORER_KEYS,
        }
        if unknown:
            raise TaskError(f"{source}, line 1: unknown task settings {sorted(unknown)}.")
        records = records[1:]
        offset = 2
    else:
        offset = 1
    defaults = {key: header[key] for key in SCORER_KEYS if key in header}
    train, test, scorers = [], [], []
    for number, row in enumerate(records, start=offset):
        where = f"{source}, line {number}"
        if not isinstance(row, dict):
            raise TaskError(f"{where}: each line must be a JSON object.")
        split = row.get("split")
        if split not in ("train", "test"):
            raise TaskError(f"{where}: `split` must be 'train' or 'test', got {split!r}.")
        _check_prompt(row.get("prompt"), where)
        if split == "train":
            for key in ("privileged_context", "demonstration"):
                _check_text(row, key, where)
            train.append(row)
        else:
            spec = {**defaults, **{key: row[key] for key in SCORER_KEYS if key in row}}
            scorers.append(make_scorer(spec, where))
            test.append(row)
    name = header.get("name", name)
    if not train:
        raise TaskError(f'{source}: task {name!r} has no train rows ("split": "train").')
    if not test:
        raise TaskError(f'{source}: task {name!r} has no test rows ("split": "test").')
    try:
        return Task(
            name=name,
            train=train,
            test=test,
            teacher_prompt_template=header.get("teacher_prompt_template", DEFAULT_TEMPLATE),
            max_new_tokens=header.get("max_new_tokens", 24),
            kind=header.get("kind", ""),
            description=header.get("description", ""),
            scorers=scorers,
        )
    except TaskError:
        raise
    except ValueError as err:
        raise TaskError(f"{source}: {err}") from None


def _parse_jsonl(text: str, source: str) -> list[dict]:
    try:
        return [record for _, record in json_lines(text.splitlines())]
    except JSONLineError as err:
        raise TaskError(f"{source}, line {err.number}: not valid JSON ({err.msg}).") from None


def load_task(name_or_path: str) -> Task:
    """A bundled task by name (`facts`, `tool_call`, `identity`) or a task JSONL file by path."""
    if name_or_path in BUNDLED_TASKS:
        text = resources.files("trl_sdft.resources").joinpath("continual", f"{name_or_path}.jsonl").read_text()
        return task_from_rows(_parse_jsonl(text, name_or_path), name_or_path, f"bundled task {name_or_path!r}")
    path = Path(name_or_path)
    if not path.is_file():
        raise TaskError(
            f"Task {name_or_path!r} is neither a bundled task ({', '.join(BUNDLED_TASKS)}) nor a JSONL file."
        )
    try:
        text = read_text(str(path), "Task file")
    except ValueError as err:
        raise TaskError(str(err)) from None
    return task_from_rows(_parse_jsonl(text, str(path)), path.stem, str(path))


def load_tasks(names: list[str]) -> list[Task]:
    tasks = [load_task(name) for name in names]
    seen = set()
    for task in tasks:
        if task.name in seen or task.name == PROBES:
            raise TaskError(
                f"Task name {task.name!r} is used twice (or is the reserved name {PROBES!r}); give each task file a "
                "distinct `name` in its header."
            )
        seen.add(task.name)
    return tasks


def probes_task(num_probes: int | None = None) -> Task:
    """Prior capabilities: general questions the base model answers, scored by whole-word match. Never trained on."""
    probes = load_probes(num_probes)
    test = [{"prompt": p["question"], "answers": p["answers"]} for p in probes]
    scorers = [make_scorer({"scorer": "contains", "answers": p["answers"]}, "probes") for p in probes]
    return Task(name=PROBES, train=[], test=test, kind="prior capabilities", scorers=scorers, max_new_tokens=24)
