"""`--tools module:function` and `--environment_factory module:name`: agentic SDFT from the command line or a YAML
config. The names are imported before the model loads, and a bad one is a single error line naming the flag."""

import importlib
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
from datasets import Dataset

from trl_sdft import cli
from trl_sdft.cli.callables import resolve_callable
from trl_sdft.testing import TOOL_CHAT_TEMPLATE, tool_rows

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "sdft.py"

MODULES = {
    "ct_tools": '''
        CONSTANT = 3


        def lookup(name: str) -> str:
            """Look up a name.

            Args:
                name: The name.
            """
            return name.upper()


        class Env:
            def reset(self, **row):
                return None

            def search(self, query: str) -> str:
                """Search.

                Args:
                    query: What to search for.
                """
                return query
        ''',
    "ct_pkg/__init__.py": "",
    "ct_pkg/sub": '''
        def fn(x: int) -> int:
            """Double.

            Args:
                x: A number.
            """
            return 2 * x
        ''',
    "ct_raises": 'raise RuntimeError("database password not set")\n',
    "ct_syntax": "def broken(:\n",
    "ct_needs_dep": "import ct_not_installed_dependency\n",
    "ct_exits": "import sys\nsys.exit(3)\n",
}


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    """`MODULES` written to tmp_path, which is put on sys.path; they are forgotten (sys.modules) afterwards."""
    for name, text in MODULES.items():
        path = tmp_path / (name if name.endswith(".py") else f"{name}.py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    for name in [name for name in sys.modules if name.split(".")[0].startswith("ct_")]:
        del sys.modules[name]


def base_flags(tmp_path):
    return ["--use_cpu", "--output_dir", str(tmp_path / "out"), "--report_to", "none"]


def test_tools_parse_from_flags_and_yaml(tmp_path):
    script_args, _, _ = cli.parse(
        ["--tools", "pkg.mod:fn", "other:g", "--environment_factory", "envs:Env", *base_flags(tmp_path)]
    )
    assert script_args.tools == ["pkg.mod:fn", "other:g"] and script_args.environment_factory == "envs:Env"
    config = tmp_path / "run.yaml"
    config.write_text("tools: [pkg.mod:fn, other:g]\nenvironment_factory: envs:Env\n")
    script_args, _, _ = cli.parse(["--config", str(config), *base_flags(tmp_path)])
    assert script_args.tools == ["pkg.mod:fn", "other:g"] and script_args.environment_factory == "envs:Env"
    # A single name without a list is a list of one, not a string the trainer would read letter by letter.
    config.write_text("tools: pkg.mod:fn\n")
    script_args, _, _ = cli.parse(["--config", str(config), *base_flags(tmp_path)])
    assert script_args.tools == ["pkg.mod:fn"] and script_args.environment_factory is None
    # A flag overrides the file.
    script_args, _, _ = cli.parse(["--config", str(config), "--tools", "x:y", *base_flags(tmp_path)])
    assert script_args.tools == ["x:y"]
    script_args, _, _ = cli.parse(base_flags(tmp_path))
    assert script_args.tools is None and script_args.environment_factory is None


def test_yaml_tools_of_the_wrong_type_are_refused(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("tools: [1, 2]\n")
    with pytest.raises(ValueError, match=r"`tools` is \[1, 2\] \(a list\); expected a list of strings"):
        cli.parse(["--config", str(config), *base_flags(tmp_path)])


def test_resolve_callable_finds_functions_classes_and_methods(user_modules):
    tools = importlib.import_module("ct_tools")
    assert resolve_callable("ct_tools:lookup", "--tools") is tools.lookup
    assert resolve_callable(" ct_tools : lookup ", "--tools") is tools.lookup
    assert resolve_callable("ct_tools:Env", "--environment_factory") is tools.Env
    assert resolve_callable("ct_tools:Env.search", "--tools") is tools.Env.search
    assert resolve_callable("ct_pkg.sub:fn", "--tools")(4) == 8


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("ct_tools.lookup", ["module:name"]),
        ("ct_tools", ["module:name"]),
        ("ct_tools:lookup:x", ["module:name"]),
        (":lookup", ["module:name"]),
        ("ct_tools:", ["module:name"]),
        ("ct-tools:lookup", ["module:name"]),
        ("ct_tools:look up", ["Python name"]),
        ("ct_missing_module:lookup", ["'ct_missing_module'", "directory", "PYTHONPATH"]),
        ("ct_missing_pkg.sub:fn", ["'ct_missing_pkg'", "PYTHONPATH"]),
        ("ct_tools:lokup", ["'lokup'", "ct_tools", "did you mean 'lookup'"]),
        ("ct_tools:Env.serch", ["'serch'", "Env", "'search'"]),
        ("ct_tools:CONSTANT", ["int", "not callable"]),
        ("ct_raises:fn", ["'ct_raises'", "RuntimeError", "database password not set"]),
        ("ct_syntax:fn", ["'ct_syntax'", "SyntaxError"]),
        ("ct_needs_dep:fn", ["'ct_needs_dep'", "ModuleNotFoundError", "ct_not_installed_dependency"]),
        ("ct_exits:fn", ["'ct_exits'", "SystemExit"]),
    ],
)
@pytest.mark.parametrize("flag", ["--tools", "--environment_factory"])
def test_bad_specs_are_one_line_value_errors(user_modules, spec, expected, flag):
    with pytest.raises(ValueError) as error:
        resolve_callable(spec, flag)
    message = str(error.value)
    assert len(message.splitlines()) == 1, message
    for part in [flag, repr(spec), *expected]:
        assert part in message, message


def cli_error(capsys, tmp_path, *argv) -> str:
    """Runs `trl-sdft argv` on a tool dataset and a model that does not exist; returns its single error line."""
    data = tmp_path / "rows.jsonl"
    Dataset.from_list(tool_rows(4)).to_json(data)
    flags = ["--dataset_path", str(data), "--model_name_or_path", str(tmp_path / "no-model"), *base_flags(tmp_path)]
    code = cli.main([*argv, *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "usage:" not in err, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("trl-sdft: error: "), err
    return errors[0]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--tools", "ct_tools:lookup", "ct_tools:nope"], ["--tools", "'ct_tools:nope'", "no attribute"]),
        (["--tools", "ct_tools.lookup"], ["--tools", "module:name"]),
        (["--tools", "ct_raises:fn"], ["--tools", "RuntimeError", "database password not set"]),
        (["--environment_factory", "ct_missing_module:Env"], ["--environment_factory", "PYTHONPATH"]),
    ],
)
def test_bad_specs_stop_the_cli_before_the_model_loads(user_modules, tmp_path, capsys, argv, expected):
    line = cli_error(capsys, tmp_path, *argv)
    assert "no-model" not in line, "the model was looked for before the tools: " + line
    for part in expected:
        assert part in line, line


def test_the_cli_imports_tools_from_the_working_directory(user_modules, tmp_path, capsys, monkeypatch):
    """`python scripts/sdft.py` and the `trl-sdft` console script do not put the working directory on sys.path: the
    CLI does, so that `--tools my_tools:lookup` finds ./my_tools.py."""
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    line = cli_error(capsys, tmp_path, "--tools", "ct_tools:lookup", "--environment_factory", "ct_tools:Env")
    assert "no-model" in line and "--tools" not in line, line  # the tools resolved; the missing model stops the run


@pytest.mark.processes
def test_one_tool_step_from_the_command_line(tmp_path, tool_model_dir):
    """`python scripts/sdft.py --tools toolmod:lookup` run from the directory of toolmod.py: the model calls the tool
    the CLI imported (it writes down each call) and a step trains."""
    (tmp_path / "toolmod.py").write_text(
        textwrap.dedent(
            '''
            import pathlib

            from trl_sdft.testing import lookup as _lookup


            def lookup(name: str) -> str:
                """Look up the secret color of a made-up name.

                Args:
                    name: The name to look up.
                """
                with open(pathlib.Path(__file__).with_name("calls.txt"), "a") as file:
                    file.write(name + "\\n")
                return _lookup(name)
            '''
        )
    )
    template = tmp_path / "tools.jinja"
    template.write_text(TOOL_CHAT_TEMPLATE)
    data = tmp_path / "rows.jsonl"
    Dataset.from_list(tool_rows(4)).to_json(data)
    flags = {
        "--model_name_or_path": tool_model_dir,
        "--dataset_path": str(data),
        "--tools": "toolmod:lookup",
        "--chat_template_path": str(template),
        "--max_tool_calling_iterations": "1",
        "--output_dir": str(tmp_path / "out"),
        "--max_steps": "1",
        "--per_device_train_batch_size": "4",
        "--num_generations": "2",
        "--max_completion_length": "48",
        "--temperature": "0.3",
        "--distillation_topk": "5",
        "--save_strategy": "no",
        "--report_to": "none",
        "--gradient_checkpointing": "false",
        "--logging_steps": "1",
    }
    command = [sys.executable, str(SCRIPT), "--use_cpu", *[part for item in flags.items() for part in item]]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # the working directory only
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    calls = (tmp_path / "calls.txt").read_text().split() if (tmp_path / "calls.txt").exists() else []
    assert calls and set(calls) <= {row["prompt"][0]["content"].split()[-1].rstrip("?") for row in tool_rows(4)}, calls
    assert (tmp_path / "out" / "model.safetensors").exists()
