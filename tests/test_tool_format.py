"""The tool-format warm start behind `smollm2-135m-tools` (`trl_sdft/demo/tool_format.py`): its rows teach the call
format on other tools without leaking the bundled task, and the alias builds once, in a child process, and caches."""

import json
import pathlib
import re

import pytest

from trl_sdft.chat_templates import load_chat_template
from trl_sdft.demo import agentic, default_model, tool_format
from trl_sdft.demo.tool_format import WARM_TOOLS, WarmStart, warm_start_rows
from trl_sdft.tools import tool_name

ANSWERS = {prompt: f"My answer to: {prompt}" for prompt in tool_format.REHEARSAL_PROMPTS}


def test_rows_are_deterministic_and_mix_calls_with_rehearsal():
    recipe = WarmStart(steps=6, batch_size=4, rehearsal_every=4, seed=3)
    rows = warm_start_rows(recipe, ANSWERS)
    assert rows == warm_start_rows(recipe, ANSWERS)
    assert len(rows) == 24
    calls = [row for row in rows if len(row["messages"]) == 4]
    rehearsal = [row for row in rows if len(row["messages"]) == 2]
    assert len(rehearsal) == 6 and len(calls) == 18
    assert {row["messages"][1]["content"] for row in rehearsal} <= set(ANSWERS.values())
    for row in calls:
        call = row["messages"][1]["tool_calls"][0]["function"]
        shown = [schema["function"]["name"] for schema in json.loads(row["tools"])]
        assert call["name"] in shown  # the called tool is in the row's tool list
        tool = {tool_name(t): t for t in WARM_TOOLS}[call["name"]]
        result = json.loads(row["messages"][2]["content"])
        assert json.loads(tool(**call["arguments"])) == result  # the result is what the tool returns
        assert all(str(value) in row["messages"][3]["content"] for value in result.values())
    assert len({row["messages"][1]["tool_calls"][0]["function"]["name"] for row in calls}) == len(WARM_TOOLS)
    assert warm_start_rows(WarmStart(steps=6, batch_size=4, seed=4), ANSWERS) != rows


def test_rows_leak_nothing_of_the_bundled_task():
    """The warm start teaches the format only: no `lookup`, no entity, none of its cities, kinds or questions."""
    text = json.dumps(warm_start_rows(WarmStart(steps=50), ANSWERS)).lower()
    assert "lookup" not in text
    for entity in agentic.load_entities():
        assert entity["name"].lower() not in text
        for word in (entity["city"], entity["kind"]):
            assert not re.search(rf"\b{re.escape(word.lower())}\b", text), word
    for question, _ in agentic.QUESTIONS.values():
        assert question.split("{")[0].lower() not in text


def test_rows_render_with_the_bundled_template(tokenizer):
    tokenizer.chat_template = load_chat_template("smollm2-tools")
    for row in warm_start_rows(WarmStart(steps=2), ANSWERS):
        tools = json.loads(row["tools"]) or None
        text = tokenizer.apply_chat_template(row["messages"], tools=tools, tokenize=False)
        for schema in tools or []:
            assert schema["function"]["name"] in text
        if len(row["messages"]) == 4:
            assert "<tool_call>" in text and "<tool_response>" in text


@pytest.mark.processes
def test_the_alias_builds_once_in_a_child_process_and_then_reads_the_cache(tool_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_SDFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tool_format, "smollm2_dir", lambda progress=True: pathlib.Path(tool_model_dir))
    monkeypatch.setenv("RANK", "1")  # a multi-process launch: the child must not join it
    monkeypatch.setenv("WORLD_SIZE", "2")
    target = tmp_path / "cache" / f"smollm2-135m-tools-v{tool_format.RECIPE_VERSION}"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # a copy cut short: no warm_start.json, so not a model
    path = default_model.resolve_model("SmolLM2-135M-Tools")
    assert pathlib.Path(path) == target
    record = json.loads((pathlib.Path(path) / "warm_start.json").read_text())
    assert record["base"] == tool_model_dir and record["rows"] == WarmStart().steps * WarmStart().batch_size
    assert (pathlib.Path(path) / "config.json").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == [pathlib.Path(path).name]
    monkeypatch.setattr(tool_format, "smollm2_dir", lambda progress=True: pytest.fail("built a second time"))
    assert default_model.resolve_model("smollm2-135m-tools") == path
    assert default_model.is_default_alias("smollm2-135m-tools")


def test_the_child_sees_no_launch_variables():
    environ = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "ACCELERATE_USE_CPU": "1", "PMI_SIZE": "2"}
    environ.update(OMPI_COMM_WORLD_SIZE="2", OMP_NUM_THREADS="1", HOME="/home/me", TRL_SDFT_CACHE="/c")
    assert tool_format.child_environment(environ) == {"HOME": "/home/me", "TRL_SDFT_CACHE": "/c"}
    assert tool_format.child_environment({"OMP_NUM_THREADS": "3"}) == {"OMP_NUM_THREADS": "3"}  # the user's own


@pytest.mark.processes
def test_a_failed_build_leaves_no_model_and_says_how_to_see_why(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_SDFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tool_format, "smollm2_dir", lambda progress=True: tmp_path / "no-such-model")
    with pytest.raises(default_model.ModelUnavailableError, match="trl_sdft.demo.tool_format"):
        tool_format.tool_format_dir(progress=False)
    assert [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_the_agentic_config_starts_from_the_warm_start():
    from trl_sdft import cli

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "agentic.yaml"
    _, _, model_args = cli.parse(["--config", str(path)])
    assert model_args.model_name_or_path == default_model.TOOLS_MODEL
