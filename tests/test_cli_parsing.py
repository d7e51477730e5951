"""`trl-sdft` flags and `--config` YAML files: every bad input is one line on stderr and exit code 2, before a model
is loaded, naming the file or flag and the fix."""

import pytest

from trl_sdft import cli


def base_flags(tmp_path):
    # A --dataset_path that does not exist: input the parser lets through stops right after parsing, on that error.
    missing = str(tmp_path / "missing.jsonl")
    return ["--use_cpu", "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--dataset_path", missing]


def one_line_error(capsys, tmp_path, *argv) -> str:
    """Runs `trl-sdft argv`; returns its error line after checking the exit code and that nothing else was said."""
    code = cli.main([*argv, *base_flags(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "usage:" not in err, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("trl-sdft: error: "), err
    assert "missing.jsonl" not in errors[0], "the input went through the parser: " + errors[0]
    return errors[0]


def write(tmp_path, text: str, name="run.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("num_generations: 2.0\n", ["num_generations", "2.0", "integer"]),
        ("num_generations: two\n", ["num_generations", "'two'", "integer"]),
        ("num_generations: true\n", ["num_generations", "True", "integer"]),
        ("num_generations: null\n", ["num_generations", "null", "integer"]),
        ("max_prompt_length: 512.0\n", ["max_prompt_length", "512.0", "integer or null", "`max_prompt_length: 512`"]),
        ("learning_rate: fast\n", ["learning_rate", "'fast'", "number"]),
        ("use_vllm: 1\n", ["use_vllm", "1", "true or false"]),
        ("teacher_model_kind: 3\n", ["teacher_model_kind", "3", "string"]),
        ("lora_target_modules: [1, 2]\n", ["lora_target_modules", "[1, 2]", "string"]),
    ],
)
def test_yaml_values_of_the_wrong_type_are_refused(tmp_path, capsys, text, expected):
    """TRL's parser passes YAML values through untyped: 2.0 for an int failed only at step 1, with a TypeError."""
    config = write(tmp_path, text)
    line = one_line_error(capsys, tmp_path, "--config", config)
    for part in [config, *expected]:
        assert part in line, line


def test_yaml_values_argparse_converts_still_work(tmp_path):
    """YAML reads `2e-5` (no dot) and quoted numbers as strings; the flags' own conversion still applies to them."""
    text = 'learning_rate: 2e-5\nnum_generations: "4"\nnum_train_epochs: 2\nuse_vllm: "false"\nlora_target_modules: all-linear\n'
    _, args, model_args = cli.parse(["--config", write(tmp_path, text), *base_flags(tmp_path)])
    assert (args.learning_rate, args.num_generations, args.num_train_epochs, args.use_vllm) == (2e-5, 4, 2.0, False)
    assert model_args.lora_target_modules == "all-linear"  # PEFT's name for every linear layer, as TRL passes it


def test_duplicate_yaml_keys_are_refused(tmp_path, capsys):
    """YAML lets the last of two equal keys win silently: a value edited in one place may be overridden later."""
    config = write(tmp_path, "num_generations: 2\nlearning_rate: 1.0e-5\nnum_generations: 4\n")
    line = one_line_error(capsys, tmp_path, "--config", config)
    for part in (config, "line 3", "num_generations", "line 1"):
        assert part in line, line


@pytest.mark.parametrize(
    "text, expected",
    [
        ("learning_rate: 1.0e-5\nx: !!python/object/apply:os.system ['echo pwned']\n", ["line 2", "tag"]),
        ("x: !custom 3\n", ["line 1", "tag"]),
        ("- num_generations\n- 2\n", ["mapping"]),
        ("num_generations: 2\n---\nnum_generations: 4\n", ["line 2", "document"]),
        ("", ["empty"]),
        ("# only a comment\n", ["empty"]),
        ("num_generations: [2, 4\nlearning_rate: 1\n", ["line"]),
        ("num_generations: 2\n  learning_rate: 1\n", ["line 2"]),
        ("env: 3\n", ["env"]),
    ],
)
def test_unusable_yaml_files_are_one_line_errors(tmp_path, capsys, text, expected):
    """Object tags must not run code (safe loading), and YAML errors span several lines: one line with file and line."""
    config = write(tmp_path, text)
    line = one_line_error(capsys, tmp_path, "--config", config)
    for part in [config, *expected]:
        assert part in line, line


@pytest.mark.parametrize("argv", [["--config", "nope/run.yaml"], ["--config"]])
def test_missing_config_file_is_a_one_line_error(tmp_path, capsys, argv):
    """A mistyped path gave a FileNotFoundError traceback."""
    line = one_line_error(capsys, tmp_path, *argv)
    assert "--config" in line and ("nope/run.yaml" in line if len(argv) == 2 else "path" in line), line


def test_dict_fields_take_json_objects(tmp_path, capsys):
    """TRL's configs take these as JSON strings on the command line; typed `dict` alone, argparse refused every value."""
    flags = {
        "--generation_kwargs": '{"max_new_tokens": 4, "stop_strings": ["\\n"]}',
        "--model_init_kwargs": '{"attn_implementation": "eager"}',
        "--chat_template_kwargs": '{"enable_thinking": false}',
    }
    _, args, _ = cli.parse([*[part for item in flags.items() for part in item], *base_flags(tmp_path)])
    assert args.generation_kwargs == {"max_new_tokens": 4, "stop_strings": ["\n"]}
    assert args.model_init_kwargs == {"attn_implementation": "eager"}
    assert args.chat_template_kwargs == {"enable_thinking": False}
    # In a YAML file: a mapping or a JSON string.
    config = write(
        tmp_path, "generation_kwargs: {max_new_tokens: 4}\nchat_template_kwargs: '{\"enable_thinking\": true}'\n"
    )
    _, args, _ = cli.parse(["--config", config, *base_flags(tmp_path)])
    assert args.generation_kwargs == {"max_new_tokens": 4} and args.chat_template_kwargs == {"enable_thinking": True}
    for flag, value in [("--generation_kwargs", "{max_tokens: 4}"), ("--chat_template_kwargs", "[1, 2]")]:
        line = one_line_error(capsys, tmp_path, flag, value)
        assert flag.lstrip("-") in line and "JSON object" in line, line
    assert "JSON object" in one_line_error(capsys, tmp_path, "--config", write(tmp_path, "generation_kwargs: [1]\n"))


def test_help_still_works(capsys):
    """argparse %-formats help strings: a stray % in a help text breaks `--help`."""
    with pytest.raises(SystemExit) as exit_info:
        cli.parse(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--generation_kwargs" in out and "--num_loss_tokens_to_skip" in out


@pytest.mark.parametrize(
    "value, expected", [("true", True), ("True", True), ("false", None), ("runs/x/checkpoint-4", "runs/x/checkpoint-4")]
)
def test_resume_from_checkpoint_true_means_the_latest_checkpoint(tmp_path, value, expected):
    """`--resume_from_checkpoint true` was taken as a path named 'true'; the HF Trainer's True is the latest one."""
    _, args, _ = cli.parse(["--resume_from_checkpoint", value, *base_flags(tmp_path)])
    assert args.resume_from_checkpoint == expected
    config = write(tmp_path, f"resume_from_checkpoint: {value}\n")
    _, args, _ = cli.parse(["--config", config, *base_flags(tmp_path)])
    assert args.resume_from_checkpoint == expected


@pytest.mark.parametrize("flags", [["--num_generations", "2.0"], ["--bf16", "maybe"], ["--teacher_model_kind"]])
def test_a_bad_flag_value_is_one_line_without_the_usage(tmp_path, capsys, flags):
    """argparse printed its whole usage (over 100 lines) before the one line that says what is wrong."""
    code = cli.main(["--output_dir", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "usage:" not in err
    assert flags[0] in err and "--help" in err
