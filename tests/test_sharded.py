"""Sharded training on CPU: DeepSpeed ZeRO-3 and FSDP2, two processes over gloo, launched with `accelerate launch` as a
user would (tests/jobs/sharded/: the job, the accelerate configs, FSDP's CPU patch).

Each run trains at the library's defaults (the chunked loss from hidden states, padding-free forwards, no
`ddp_backend`) with a moving teacher, checkpoints, resumes, and checks the resumed teacher against the saved one. The
first use of DeepSpeed compiles a communication op (about 2.5 minutes, cached in torch's extensions directory).
"""

import json
import math
import os
import socket
import sys
from importlib.util import find_spec

import pytest
from helpers import ENGINES, SHARDED_TIMEOUT, launch, run_job

pytestmark = [pytest.mark.processes]


def initial_sums(model_dir: str) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return {name: float(p.detach().double().sum()) for name, p in model.named_parameters()}


@pytest.mark.parametrize("teacher", ["ema", "lora"])
@pytest.mark.parametrize("engine", ENGINES)
def test_sharded_training_saves_and_resumes_the_teacher_whole(engine, teacher, tiny_model_dir, tmp_path):
    from safetensors import safe_open

    from trl_sdft.checkpoints import TEACHER_STATE_FILE, checkpoint_problem
    from trl_sdft.chunked_loss import DEFAULT_LOSS_CHUNK_SIZE

    trained = launch(engine, tiny_model_dir, tmp_path, teacher, "train")
    assert trained["world"] == 2
    assert trained["distributed_type"] == ("DistributedType.DEEPSPEED" if engine == "zero3" else "DistributedType.FSDP")
    # The defaults: the loss from hidden states (the LM head read outside the forward) and packed forwards.
    assert trained["loss_chunk_size"] == DEFAULT_LOSS_CHUNK_SIZE and trained["padding_free"]
    assert len(trained["losses"]) == 2 and all(math.isfinite(loss) for loss in trained["losses"])
    assert trained["end"] != trained["begin"]  # the teacher moved

    checkpoint = tmp_path / "checkpoint-2"
    assert checkpoint_problem(str(checkpoint), needs_teacher_state=True) is None
    with safe_open(checkpoint / TEACHER_STATE_FILE, "pt") as f:  # every teacher weight, whole
        saved = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    assert set(saved) == set(trained["end"])
    assert all(math.prod(shape) == trained["end"][name][2] for name, shape in saved.items())

    resumed = launch(engine, tiny_model_dir, tmp_path, teacher, "resume")
    assert resumed["begin"] == trained["end"]  # the resumed teacher is the saved one, exactly
    assert resumed["losses"][:2] == trained["losses"] and len(resumed["losses"]) == 3
    if teacher == "ema":  # the student trained, its LM head included (its gradient comes from outside the forward)
        start = initial_sums(tiny_model_dir)
        assert trained["student"]["lm_head.weight"] != pytest.approx(start["lm_head.weight"], abs=1e-6)
    elif engine == "zero3":  # the `teacher/` adapter (PEFT saves every adapter) holds the teacher, not the student
        from safetensors.torch import load_file

        written = load_file(checkpoint / "teacher" / "adapter_model.safetensors")
        ema = {
            name.replace(".teacher.", "."): value for name, value in load_file(checkpoint / TEACHER_STATE_FILE).items()
        }
        assert set(written) == set(ema)
        assert all(float((written[name] - ema[name]).abs().max()) == 0 for name in written)


@pytest.mark.parametrize("path", ["chunked", "liger"])
@pytest.mark.parametrize("engine", ENGINES)
def test_sharded_losses_from_hidden_states_train_like_the_logits_path(engine, path, tiny_model_dir, tmp_path):
    """The same two steps on a loss path that reads the LM heads outside the forward (the default chunked loss;
    Liger's fused JSD) and on the logits path (which reads no weight outside a forward) end with the same student
    weights: the gathered heads give the same loss and gradients."""
    common = {"save_strategy": "no"}
    if path == "liger":  # full_logits (Liger's mode), rollouts from the teacher prompt
        common.update(distillation_mode="full_logits", generate_from_teacher=True)
    fused = launch(
        engine, tiny_model_dir, tmp_path / path, "ema", "train", {**common, "use_liger_kernel": path == "liger"}
    )
    logits = launch(engine, tiny_model_dir, tmp_path / "logits", "ema", "train", {**common, "loss_chunk_size": 0})
    assert fused["loss_chunk_size"] > 0 and logits["loss_chunk_size"] == 0
    assert fused["losses"] == pytest.approx(logits["losses"], rel=1e-4)
    assert set(fused["student"]) == set(logits["student"])
    start = initial_sums(tiny_model_dir)
    assert fused["student"]["lm_head.weight"] != pytest.approx(start["lm_head.weight"], abs=1e-6)
    if path == "liger":  # Liger's kernel rounds differently; Adam's first steps magnify that in tiny gradients
        return
    for name, value in fused["student"].items():
        assert value == pytest.approx(logits["student"][name], rel=1e-4, abs=1e-5), name


@pytest.mark.skipif(find_spec("deepspeed") is None, reason="needs deepspeed")
def test_zero3_stops_a_nonfinite_loss_before_the_engine_steps(tiny_model_dir, tmp_path):
    """DeepSpeed applies the update inside backward: a NaN loss is caught before backward, so no weight takes it."""
    stopped = launch("zero3", tiny_model_dir, tmp_path, "ema", "nan", {"save_strategy": "no"})
    assert stopped["error"] and "non-finite loss" in stopped["error"]
    assert "stopped before the update" in stopped["error"]
    assert all(math.isfinite(value) for value in stopped["student"].values())


@pytest.mark.skipif(find_spec("deepspeed") is None, reason="needs deepspeed")
def test_cli_under_zero3_with_the_shipped_config(tiny_model_dir, tmp_path):
    """`accelerate launch --config_file configs/accelerate/zero3.yaml --num_processes 2 scripts/sdft.py ...` as a CPU
    user types it (the config's bf16 mixed precision followed, gloo chosen), then resumed with
    `--resume_from_checkpoint true`: complete checkpoints, the teacher whole, the final model saved whole."""
    from datasets import Dataset
    from safetensors.torch import load_file

    from trl_sdft.checkpoints import checkpoint_problem
    from trl_sdft.testing import facts_rows

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = tmp_path / "rows.jsonl"
    Dataset.from_list(facts_rows(8)).to_json(data)
    out = tmp_path / "out"
    config = os.path.join(root, "configs", "accelerate", "zero3.yaml")
    for steps, resume in (("2", []), ("3", ["--resume_from_checkpoint", "true"])):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2"]
        command += [
            "--main_process_port",
            str(port),
            os.path.join(root, "scripts", "sdft.py"),
            "--dataset_path",
            str(data),
        ]
        command += ["--model_name_or_path", tiny_model_dir, "--output_dir", str(out), "--max_steps", steps]
        command += ["--per_device_train_batch_size", "2", "--num_generations", "2", "--max_completion_length", "6"]
        command += [
            "--teacher_model_kind",
            "ema",
            "--save_strategy",
            "steps",
            "--save_steps",
            "2",
            "--report_to",
            "none",
        ]
        command += ["--logging_steps", "1", *resume]
        run_job(command, tmp_path, [out / "model.safetensors"], timeout=SHARDED_TIMEOUT, cwd=root)
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and len([e for e in state["log_history"] if "loss" in e]) == 3
    for step in (2, 3):
        assert checkpoint_problem(str(out / f"checkpoint-{step}"), needs_teacher_state=True) is None
    start = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    for path in (out / "model.safetensors", out / "checkpoint-3" / "sdft_teacher.safetensors"):
        saved = load_file(path)
        assert {name: tuple(t.shape) for name, t in saved.items()} == {n: tuple(t.shape) for n, t in start.items()}


@pytest.mark.skipif(find_spec("deepspeed") is None, reason="needs deepspeed")
@pytest.mark.parametrize("teacher", ["ema", "lora"])
def test_zero3_teacher_moves_the_same_when_deepspeed_keeps_weights_whole(teacher, tiny_model_dir, tmp_path):
    """Small weights stay whole under ZeRO-3 (below `stage3_param_persistence_threshold`, the default for norms and
    LoRA matrices) and are restored from their partitions after every step: the EMA must move the partitions, or each
    step's update is lost. The teacher after two steps is the same as with every weight partitioned."""
    partitioned = launch("zero3", tiny_model_dir, tmp_path / "partitioned", teacher, "train", {"save_strategy": "no"})
    whole = launch("zero3_persistent", tiny_model_dir, tmp_path / "whole", teacher, "train", {"save_strategy": "no"})
    assert whole["losses"] == pytest.approx(partitioned["losses"], rel=1e-5)
    assert whole["end"] != whole["begin"]
    for name, (total, squares, _) in partitioned["end"].items():
        assert whole["end"][name][:2] == pytest.approx([total, squares], rel=1e-5, abs=1e-7), name


@pytest.mark.parametrize("engine", ENGINES)
def test_sharded_run_with_every_token_skipped_takes_the_full_path(engine, tiny_model_dir, tmp_path):
    """A process whose batch has no token in the loss (all skipped, or ended at once) gives a zero loss, but still
    runs the teacher's forward and the loss: they are collectives under the engines, so the other process would wait
    for it forever."""
    record = launch(engine, tiny_model_dir, tmp_path, "ema", "skip", {"save_strategy": "no"})
    assert len(record["losses"]) == 2 and all(math.isfinite(loss) and loss > 0 for loss in record["losses"])
