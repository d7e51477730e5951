"""A library changes nothing process-wide unasked: constructing and training an `SDFTTrainer` from Python leaves
malloc, the environment, signal handlers, exit hooks and fault handlers as they were. The CLI, which owns its
process, turns the allocator setting on and says so."""

import json
import subprocess
import sys

import pytest

PROBE = r"""
import atexit, faulthandler, json, os, signal, sys, threading

import trl_sdft.trainer as trainer_module
import trl_sdft.utils as utils

calls = []
real = utils.reuse_freed_cpu_memory
trainer_module.reuse_freed_cpu_memory = lambda: calls.append("mallopt") or real()

from datasets import Dataset
from transformers import Trainer, TrainingArguments

from trl_sdft import SDFTConfig, SDFTTrainer
from trl_sdft.testing import build_model, build_tokenizer, facts_rows


def snapshot():
    handlers = {}
    for number in signal.valid_signals():
        try:
            handlers[int(number)] = repr(signal.getsignal(number))
        except (ValueError, OSError):
            pass
    return {
        "environ": dict(os.environ),
        "signals": handlers,
        "atexit": atexit._ncallbacks(),
        "faulthandler": faulthandler.is_enabled(),
        "excepthook": repr(sys.excepthook),
        "threading_excepthook": repr(threading.excepthook),
    }


output_dir = sys.argv[1]
tokenizer = build_tokenizer()
# What transformers' own Trainer does to a process is not ours: let it do it first.
Trainer(model=build_model(tokenizer), args=TrainingArguments(output_dir + "/hf", use_cpu=True, report_to="none"))
before = snapshot()
args = SDFTConfig(
    output_dir=output_dir + "/sdft", per_device_train_batch_size=4, num_generations=2, max_completion_length=8,
    max_steps=2, save_strategy="no", report_to="none", bf16=False, use_cpu=True, distillation_topk=5,
    disable_tqdm=True,
)
trainer = SDFTTrainer(build_model(tokenizer), args=args, train_dataset=Dataset.from_list(facts_rows()),
                      processing_class=tokenizer)
trainer.train()
after = snapshot()
changed = {key: [before[key], after[key]] for key in before if before[key] != after[key]}
if before["environ"] != after["environ"]:
    keys = set(before["environ"]) | set(after["environ"])
    changed["environ"] = {k: [before["environ"].get(k), after["environ"].get(k)] for k in keys
                          if before["environ"].get(k) != after["environ"].get(k)}
print(json.dumps({"changed": changed, "malloc_calls": calls}))
"""


@pytest.mark.processes
def test_training_from_python_changes_nothing_process_wide(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1200,  # a hang guard
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["malloc_calls"] == []
    assert report["changed"] == {}


@pytest.mark.slow  # over 2 s alone on 2 cores: not in `make test-fast`
def test_the_cli_turns_the_allocator_setting_on_and_says_so(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import trl_sdft.trainer as trainer_module
    from trl_sdft import cli

    calls = []
    monkeypatch.setattr(trainer_module, "reuse_freed_cpu_memory", lambda: calls.append(1) or True)
    flags = [
        "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
        "--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "6",
        "--distillation_topk", "5", "--report_to", "none", "--use_cpu", "--num_facts", "4",
        "--knowledge_eval", "false",
    ]  # fmt: skip
    assert cli.main(flags) == 0
    assert calls == [1] and "keeps large freed CPU memory blocks for reuse" in capsys.readouterr().err
    calls.clear()
    assert cli.main([*flags, "--output_dir", str(tmp_path / "off"), "--reuse_cpu_memory", "false"]) == 0
    assert calls == [] and "keeps large freed" not in capsys.readouterr().err


def test_cpu_process_count_is_asked_for_before_it_is_guessed(monkeypatch, capsys):
    """`TRL_SDFT_CPU_PROCESSES` gives the number of CPU processes an `accelerate launch --cpu` wanted; the parent's
    command line is only the fallback, and an unknown number is said on stderr, not guessed."""
    from trl_sdft.cli import launch

    monkeypatch.setattr(launch, "_processes_from_parent_command_line", lambda: 3)
    assert launch.requested_cpu_processes({"TRL_SDFT_CPU_PROCESSES": "2"}) == 2
    assert launch.requested_cpu_processes({}) == 3
    with pytest.raises(ValueError, match="TRL_SDFT_CPU_PROCESSES='two'"):
        launch.requested_cpu_processes({"TRL_SDFT_CPU_PROCESSES": "two"})

    monkeypatch.setattr(launch, "_processes_from_parent_command_line", lambda: None)
    for name, value in {"ACCELERATE_USE_CPU": "true", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("TRL_SDFT_CPU_PROCESSES", raising=False)
    assert launch.relaunch_cpu_processes(["--help"]) is None
    assert "TRL_SDFT_CPU_PROCESSES=N" in capsys.readouterr().err


def test_a_cpu_launch_that_drops_a_sharded_engine_says_so(tmp_path):
    """`accelerate launch --cpu` with a DeepSpeed or FSDP config starts plain processes: one line says so."""
    from trl_sdft.cli.launch import dropped_engine

    config = tmp_path / "zero3.yaml"
    config.write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3\n")
    parent = ["python", "/venv/bin/accelerate", "launch", "--cpu", "--config_file", str(config), "scripts/sdft.py"]
    cpu = {"ACCELERATE_USE_CPU": "True"}
    warning = dropped_engine(cpu, parent)
    assert warning and f"DEEPSPEED in {config}" in warning and "without --cpu" in warning
    assert "--use_fsdp" in dropped_engine(
        cpu, ["accelerate", "launch", "--cpu", "--use_fsdp", "--config_file", "/none"]
    )
    assert dropped_engine({}, parent) is None  # no --cpu
    assert dropped_engine({**cpu, "ACCELERATE_USE_DEEPSPEED": "true"}, parent) is None  # the engine came through
    config.write_text("distributed_type: MULTI_CPU\n")
    assert dropped_engine(cpu, parent) is None
    assert dropped_engine(cpu, ["python", "-m", "torch.distributed.run", "--config_file", str(config)]) is None
