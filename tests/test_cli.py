"""The CLI (`scripts/sdft.py` / `trl-sdft`): flags, YAML configs, data loading, errors, and real runs on a tiny model."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import yaml
from datasets import Dataset
from helpers import tiny_flags

from trl_sdft import cli
from trl_sdft.cli.data_files import load_local_dataset
from trl_sdft.testing import facts_rows

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "sdft.py"

# The example command of TRL's SDFT documentation, flag for flag.
TRL_DOC_FLAGS = [
    "--model_name_or_path",
    "Qwen/Qwen2.5-1.5B-Instruct",
    "--dataset_name",
    "some/dataset",
    "--output_dir",
    "outputs/sdft",
    "--per_device_train_batch_size",
    "8",
    "--gradient_accumulation_steps",
    "2",
    "--learning_rate",
    "2e-5",
    "--max_prompt_length",
    "1024",
    "--max_completion_length",
    "512",
    "--generate_from_teacher",
    "--teacher_model_kind",
    "ema",
    "--teacher_sync_steps",
    "4",
    "--teacher_update_rate",
    "0.02",
    "--eval_strategy",
    "steps",
    "--eval_steps",
    "50",
    "--report_to",
    "none",
]


def test_trl_doc_command_parses_with_the_same_meaning():
    script_args, args, model_args = cli.parse(TRL_DOC_FLAGS + ["--use_cpu", "--per_device_eval_batch_size", "8"])
    assert model_args.model_name_or_path == "Qwen/Qwen2.5-1.5B-Instruct"
    assert script_args.dataset_name == "some/dataset"
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (8, 2)
    assert args.learning_rate == 2e-5
    assert (args.max_prompt_length, args.max_completion_length) == (1024, 512)
    assert args.generate_from_teacher is True
    assert (args.teacher_model_kind, args.teacher_sync_steps, args.teacher_update_rate) == ("ema", 4, 0.02)
    assert (args.eval_strategy, args.eval_steps) == ("steps", 50)
    assert args.report_to == [] or args.report_to == "none" or args.report_to == ["none"]
    assert args.steps_per_generation == 2 and args.generation_batch_size == 16


def test_lora_and_dataset_flags():
    script_args, args, model_args = cli.parse(
        [
            "--use_peft",
            "--lora_r",
            "8",
            "--lora_alpha",
            "16",
            "--lora_dropout",
            "0.1",
            "--lora_target_modules",
            "q_proj",
            "v_proj",
            "--lora_modules_to_save",
            "lm_head",
            "--dataset_path",
            "x.jsonl",
            "--dataset_config",
            "cfg",
            "--dataset_train_split",
            "tr",
            "--dataset_test_split",
            "te",
            "--use_cpu",
            "--output_dir",
            "o",
        ]
    )
    assert model_args.use_peft and model_args.lora_r == 8 and model_args.lora_target_modules == ["q_proj", "v_proj"]
    assert model_args.lora_modules_to_save == ["lm_head"]
    assert (script_args.dataset_path, script_args.dataset_config) == ("x.jsonl", "cfg")
    assert (script_args.dataset_train_split, script_args.dataset_test_split) == ("tr", "te")
    assert model_args.model_name_or_path == "smollm2-135m-instruct"  # the embedded default


def run_cli(*argv, env=None):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=1800,
    )


@pytest.mark.processes
def test_unknown_flag_is_one_line_error(tmp_path):
    result = run_cli("--output_dir", str(tmp_path), "--no_such_flag", "3")
    assert result.returncode == 2
    assert "--no_such_flag" in result.stderr


@pytest.mark.parametrize(
    "path, message",
    [("does/not/exist.jsonl", "does not exist"), ("data.txt", "unknown format '.txt'")],
)
def test_bad_dataset_paths(tmp_path, path, message):
    if path == "data.txt":
        (tmp_path / "data.txt").write_text("hello")
        path = str(tmp_path / "data.txt")
    with pytest.raises(ValueError, match=message):
        load_local_dataset(path, "train")


def test_dataset_without_columns_fails_before_model_load(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    code = cli.main(
        [
            "--dataset_path",
            str(data),
            "--model_name_or_path",
            str(tmp_path / "no-model"),
            "--use_cpu",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "lacks the column(s) ['prompt', 'privileged_context']; found ['question', 'answer']" in err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("trl-sdft: error:")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "saved"])
def test_local_formats_load(tmp_path, fmt):
    rows = Dataset.from_list(facts_rows(4))
    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        rows.to_json(path)
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        rows.to_parquet(path)
    else:
        path = tmp_path / "saved"
        rows.save_to_disk(path)
    loaded = load_local_dataset(str(path), "train")
    assert loaded["prompt"] == rows["prompt"]


def test_yaml_config_and_cli_override(tmp_path, tiny_model_dir):
    data = tmp_path / "rows.jsonl"
    Dataset.from_list(facts_rows(4)).to_json(data)
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {"teacher_model_kind": "ema", "distillation_mode": "full_logits", "distillation_alpha": 0.0, "max_steps": 5}
        )
    )
    code = cli.main(
        [
            "--config",
            str(config),
            "--dataset_path",
            str(data),
            *tiny_flags(tmp_path, tiny_model_dir, "--max_steps", "2"),
        ]
    )
    assert code == 0
    state = (
        json.loads((tmp_path / "out" / "trainer_state.json").read_text())
        if (tmp_path / "out" / "trainer_state.json").exists()
        else None
    )
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert (tmp_path / "out" / "README.md").read_text().count("2601.19897") >= 1
    assert state is None or state["global_step"] == 2


def test_embedded_task_writes_results_and_summary(tmp_path, tiny_model_dir, capsys):
    code = cli.main(
        [
            "--num_facts",
            "2",
            "--num_probes",
            "2",
            "--eval_max_new_tokens",
            "4",
            *tiny_flags(tmp_path, tiny_model_dir, "--use_peft", "--lora_target_modules", "q_proj", "v_proj"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for stage in ("baseline", "final"):
        assert results[stage]["new_facts"]["total"] == 2 and results[stage]["general_probes"]["total"] == 2
        assert len(results[stage]["paraphrases"]["answers"]) == 2
    assert "SDFT summary" in out and "model saved to" in out and "new_facts" in out
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.processes
def test_console_script_is_installed():
    exe = pathlib.Path(sys.executable).parent / "trl-sdft"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--teacher_model_kind" in result.stdout and "--dataset_path" in result.stdout


@pytest.mark.processes
def test_two_processes_with_accelerate(tmp_path, tiny_model_dir):
    """Exactly `accelerate launch --cpu --num_processes 2 scripts/sdft.py ...`: two processes, gloo."""
    data = tmp_path / "rows.jsonl"
    Dataset.from_list(facts_rows(8)).to_json(data)
    exe = pathlib.Path(sys.executable).parent / "accelerate"
    command = [
        str(exe),
        "launch",
        "--cpu",
        "--num_processes",
        "2",
        str(SCRIPT),
        "--dataset_path",
        str(data),
        *tiny_flags(
            tmp_path, tiny_model_dir, "--teacher_model_kind", "ema", "--save_strategy", "steps", "--save_steps", "2"
        ),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting 2 CPU processes" in result.stderr
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    # 8 rows, 4 per process and step: one epoch takes 2 steps with two processes (4 with one).
    assert state["global_step"] == 2 and state["epoch"] == pytest.approx(1.0)
    assert (tmp_path / "out" / "checkpoint-2" / "sdft_teacher.safetensors").exists()
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("name", ["demo.yaml", "paper.yaml", "qwen2.5-1.5b-lora.yaml", "vllm-server.yaml"])
def test_shipped_configs_parse_and_validate(name):
    script_args, args, model_args = cli.parse(["--config", str(ROOT / "configs" / name), "--use_cpu"])
    assert args.output_dir and model_args.model_name_or_path
    if name == "vllm-server.yaml":
        assert args.use_vllm and args.vllm_mode == "server" and args.use_teacher_server
    if name == "qwen2.5-1.5b-lora.yaml":
        assert model_args.use_peft and args.teacher_model_kind == "ema"


@pytest.mark.parametrize("name", ["ddp.yaml", "zero3.yaml", "fsdp.yaml", "cpu-2proc.yaml"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(ROOT / "configs" / "accelerate" / name))
    assert config.num_processes >= 2
    expected = {"ddp.yaml": "MULTI_GPU", "zero3.yaml": "DEEPSPEED", "fsdp.yaml": "FSDP", "cpu-2proc.yaml": "MULTI_CPU"}
    assert str(config.distributed_type).endswith(expected[name])
    if name == "zero3.yaml":
        assert config.deepspeed_config["zero_stage"] == 3


def write_lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


USER_QUESTIONS = [
    {"question": "What color is Zorbo?", "answers": ["red"], "paraphrase": "Which color does Zorbo have?"},
    {"question": "What color is Quilla?", "answer": "blue", "paraphrase": "Quilla has which color?"},
    {"question": "What color is Tovi?", "answers": ["black", "dark"]},
]


def test_your_own_questions_and_probes_get_the_same_table(tmp_path, tiny_model_dir, capsys):
    data = write_lines(tmp_path / "train.jsonl", facts_rows())
    questions = write_lines(tmp_path / "questions.jsonl", USER_QUESTIONS)
    probes = write_lines(tmp_path / "probes.jsonl", [{"question": "What color is Mendax?", "answers": ["green"]}] * 2)
    flags = ["--dataset_path", data, "--eval_questions", questions, "--eval_probes", probes]
    code = cli.main([*flags, "--eval_max_new_tokens", "4", *tiny_flags(tmp_path, tiny_model_dir)])
    out = capsys.readouterr().out
    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for stage in ("baseline", "final"):
        totals = {name: results[stage][name]["total"] for name in ("new_facts", "paraphrases", "general_probes")}
        assert totals == {"new_facts": 3, "paraphrases": 2, "general_probes": 2}
        asked = [entry["question"] for entry in results[stage]["paraphrases"]["answers"]]
        assert asked == ["Which color does Zorbo have?", "Quilla has which color?"]
    assert "SDFT summary" in out and "paraphrases" in out and "general_probes" in out


@pytest.mark.parametrize(
    "records, flag, message",
    [
        (["{not json"], "--eval_questions", r"questions.jsonl, line 1: not valid JSON"),
        (
            [{"question": "q", "answers": ["a"]}, {"answers": ["a"]}],
            "--eval_questions",
            r"line 2: \"question\" is missing",
        ),
        ([{"question": "q", "answers": []}], "--eval_questions", r"line 1: \"answers\" must be a non-empty list"),
        ([{"question": "q", "answers": ["a"], "paraphrase": 3}], "--eval_questions", r"line 1: \"paraphrase\" 3"),
        ([], "--eval_questions", "holds no questions"),
        (
            [{"question": "q", "answers": ["a"], "paraphrase": "p"}],
            "--eval_probes",
            r"probes.jsonl, line 1: .*remove it",
        ),
    ],
)
@pytest.mark.processes
def test_bad_question_files_fail_before_the_model_loads(tmp_path, records, flag, message):
    data = write_lines(tmp_path / "train.jsonl", facts_rows())
    good = write_lines(tmp_path / "good.jsonl", USER_QUESTIONS)
    bad = write_lines(tmp_path / ("questions.jsonl" if flag == "--eval_questions" else "probes.jsonl"), records)
    files = (
        ["--eval_questions", bad] if flag == "--eval_questions" else ["--eval_questions", good, "--eval_probes", bad]
    )
    # A model path that does not exist: the file errors must come first.
    args = [
        "--dataset_path",
        data,
        *files,
        "--model_name_or_path",
        str(tmp_path / "no-model"),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    with pytest.raises(ValueError, match=message):
        cli.load_data(*cli.parse(args)[:2])
    result = run_cli(*args, "--use_cpu")
    assert result.returncode == 2 and "trl-sdft: error:" in result.stderr and flag in result.stderr
    assert not (tmp_path / "out").exists()


def test_question_files_need_your_dataset(tmp_path):
    questions = write_lines(tmp_path / "q.jsonl", USER_QUESTIONS)
    with pytest.raises(ValueError, match="with --dataset_path or --dataset_name"):
        cli.load_data(*cli.parse(["--eval_questions", questions, "--output_dir", str(tmp_path)])[:2])
    with pytest.raises(ValueError, match="--eval_probes goes with --eval_questions"):
        cli.load_data(*cli.parse(["--eval_probes", questions, "--output_dir", str(tmp_path)])[:2])


@pytest.mark.slow
@pytest.mark.usefixtures("requires_smollm")
def test_your_own_questions_on_the_default_model(tmp_path, capsys):
    """Once on SmolLM2: made-up facts it cannot know, probes it answers; two training steps, the same table."""
    from trl_sdft.demo.knowledge import load_facts

    facts = load_facts(2)
    data = write_lines(
        tmp_path / "train.jsonl",
        [{"prompt": [{"role": "user", "content": f["question"]}], "privileged_context": f["fact"]} for f in facts],
    )
    questions = write_lines(
        tmp_path / "questions.jsonl",
        [{"question": f["question"], "answer": f["answer"], "paraphrase": f["paraphrase"]} for f in facts],
    )
    probes = write_lines(
        tmp_path / "probes.jsonl",
        [
            {"question": "What is the capital of France?", "answers": ["Paris"]},
            {"question": "What is the capital of Japan?", "answers": ["Tokyo"]},
        ],
    )
    flags = ["--dataset_path", data, "--eval_questions", questions, "--eval_probes", probes]
    flags += ["--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "2"]
    flags += ["--num_generations", "1", "--max_completion_length", "8", "--use_cpu", "--bf16", "false"]
    flags += ["--save_strategy", "no", "--report_to", "none", "--eval_max_new_tokens", "16"]
    assert cli.main(flags) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    baseline = results["baseline"]
    assert baseline["new_facts"]["correct"] == 0 and baseline["general_probes"]["correct"] == 2
    assert results["final"]["paraphrases"]["total"] == 2
    assert "SDFT summary" in capsys.readouterr().out


def _bug_in_a_library():
    return int("twelve")  # a ValueError no `raise` statement wrote: what a bug looks like


def _bug_in_trl_sdft():
    from trl_sdft.rollouts import Rollouts, within_budgets

    within_budgets(Rollouts([[1, 2]]), [1, 1])  # zip(strict=True) fails inside trl-sdft: still a bug


def _diagnosed_by_trl_sdft():
    from trl_sdft.rollouts import register_rollout_backend

    register_rollout_backend("transformers", None)  # refused with an explanation: a usage error


@pytest.mark.parametrize(
    "during_training, usage_error",
    [(_bug_in_a_library, False), (_bug_in_trl_sdft, False), (_diagnosed_by_trl_sdft, True)],
)
def test_only_diagnosed_errors_during_training_become_one_line(
    tmp_path, tiny_model_dir, capsys, monkeypatch, during_training, usage_error
):
    """Before training every ValueError is a usage error (arguments, files, the trainer's checks). During training
    only the problems trl-sdft itself recognized and explained print one line; any other ValueError keeps its
    traceback, which a bug report needs (before: every one became one line, e.g. `trl-sdft: error: invalid literal for int()`)."""
    monkeypatch.setattr("trl_sdft.trainer.SDFTTrainer.train", lambda self, **kwargs: during_training())
    monkeypatch.delenv("TRL_SDFT_TRACEBACK", raising=False)
    argv = tiny_flags(tmp_path, tiny_model_dir, "--knowledge_eval", "false")
    if usage_error:
        assert cli.main(argv) == 2
        assert "already registered" in capsys.readouterr().err
    else:
        with pytest.raises(ValueError):  # propagates with its traceback
            cli.main(argv)
        assert "trl-sdft: error" not in capsys.readouterr().err
