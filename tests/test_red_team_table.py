"""The red-team harness reads its cases from `red_team/cases.yaml`: every entry loads, a data entry builds the plan it
describes, and a malformed entry is refused with its name and what is wrong (no subprocess, no model)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def red_team(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import red_team.table

    yield red_team.table
    for name in [name for name in sys.modules if name == "red_team" or name.startswith("red_team.")]:
        del sys.modules[name]


class FakeAssets:
    """What a case's setup asks of the shared assets, as small files (no model is built)."""

    def __init__(self, root: Path):
        self.root = root
        (root / "model").mkdir()
        (root / "model" / "config.json").write_text("{}")
        (root / "facts.jsonl").write_text(json.dumps({"prompt": "p", "privileged_context": "c"}) + "\n")

    def model(self) -> Path:
        return self.root / "model"

    def facts(self) -> Path:
        return self.root / "facts.jsonl"


def _plan(red_team, tmp_path, name):
    from red_team.workspace import Ctx

    case = next(case for case in red_team.load_cases() if case.name == name)
    directory = tmp_path / "case"
    directory.mkdir()
    return case, case.build(Ctx(directory, FakeAssets(tmp_path))), directory


def test_every_case_loads_once_with_an_outcome_and_a_build(red_team):
    cases = red_team.load_cases()
    assert len(cases) == len({case.name for case in cases}) >= 160
    assert {case.expected for case in cases} <= set(red_team.OUTCOMES)
    assert {"output dirs", "checkpoints", "offline data", "round two"} <= {case.category for case in cases}
    python_builds = [case for case in cases if not hasattr(case.build, "func")]
    assert len(python_builds) == len(red_team.python_cases.BUILDS)


def test_a_data_case_builds_its_setup_command_and_check(red_team, tmp_path):
    from red_team.processes import Result

    case, plan, directory = _plan(red_team, tmp_path, "sdft-lock-file-is-symlink")
    assert (case.category, case.expected) == ("round two", "clear-error")
    assert (directory / "victim.txt").read_text() == "the user's file\n"
    assert (directory / "out" / ".trl-sdft.lock").readlink() == Path("../victim.txt")
    argv = plan.argv
    assert argv[1].endswith("scripts/sdft.py") and argv[argv.index("--output_dir") + 1] == "out"
    assert argv[argv.index("--model_name_or_path") + 1] == str(tmp_path / "model")
    assert plan.names == (".trl-sdft.lock",)
    assert plan.check(Result(0, "", "", 1.0)) == "exit 0: ran with its lock file a symlink"


def test_a_wrong_exit_checks_the_saved_model_and_null_drops_a_flag(red_team, tmp_path):
    from red_team.processes import Result

    _, plan, directory = _plan(red_team, tmp_path, "sdft-yaml-float-for-int")
    assert (directory / "run.yaml").read_text() == "num_generations: 2.0\n"
    assert "--num_generations" not in plan.argv and plan.argv[-2:] == ["--config", "run.yaml"]
    problem = plan.check(Result(0, "", "", 1.0))
    assert problem.startswith("num_generations: 2.0 accepted; no model was saved")


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"name": "x", "expected": "fine", "run": {"sdft": {}}}, "expected must be one of"),
        ({"name": "x", "expected": "handled", "run": {"sdft": {}}, "chek": 1}, "unknown keys ['chek']"),
        ({"name": "x", "expected": "handled", "run": {"train": {}}}, "`run` must be one of"),
        ({"name": "x", "expected": "handled", "run": {"sdft": {}}, "setup": [{"copy": "a"}]}, "setup step"),
        ({"name": "x", "expected": "handled", "python": True}, "no build of that name"),
        ({"name": "x", "expected": "handled", "run": {"sdft": {}}, "accepted": "a", "wrong": "b"}, "at most one"),
    ],
)
def test_a_malformed_entry_is_named(red_team, tmp_path, entry, message):
    import yaml

    table = tmp_path / "cases.yaml"
    table.write_text(yaml.safe_dump({"mine": [entry]}))
    with pytest.raises(ValueError) as raised:
        red_team.load_cases(table, builds={})
    assert "cases.yaml: mine #1 (x)" in str(raised.value) and message in str(raised.value)


def test_a_build_without_an_entry_is_refused(red_team, tmp_path):
    table = tmp_path / "cases.yaml"
    table.write_text("mine: []\n")
    with pytest.raises(ValueError, match="no entry for the builds"):
        red_team.load_cases(table)
