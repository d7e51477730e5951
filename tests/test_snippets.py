"""Every code block a user can copy from the README and the docs works as written (issue 32).

- Python blocks run, each in its own process, on the tiny test model: a hub id the reader has (`MODEL_IDS`) is swapped
  for it by the test, never by the reader. A block is complete (its data, its imports) or it is an `SDFTConfig(...,
  field=value)` fragment, which is built with an `output_dir` in place of the `...`.
- Shell blocks are checked command by command, without training: `scripts/sdft.py`, `trl-sdft` and what accelerate
  or torchrun launch go through the CLI's own parser and `SDFTConfig` (flags, YAML configs, values); the other
  scripts' flags must be in their `--help`; `make` targets, pip extras and pins, and repository paths must exist.

A block the checks cannot handle fails with its file and line, so a new kind of snippet gets a check, not a pass.
"""

import json
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docs, pytest.mark.processes]

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
HANG_GUARD_S = 1800  # a hang guard only: a loaded 2-core machine must not fail these

# Model names a reader can use as they are; the test swaps them for the tiny local model.
MODEL_IDS = (
    "HuggingFaceTB/SmolLM2-135M-Instruct",
    "HuggingFaceTB/SmolLM2-360M-Instruct",
    "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen/Qwen2.5-0.5B-Instruct",
)
FRAGMENT = re.compile(r"SDFTConfig\(\.\.\.,")
REPO_DIRS = ("configs/", "trl_sdft/", "benchmarks/", "scripts/", "tests/", "constraints/")
OUTPUT_FLAGS = ("--output_dir", "--output_file", "--filtered_data", "--output")
# Files a snippet reads that its page shows in a block of their own: (page, language, index of the block there).
PAGE_FILES = {"my_tasks/units.jsonl": ("docs/guides/continual.md", "json", 0)}


def page_block(page: str, language: str, index: int) -> str:
    return [m.group(2) for m in FENCE.finditer((ROOT / page).read_text()) if m.group(1) == language][index]


def blocks(*languages: str) -> list:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            if match.group(1) in languages:
                line = text.count("\n", 0, match.start()) + 1
                found.append(pytest.param(match.group(2), id=f"{page.relative_to(ROOT)}:{line}"))
    return found


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    (cwd / "snippet.py").write_text(code)
    return subprocess.run(
        [sys.executable, "snippet.py"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
    )


@pytest.fixture(scope="session")
def snippet_model_dir(tmp_path_factory):
    """The tiny Llama with a context of 2,048 positions (a system prompt describing tools is 500 tiny-tokenizer
    tokens), standing in for the hub models the snippets name."""
    from trl_sdft.testing import build_model, build_tokenizer

    path = tmp_path_factory.mktemp("snippet-llama")
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    model.config.max_position_embeddings = 2048
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("code", blocks("python"))
def test_python_snippet_runs(code, snippet_model_dir, tmp_path):
    code_only = re.sub(r"#.*", "", code)
    if "..." in code_only:
        assert FRAGMENT.search(code_only) and code_only.count("...") == len(FRAGMENT.findall(code_only)), (
            "a Python snippet is complete, or an `SDFTConfig(..., field=value)` fragment; this one has another `...`"
        )
        code = "from trl_sdft import SDFTConfig\n" + FRAGMENT.sub("SDFTConfig(output_dir='out',", code)
    for model_id in MODEL_IDS:
        code = code.replace(f'"{model_id}"', repr(snippet_model_dir))
    for path, block in PAGE_FILES.items():
        if path in code:
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_text(page_block(*block))
    result = run_python(code, tmp_path)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def commands(code: str) -> list[str]:
    """The block's command lines: continuations joined, comments dropped."""
    lines, pending = [], ""
    for raw in code.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line:
            lines.append(line)
    return lines


def placeholders_filled(line: str) -> list[str]:
    """`<hub dataset>` becomes a value, `[--flag value]` (optional) is taken, `[any other text]` and `...` (anything
    else) dropped; `.[extras]` stays."""
    line = re.sub(r"<[^>]+>", "placeholder", line)
    line = re.sub(r"(?<!\S)\[(--[^\]]*)\]", r"\1", line)
    line = re.sub(r"(?<!\S)\[[^\]]*\]", " ", line)
    return [token for token in shlex.split(line) if token != "..."]


@cache
def script_help(script: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@cache
def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


def pinned(name: str) -> set[str]:
    """The versions of `name` that the Makefile and the constraints pin."""
    text = (ROOT / "Makefile").read_text() + (ROOT / "constraints" / "cpu.txt").read_text()
    return set(re.findall(rf"(?<![\w-]){re.escape(name)}==([\w.+-]+)", text))


def extras() -> set[str]:
    import tomllib

    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def check_paths(tokens: list[str]) -> None:
    for previous, token in zip(["", *tokens], tokens):
        path = token.split("=", 1)[-1]
        if path.startswith(REPO_DIRS) and previous not in OUTPUT_FLAGS:
            assert (ROOT / path).exists(), f"{path} does not exist in the repository"


def sdft_arguments(tokens: list[str]) -> list[str] | None:
    """The arguments `scripts/sdft.py` gets from this command, or None when it does not run it."""
    if tokens[0] == "trl-sdft":
        return None if tokens[1:2] == ["vllm-serve"] else tokens[1:]
    for index, token in enumerate(tokens):
        if token.endswith("scripts/sdft.py"):
            return tokens[index + 1 :]
    return None


def check_launcher(tokens: list[str]) -> None:
    if tokens[0] == "accelerate":
        assert tokens[1] == "launch", tokens
        if "--config_file" in tokens:
            assert (ROOT / tokens[tokens.index("--config_file") + 1]).exists()
    elif tokens[0] == "torchrun":
        assert any(token.startswith("--nproc_per_node") for token in tokens), tokens


def check_command(tokens: list[str], parsed: list) -> None:
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):  # VAR=value before a command
        tokens = tokens[1:]
    check_paths(tokens)
    program = tokens[0]
    if program == "export":
        assert all(re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S+", token) for token in tokens[1:]), tokens
    elif program == "make":
        assert all(token in make_targets() or "=" in token for token in tokens[1:]), f"no such make target: {tokens}"
    elif program == "pip":
        for previous, token in zip(tokens, tokens[1:]):
            if previous == "-c":
                assert (ROOT / token).exists(), token
            for extra in re.findall(r"\.\[([\w,-]+)\]", token):
                assert set(extra.split(",")) <= extras(), f"{token}: pyproject.toml has extras {sorted(extras())}"
            if "==" in token and pinned(token.split("==")[0]):
                name, version = token.split("==")
                assert version in pinned(name), f"{token}: the Makefile and constraints pin {pinned(name)}"
    elif program == "trl-sdft" and tokens[1:2] == ["vllm-serve"]:
        from trl_sdft.cli import vllm_serve_parser

        known, _ = vllm_serve_parser().parse_known_args(tokens[2:])
        assert known.model
    elif sdft_arguments(tokens) is not None:
        check_launcher(tokens)
        parsed.append(sdft_arguments(tokens))
    elif program == "python" and tokens[1:3] == ["-m", "pytest"]:
        assert any(token.startswith("tests/") for token in tokens), tokens
    elif program == "python" and tokens[1].startswith("scripts/"):
        text = script_help(Path(tokens[1]).name)
        unknown = [t.split("=")[0] for t in tokens[2:] if t.startswith("--") and t.split("=")[0] not in text]
        assert not unknown, f"{tokens[1]} has no flags {unknown}"
    else:
        raise AssertionError(f"no check for this command; add one to tests/test_snippets.py: {' '.join(tokens)}")


PARSE = """
import json, sys
from trl_sdft.cli import parse
for argv in json.load(sys.stdin):
    try:
        parse(argv)
        print(json.dumps(None))
    except (ValueError, SystemExit) as err:
        print(json.dumps(f"{type(err).__name__}: {err}"))
"""


def parse_errors(argvs: list[list[str]]) -> list[str | None]:
    """The CLI's parser on each argument list, in its own process (a YAML config's `env:` sets variables)."""
    result = subprocess.run(
        [sys.executable, "-c", PARSE],
        input=json.dumps(argvs),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=HANG_GUARD_S,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = [json.loads(line) for line in result.stdout.splitlines() if line.startswith(("null", '"'))]
    assert len(errors) == len(argvs), result.stdout[-3000:]
    return errors


@pytest.mark.parametrize("code", blocks("bash", "sh", "shell"))
def test_shell_snippet_commands_are_valid(code):
    parsed = []
    for line in commands(code):
        check_command(placeholders_filled(line), parsed)
    if parsed:
        bad = [f"{' '.join(argv)}\n  -> {error}" for argv, error in zip(parsed, parse_errors(parsed)) if error]
        assert not bad, "\n".join(bad)


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The checks themselves: a wrong flag, a missing config, an unknown target, a stale pin, an unknown command."""
    parsed = []
    check_command(placeholders_filled("trl-sdft --max_steps 2 [--output_dir <dir>] ..."), parsed)
    assert parsed == [["--max_steps", "2", "--output_dir", "placeholder"]]
    for line in (
        "make demoo",
        "pip install -e '.[nope]'",
        "pip install torch==2.0.0",
        "python scripts/sdft.py --config configs/missing.yaml",
        "python scripts/continual.py --no_such_flag 1",
        "rm -rf outputs",
    ):
        with pytest.raises(AssertionError):
            check_command(placeholders_filled(line), [])
    assert commands("a \\\n  b  # note\n# only a comment\nc") == ["a    b", "c"]
    good, flag, value = parse_errors([["--max_steps", "2"], ["--max_stepz", "2"], ["--distillation_mode", "bogus"]])
    assert good is None and "--max_stepz" in flag and "distillation_mode" in value
