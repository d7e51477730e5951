"""`cases.yaml` read into cases: each entry's setup steps, command and check (the format is described at the top of
that file); entries marked `python: true` take their build from `red_team/cases.py`."""

import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

import yaml

from red_team import cases as python_cases
from red_team.checks import accepted, model_saved, poison_weights, truncate
from red_team.processes import PYTHON, SCRIPTS
from red_team.workspace import Case, Ctx, Plan

TABLE = Path(__file__).with_name("cases.yaml")
OUTCOMES = ("clear-error", "handled", "traceback", "silent-wrong", "data-lost")
COMMANDS = ("sdft", "extract", "distill", "continual", "argv")
CHECKS = ("accepted", "wrong", "saved", "exit_0_is_right")
KEYS = {"name", "expected", "python", "setup", "run", "allowed", "permissions", "names", "note", *CHECKS}


def _pairs(value, step: str) -> list[tuple[str, object]]:
    if not isinstance(value, dict) or not value:
        raise ValueError(f"`{step}` takes a mapping of paths")
    return list(value.items())


def _run_copy(c: Ctx, value) -> None:
    value = {"teacher": value} if isinstance(value, str) else dict(value)
    c.run_copy(value.get("teacher", "base"), value.get("name", "out"))


def _extraction_copy(c: Ctx, value) -> None:
    names = {name: name for name in value} if isinstance(value, list) else dict(value)
    for name, new in names.items():
        shutil.copy(c.assets.extraction() / name, c.path(new))


def _other_model(c: Ctx, name: str) -> None:
    """A model of another shape (hidden size 64) with the same tokenizer: a checkpoint of the tiny model does not fit."""
    from trl_sdft.testing import build_model

    build_model(c.assets.tokenizer(), hidden_size=64, heads=2).save_pretrained(c.path(name))
    c.assets.tokenizer().save_pretrained(c.path(name))


def _poison(c: Ctx, value: dict) -> None:
    row = value.get("row", 7)
    poison_weights(c.path(value["dir"]), value.get("tensor", "lm_head.weight"), None if row == "all" else row)


STEPS: dict[str, Callable[[Ctx, object], None]] = {
    "run_copy": _run_copy,
    "model_copy": lambda c, name: c.model_copy(name),
    "other_model": _other_model,
    "facts_copy": lambda c, name: shutil.copy(c.assets.facts(), c.path(name)),
    "chat_facts": lambda c, name: c.chat_facts(name),
    "chats": lambda c, name: c.chats(name),
    "extraction_copy": _extraction_copy,
    "write": lambda c, files: [c.write(name, text) for name, text in _pairs(files, "write")],
    "latin1": lambda c, files: [c.path(n).write_bytes(t.encode("latin-1")) for n, t in _pairs(files, "latin1")],
    "jsonl": lambda c, files: [c.jsonl(name, rows) for name, rows in _pairs(files, "jsonl")],
    "mkdir": lambda c, name: c.path(name).mkdir(parents=True),
    "chmod": lambda c, modes: [c.path(name).chmod(int(mode, 8)) for name, mode in _pairs(modes, "chmod")],
    "symlink": lambda c, links: [c.path(link).symlink_to(target) for link, target in _pairs(links, "symlink")],
    "move": lambda c, moves: [shutil.move(str(c.path(a)), str(c.path(b))) for a, b in _pairs(moves, "move")],
    "unlink": lambda c, name: c.path(name).unlink(),
    "truncate": lambda c, name: truncate(c.path(name)),
    "poison": _poison,
}


def _one_key(entry, what: str) -> tuple[str, object]:
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ValueError(f"a {what} must be a mapping of one key, got {entry!r}")
    return next(iter(entry.items()))


def _command(c: Ctx, run: dict) -> list[str]:
    kind, options = _one_key(run, "run")
    if kind == "argv":
        places = {"python": PYTHON, **SCRIPTS}
        return [str(arg).format(**places) if str(arg).startswith("{") else str(arg) for arg in options]
    options = dict(options or {})
    extra = options.pop("args", [])
    for key in ("kept", "logits") if kind == "distill" else ():  # the extraction's files, in the case's directory
        if key in options:
            options[key] = c.path(options[key])
    return getattr(c, kind)(*extra, **options)


def _build(entry: dict, c: Ctx) -> Plan:
    for step in entry.get("setup", []):
        name, value = _one_key(step, "setup step")
        STEPS[name](c, value)
    plan = Plan(_command(c, entry["run"]), note=entry.get("note", ""))
    plan.allowed = tuple(entry.get("allowed", ()))
    plan.permissions = bool(entry.get("permissions", False))
    plan.names = tuple(entry.get("names", ()))
    if "accepted" in entry:
        plan.check = accepted(entry["accepted"])
    elif "wrong" in entry:
        plan.check = model_saved(c.path(entry.get("saved", "out")), entry["wrong"])
    elif "saved" in entry:
        plan.check = model_saved(c.path(entry["saved"]))
    elif entry.get("exit_0_is_right"):
        plan.check = lambda result: None
    return plan


def _problem(entry, builds: dict) -> str | None:
    """What is wrong with one entry of the table, if anything."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        return "an entry without a name"
    if entry.get("expected") not in OUTCOMES:
        return f"expected must be one of {', '.join(OUTCOMES)}"
    if unknown := set(entry) - KEYS:
        return f"unknown keys {sorted(unknown)}"
    if entry.get("python"):
        if set(entry) != {"name", "expected", "python"}:
            return "a `python: true` entry has only name and expected (its build sets the rest)"
        return None if entry["name"] in builds else "no build of that name in red_team/cases.py"
    if not isinstance(entry.get("run"), dict) or len(entry["run"]) != 1 or next(iter(entry["run"])) not in COMMANDS:
        return f"`run` must be one of {', '.join(COMMANDS)}"
    if sum(key in entry for key in CHECKS if key != "saved") > 1:
        return "at most one of accepted, wrong, exit_0_is_right"
    for step in entry.get("setup", []):
        if not isinstance(step, dict) or len(step) != 1 or next(iter(step)) not in STEPS:
            return f"setup step {step!r} is not one of {', '.join(STEPS)}"
    return None


def load_cases(path: Path = TABLE, builds: dict | None = None) -> list[Case]:
    """Every case of the table, in its order; a malformed entry is named with what is wrong. `builds`: the Python
    builds by case name (default: red_team/cases.py's)."""
    table = yaml.safe_load(path.read_text(encoding="utf-8"))
    builds = python_cases.BUILDS if builds is None else builds
    cases, seen = [], set()
    for category, entries in table.items():
        for index, entry in enumerate(entries):
            problem = _problem(entry, builds)
            where = f"{path.name}: {category} #{index + 1} ({entry.get('name') if isinstance(entry, dict) else entry})"
            if problem:
                raise ValueError(f"{where}: {problem}")
            if entry["name"] in seen:
                raise ValueError(f"{where}: a second case of that name")
            seen.add(entry["name"])
            build = builds[entry["name"]] if entry.get("python") else partial(_build, entry)
            cases.append(Case(entry["name"], category, entry["expected"], build))
    if unused := set(builds) - seen:
        raise ValueError(f"{path.name} has no entry for the builds {sorted(unused)} of red_team/cases.py")
    return cases
