"""Hostile or broken inputs found by a red-team run of the CLI: each is a one-line error that names the file, row or
field and the fix (or a safe default), before any model is loaded."""

import json
import os
import re
import stat

import pytest
from datasets import Dataset

from trl_sdft import cli
from trl_sdft.cli.data_files import load_local_dataset
from trl_sdft.data import validate_dataset, validate_row

ROW = {"prompt": "q", "privileged_context": "c"}
CHAT_ROW = {"prompt": [{"role": "user", "content": "q"}], "privileged_context": "c"}


def one_line_error(call, match):
    with pytest.raises(ValueError, match=match) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------- unreadable data files
def test_corrupt_jsonl_line_is_named(tmp_path):
    path = write(tmp_path / "rows.jsonl", json.dumps(ROW) + "\nnot json\n" + json.dumps(ROW) + "\n")
    one_line_error(lambda: load_local_dataset(path, "train"), r"rows\.jsonl.*line 2 is not valid JSON.*Fix")


def test_lone_surrogate_in_jsonl_is_named(tmp_path):
    path = write(tmp_path / "rows.jsonl", json.dumps(ROW) + '\n{"prompt": "a\\ud800", "privileged_context": "c"}\n')
    one_line_error(lambda: load_local_dataset(path, "train"), r"rows\.jsonl.*line 2.*`prompt`.*lone surrogate")


def test_surrogate_pairs_are_text(tmp_path):
    path = write(tmp_path / "rows.jsonl", '{"prompt": "a \\ud83d\\ude00", "privileged_context": "c"}\n')
    assert load_local_dataset(path, "train")["prompt"] == ["a \U0001f600"]


def test_json_array_syntax_error_names_line_and_column(tmp_path):
    path = write(tmp_path / "rows.json", "[\n" + json.dumps(ROW) + ',\n  {"prompt": }\n]\n')
    one_line_error(lambda: load_local_dataset(path, "train"), r"rows\.json.*not valid JSON at line 3, column 14")


@pytest.mark.parametrize("name, text", [("rows.csv", 'prompt,privileged_context\n"a,b\n'), ("rows.parquet", "junk")])
def test_unparsable_csv_and_parquet_name_the_file(tmp_path, name, text):
    path = write(tmp_path / name, text)
    one_line_error(lambda: load_local_dataset(path, "train"), re.escape(name) + ".*could not be read")


def test_lone_surrogate_in_a_row_is_refused():
    one_line_error(lambda: validate_row("a\ud800", "c", 3), r"Row 3 .*`prompt`.*lone surrogate")
    one_line_error(lambda: validate_row("q", [{"role": "user", "content": "\udc00"}], 0), "`privileged_context`")
    chat = [{"role": "system", "content": "s\ud800"}, {"role": "user", "content": "q"}]
    one_line_error(lambda: validate_row(chat, "c", 0), r"Row 0 .*`prompt`.*lone surrogate")


def test_corrupt_line_is_one_cli_error_line(tmp_path, capsys):
    path = write(tmp_path / "rows.jsonl", json.dumps(ROW) + "\n{oops\n")
    code = cli.main(["--dataset_path", path, "--model_name_or_path", str(tmp_path / "no-model"), "--use_cpu"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]  # progress bars aside
    assert code == 2 and len(errors) == 1 and errors[0].startswith("trl-sdft: error:") and "line 2" in errors[0]


# --------------------------------------------------------------------------------------------- empty files
@pytest.mark.parametrize(
    "name, text", [("e.jsonl", ""), ("w.jsonl", "  \n\n"), ("e.json", ""), ("a.json", "[]"), ("h.csv", "prompt,x\n")]
)
def test_empty_files_have_no_rows(tmp_path, name, text):
    path = write(tmp_path / name, text)
    one_line_error(lambda: load_local_dataset(path, "train"), re.escape(name) + ".* has no rows")


def test_empty_csv_has_no_rows(tmp_path):
    path = write(tmp_path / "e.csv", "")
    one_line_error(lambda: load_local_dataset(path, "train"), r"e\.csv.* has no rows")


def test_empty_dataset_has_no_rows():
    one_line_error(lambda: validate_dataset(Dataset.from_dict({"prompt": [], "privileged_context": []})), "no rows")


# ------------------------------------------------------------------------------------- mixed text and chat
def test_mixed_prompt_kinds_are_refused_naming_the_row():
    mixed = Dataset.from_list([ROW, ROW, CHAT_ROW], on_mixed_types="use_json")
    one_line_error(lambda: validate_dataset(mixed), r"Row 2 .*chat messages.*row 0.*text.*all text or all chat")
    flipped = Dataset.from_list([CHAT_ROW, ROW], on_mixed_types="use_json")
    one_line_error(lambda: validate_dataset(flipped), r"Row 1 .*text.*row 0.*chat messages")


def test_mixed_context_kinds_are_fine():
    rows = [ROW, {"prompt": "q2", "privileged_context": [{"role": "user", "content": "c2"}]}]
    validate_dataset(Dataset.from_list(rows, on_mixed_types="use_json"))


def test_mixed_prompts_fail_in_the_cli_before_the_model_loads(tmp_path, capsys):
    path = write(tmp_path / "rows.jsonl", json.dumps(ROW) + "\n" + json.dumps(CHAT_ROW) + "\n")
    code = cli.main(["--dataset_path", path, "--model_name_or_path", str(tmp_path / "no-model"), "--use_cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Row 1 of the train dataset" in err and "all text or all chat" in err


def test_mixed_prompts_a_loader_refuses_are_explained(tmp_path, monkeypatch):
    """Older `datasets` cannot load a column of strings and lists at all: the error must still say why."""
    import datasets

    def refuse(*args, **kwargs):
        raise datasets.exceptions.DatasetGenerationError("An error occurred while generating the dataset")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    path = write(tmp_path / "rows.jsonl", json.dumps(ROW) + "\n" + json.dumps(CHAT_ROW) + "\n")
    one_line_error(lambda: load_local_dataset(path, "train"), r"rows\.jsonl.*line 2.*all text or all chat")


# ---------------------------------------------------------------------------------------------- vllm-serve
def test_vllm_serve_binds_loopback_by_default(tiny_model_dir):
    command, env = cli.vllm_serve_command(["--model", tiny_model_dir], cuda=False)
    assert command[command.index("--host") + 1] == "127.0.0.1"
    other, _ = cli.vllm_serve_command(["--model", tiny_model_dir, "--host", "0.0.0.0"], cuda=False)
    assert other[other.index("--host") + 1] == "0.0.0.0"


def test_vllm_serve_host_help_warns(capsys):
    with pytest.raises(SystemExit):
        cli.vllm_serve_command(["--help"], cuda=False)
    help_text = " ".join(capsys.readouterr().out.split())
    assert "replace the model's weights" in help_text and "trusted network" in help_text


# ---------------------------------------------------------------------------------------- weight-sync folder
@pytest.fixture(scope="module")
def vllm_rollout():
    pytest.importorskip("vllm")
    from trl_sdft.rollouts import vllm_engine as vllm_rollout

    return vllm_rollout


def test_default_sync_dir_is_private_fresh_and_removed(vllm_rollout):
    first, second = vllm_rollout.SyncDirectory(None), vllm_rollout.SyncDirectory(None)
    path = first.path
    assert path != second.path and os.path.basename(path).startswith("trl-sdft-vllm-sync-")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700 and os.stat(path).st_uid == os.getuid()
    first.write("config.json", b"{}")
    first.remove()
    assert not os.path.exists(path)
    left = second.path
    del second  # dropped without close: the directory goes with the object
    assert not os.path.exists(left)


def test_given_sync_dir_is_created_owner_only(vllm_rollout, tmp_path):
    target = tmp_path / "sync" / "weights"
    directory = vllm_rollout.SyncDirectory(str(target))
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o700
    directory.write("config.json", b"{}")
    directory.remove()  # the user's folder stays
    assert (target / "config.json").read_bytes() == b"{}"


def test_given_sync_dir_symlink_or_foreign_is_refused(vllm_rollout, tmp_path, monkeypatch):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    one_line_error(lambda: vllm_rollout.SyncDirectory(str(tmp_path / "link")), "`vllm_sync_dir`.*symbolic link")
    monkeypatch.setattr(os, "getuid", lambda: os.stat(real).st_uid + 1)
    one_line_error(lambda: vllm_rollout.SyncDirectory(str(real)), "`vllm_sync_dir`.*owned by another user")


def test_given_sync_dir_open_to_everyone_is_refused(vllm_rollout, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    one_line_error(lambda: vllm_rollout.SyncDirectory(str(shared)), "`vllm_sync_dir`.*writable by every user")


def test_sync_writes_never_follow_symlinks(vllm_rollout, tmp_path):
    directory = vllm_rollout.SyncDirectory(str(tmp_path / "sync"))
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.symlink(victim, tmp_path / "sync" / "config.json")
    directory.write("config.json", b"{}")
    assert victim.read_text() == "keep" and (tmp_path / "sync" / "config.json").read_bytes() == b"{}"
    assert not os.path.islink(tmp_path / "sync" / "config.json")


def test_rollout_close_removes_the_private_sync_dir(vllm_rollout):
    from trl_sdft.rollouts.vllm import VLLMRollout

    rollout = object.__new__(VLLMRollout)
    rollout._inflight, rollout._executor = None, None
    generation = object.__new__(vllm_rollout.SDFTVLLMGeneration)
    generation.sync_directory = vllm_rollout.SyncDirectory(None)
    rollout.generation = generation
    path = generation.sync_directory.path
    rollout.close()
    assert not os.path.exists(path)


# ------------------------------------------------------------------------------------------ continual tasks
def test_task_files_are_documented_as_code():
    from trl_sdft.cli import continual as continual_cli
    from trl_sdft.continual import tasks

    assert "task files you trust" in " ".join(tasks.__doc__.split())
    assert "task files you trust" in " ".join(continual_cli.parser().format_help().split())


# ------------------------------------------------------------------------ round two: every input checked where read
@pytest.mark.parametrize(
    "text, match",
    [
        ("Be concise and answer in English.\n", r"template\.jinja.* holds no chat template"),
        ("{% for m in messages %}{{ m.content }}{% endfor\n", r"template\.jinja.*not valid Jinja at line 1"),
    ],
)
def test_a_chat_template_file_is_parsed_and_rendered_at_load(tmp_path, text, match):
    """Before: any readable file was taken as Jinja; one without a template rendered every prompt to the same text
    (loss 0, exit 0), a malformed one failed after the model loaded."""
    from trl_sdft.chat_templates import load_chat_template

    one_line_error(lambda: load_chat_template(write(tmp_path / "template.jinja", text)), match)


def test_templates_with_their_own_rules_or_named_templates_are_accepted():
    """A template may refuse a lone user message (it wants a system turn first) or read `tools`: real prompts may
    satisfy it, so it is not judged by the sample. Named templates (a dict) are checked one by one."""
    from trl_sdft.chat_templates import check_chat_template
    from trl_sdft.testing import CHAT_TEMPLATE

    check_chat_template("{% if messages[0].role != 'system' %}{{ raise_exception('system first') }}{% endif %}", "t")
    check_chat_template("{% if tools is not none %}{{ tools | tojson }}{% endif %}" + CHAT_TEMPLATE, "t")
    check_chat_template({"default": CHAT_TEMPLATE, "tool_use": CHAT_TEMPLATE}, "t")
    one_line_error(lambda: check_chat_template({"default": "plain text"}, "t"), r"t \(template 'default'\) holds no")


def test_a_template_directory_without_a_tokenizer_is_one_line(tmp_path):
    """Before: transformers' five-line "Couldn't instantiate the backend tokenizer" error."""
    from trl_sdft.chat_templates import load_chat_template

    (tmp_path / "notes.txt").write_text("not a tokenizer")
    one_line_error(lambda: load_chat_template(str(tmp_path)), r"is a directory, but no tokenizer loads from it")


def test_the_bundled_and_test_templates_pass_the_check(tmp_path):
    from trl_sdft.chat_templates import check_chat_template, load_chat_template
    from trl_sdft.testing import CHAT_TEMPLATE, TOOL_CHAT_TEMPLATE

    assert "tool_call" in load_chat_template("smollm2-tools")
    for template in (CHAT_TEMPLATE, TOOL_CHAT_TEMPLATE):
        check_chat_template(template, "test")


@pytest.mark.parametrize(
    "name, data, match",
    [
        ("template.jinja", "{{ m }}\n{# café #}", r"`chat_template_path` '.*template\.jinja': line 2, column 7"),
        ("rows.csv", "prompt,privileged_context\nq,c\nMél,c\n", r"rows\.csv.*line 3, column 2 is not UTF-8"),
        ("rows.json", '[\n{"prompt": "q", "privileged_context": "c"},\n{"prompt": "Mél"}]', r"rows\.json.*line 3"),
        ("units.jsonl", '{"split": "train"}\n{"prompt": "Mél"}\n', r"units\.jsonl.*line 2"),
        ("grid.yaml", "# café\n- {method: sft}\n", r"grid\.yaml.*line 1, column 6"),
        ("config.yaml", "max_steps: 2\n# café\n", r"--config '.*config\.yaml': line 2, column 6"),
        ("distill.json", '{"train": "é"}', r"--config_file '.*distill\.json': line 1, column 12"),
    ],
)
def test_a_latin1_file_is_named_with_its_line(tmp_path, name, data, match):
    """Before: a bare "'utf-8' codec can't decode byte 0xe9 in position 92" naming no file."""
    from trl_sdft.chat_templates import load_chat_template
    from trl_sdft.cli.yaml_config import load_yaml_config
    from trl_sdft.continual.grid import load_grid
    from trl_sdft.continual.tasks import load_task
    from trl_sdft.offline.distill import DistillConfig

    path = tmp_path / name
    path.write_bytes(data.encode("latin-1"))
    load = {
        "template.jinja": load_chat_template,
        "rows.csv": lambda p: load_local_dataset(p, "train"),
        "rows.json": lambda p: load_local_dataset(p, "train"),
        "units.jsonl": load_task,
        "grid.yaml": load_grid,
        "config.yaml": load_yaml_config,
        "distill.json": DistillConfig.from_file,
    }[name]
    one_line_error(lambda: load(str(path)), match)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"generation_kwargs": {"top_kk": 5}}, r"`generation_kwargs` has 'top_kk' \(did you mean 'top_k'\?\)"),
        ({"generation_kwargs": '{"repetition_penalti": 1.2}'}, r"'repetition_penalti'.*GenerationConfig"),
        ({"gradient_accumulation_steps": 0}, r"`gradient_accumulation_steps=0` must be >= 1"),
        ({"teacher_prompt_template": "{prompt:d} {privileged_context}"}, r"`teacher_prompt_template` cannot be filled"),
        ({"teacher_prompt_template": "{prompt!z} {privileged_context}"}, r"`teacher_prompt_template`"),
    ],
)
def test_config_values_are_named_by_the_option_given(tmp_path, overrides, match):
    """Before: a misspelled generation key was ignored, `gradient_accumulation_steps=0` was reported as
    `steps_per_generation=0`, and `{prompt:d}` failed at the first step without naming the option."""
    from trl_sdft import SDFTConfig

    one_line_error(lambda: SDFTConfig(str(tmp_path), use_cpu=True, report_to="none", **overrides), match)


def test_generation_keys_of_either_backend_are_accepted(tmp_path):
    from trl_sdft import SDFTConfig

    config = SDFTConfig(str(tmp_path), use_cpu=True, generation_kwargs={"min_new_tokens": 2, "repetition_penalty": 1.1})
    assert config.generation_kwargs == {"min_new_tokens": 2, "repetition_penalty": 1.1}


TOOL = '''
def lookup(name: str) -> str:
    """Look up a name.

    Args:
        name: The name.
    """
    return name
'''


def test_two_tools_with_one_name_are_refused():
    """Before: both schemas were shown and every call went to the last one."""
    from trl_sdft.tools import Toolbox

    first, second = {}, {}
    exec(TOOL, first)
    exec(TOOL.replace("return name", "return name.upper()"), second)
    one_line_error(
        lambda: Toolbox([first["lookup"], second["lookup"]]), r"Two tools of `tools` share the name 'lookup'"
    )


def test_an_environment_that_cannot_be_built_is_named():
    from trl_sdft.tools import Toolbox

    class Env:
        def __init__(self):
            raise RuntimeError("API key not set")

    one_line_error(lambda: Toolbox(None, Env), r"`environment_factory` raised RuntimeError .*API key not set")


def test_tools_are_checked_before_the_model_loads(tmp_path, tokenizer, tiny_config, monkeypatch):
    """Before: a tool without a docstring, or tools with text prompts, were refused after the model had loaded."""
    from trl_sdft import SDFTTrainer

    monkeypatch.setattr("trl_sdft.trainer.load_model", lambda *a, **k: pytest.fail("model loaded"))
    namespace = {}
    exec("def lookup(name):\n    return name\n", namespace)
    rows = Dataset.from_list([CHAT_ROW] * 4)
    args = tiny_config(tmp_path)
    build = lambda tools, data: SDFTTrainer("unused", args, data, processing_class=tokenizer, tools=tools)  # noqa: E731
    one_line_error(lambda: build([namespace["lookup"]], rows), r"Tool 'lookup' .*cannot be described")
    exec(TOOL, namespace)
    one_line_error(lambda: build([namespace["lookup"]], Dataset.from_list([ROW] * 4)), r"Tools need chat prompts")


def test_prompt_lengths_are_checked_before_the_model_loads(tmp_path, tiny_model_dir, tiny_config, monkeypatch):
    """Before: the context check read the loaded model's config, so a completion longer than the context was refused
    only after every weight had been read; now the config alone is read for it."""
    from transformers import AutoConfig

    from trl_sdft import SDFTTrainer

    context = AutoConfig.from_pretrained(tiny_model_dir).max_position_embeddings
    monkeypatch.setattr("trl_sdft.trainer.load_model", lambda *a, **k: pytest.fail("model loaded"))
    args = tiny_config(tmp_path, max_completion_length=context)
    one_line_error(
        lambda: SDFTTrainer(tiny_model_dir, args, Dataset.from_list([ROW] * 4)), r"leaves no room for a prompt"
    )


def test_distill_trainer_values_are_typed(tmp_path):
    """Before: `"max_steps": "two"` passed SFTConfig and failed with a TypeError traceback in training."""
    from trl import SFTConfig

    from trl_sdft.offline.checks import check_trainer_values

    one_line_error(
        lambda: check_trainer_values("d.json", {"max_steps": "two"}, SFTConfig), r"d\.json: `trainer\.max_steps`"
    )
    check_trainer_values("d.json", {"max_steps": 2, "logging_steps": 0.5, "learning_rate": 1, "bf16": None}, SFTConfig)


def test_distill_keeps_a_users_file_it_would_write_over(tmp_path):
    from trl_sdft.cli.offline import check_output_dir

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tokenizer.json").write_text("my own")
    one_line_error(
        lambda: check_output_dir(str(tmp_path / "out"), str(tmp_path / "m"), False), r"holds tokenizer\.json"
    )
    check_output_dir(str(tmp_path / "out"), str(tmp_path / "m"), True)


def test_continual_names_a_missing_model_before_anything_loads(tmp_path, capsys):
    from trl_sdft.cli.continual import main

    code = main(["--model", str(tmp_path / "no-such-model"), "--method", "sft", "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--model" in err and "no-such-model" in err and "does not exist" in err


def test_a_huge_privileged_context_is_cut_before_it_is_tokenized(tokenizer):
    """Before: a 50 MB context was tokenized whole (a 12 GB peak) to keep its first few hundred tokens."""
    from trl_sdft.batch import fit_teacher_prompts

    seen = []
    calls = tokenizer.__class__.__call__

    def recording(self, *args, text=None, **kwargs):
        seen.extend(len(t) for t in ([text] if isinstance(text, str) else text or []))
        return calls(self, *args, text=text, **kwargs)

    huge = "The sky is green on Tuesdays. " * 40_000  # 1.2 MB
    small = "Zorb is blue."
    contexts = [huge + "END", small]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tokenizer.__class__, "__call__", recording)
        fitted = fit_teacher_prompts(tokenizer, ["What color?", "Zorb?"], contexts, "{prompt} {privileged_context}", 64)
    assert max(seen) < 100_000  # never the whole context
    whole = fit_teacher_prompts(
        tokenizer, ["What color?"], ["The sky is green on Tuesdays. " * 200], "{prompt} {privileged_context}", 64
    )
    assert fitted.ids[0] == whole.ids[0] and len(fitted.ids[0]) <= 64  # the same tokens as from the whole text
    assert fitted.context_cut == [0]


def test_a_huge_context_behind_a_too_long_question_keeps_the_true_end(tokenizer):
    """The question alone longer than the limit: the teacher prompt is cut from the left, so its end (the end of the
    context) is kept, and the pre-cut keeps that end too (a reviewer found the pre-cut's edge kept instead)."""
    from trl_sdft.batch import fit_teacher_prompts

    question = "Zorb? " * 200
    context = " ".join(f"w{i}" for i in range(20_000))
    fitted = fit_teacher_prompts(tokenizer, [question], [context], "{prompt} {privileged_context}", 64)
    row = tokenizer(text=f"{question} {context}")["input_ids"]
    assert fitted.left_cut == [0] and fitted.ids[0] == list(row[-64:])


def test_a_huge_text_prompt_is_cut_before_it_is_tokenized(tokenizer):
    from trl_sdft.batch import fit_teacher_prompts, tokenize_prompts

    seen = []
    calls = tokenizer.__class__.__call__

    def recording(self, *args, text=None, **kwargs):
        seen.extend(len(t) for t in ([text] if isinstance(text, str) else text or []))
        return calls(self, *args, text=text, **kwargs)

    prompt = "The sky is green on Tuesdays. " * 40_000 + "What color is Zorb?"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tokenizer.__class__, "__call__", recording)
        student = tokenize_prompts(tokenizer, [prompt], 64)
        teacher = fit_teacher_prompts(tokenizer, [prompt], ["Zorb is blue."], "{prompt} {privileged_context}", 64)
    assert max(seen) < 100_000
    short = "The sky is green on Tuesdays. " * 200 + "What color is Zorb?"
    assert student == tokenize_prompts(tokenizer, [short], 64)  # the last 64 tokens, as from the whole prompt
    whole = fit_teacher_prompts(tokenizer, [short], ["Zorb is blue."], "{prompt} {privileged_context}", 64)
    assert teacher.ids == whole.ids and teacher.left_cut == [0]


def test_a_registered_backend_reads_its_own_generation_keys(tmp_path):
    from trl_sdft import SDFTConfig
    from trl_sdft.rollouts import ROLLOUT_BACKENDS, register_rollout_backend

    register_rollout_backend("test-own-keys", lambda context: None)
    try:
        config = SDFTConfig(
            str(tmp_path), use_cpu=True, rollout_backend="test-own-keys", generation_kwargs={"beam_width": 3}
        )
        assert config.generation_kwargs == {"beam_width": 3}
    finally:
        ROLLOUT_BACKENDS.pop("test-own-keys", None)
