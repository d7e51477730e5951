"""Two-process sharded training (ZeRO-3 or FSDP2, CPU, gloo) with a moving teacher: run by tests/test_sharded.py.

Usage: accelerate launch --config_file {zero3,fsdp2}.yaml train.py MODEL_DIR OUTPUT_DIR {ema,lora} PHASE
PHASE `train` trains 2 steps at the library's defaults (loss path, padding-free forwards) and saves checkpoint-2;
`resume` resumes from it and trains step 3; `nan` trains with a loss made NaN at step 2; `skip` with
every token of rank 1's batches masked out; `vllm` trains 2 steps with a
vLLM server (SHARDED_TEST_CONFIG names it), then syncs and records vLLM's largest log-prob gap to the trainer model; `bench` trains 6 steps
(benchmarks/sharded_step.py). Under plain `torchrun` (no engine) it trains with DDP. Rank 0 writes PHASE.json: the
teacher's fingerprint (per weight, the sum and the sum of squares of the full, gathered tensor) when training starts
and ends, the student's (the sum of each weight) at the end, the losses, and the error a `nan` run stopped with.
"""

import faulthandler
import json
import os
import resource
import sys
import time

import torch
from datasets import Dataset
from transformers import TrainerCallback

from trl_sdft import SDFTConfig, SDFTTrainer
from trl_sdft.cli.launch import close_process_group
from trl_sdft.testing import facts_rows


def full(param):
    """The whole tensor of a parameter, gathered with the engine's own API (a collective under both engines)."""
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.data.detach().double().clone()
    if hasattr(param, "full_tensor"):
        return param.full_tensor().detach().double()
    return param.detach().double()


def fingerprint(trainer) -> dict[str, list[float]]:
    teacher = trainer.teacher
    if hasattr(teacher, "model"):  # a full copy
        named = list(teacher.model.named_parameters())
    else:  # the `teacher` LoRA adapter inside the student
        named = [(n, p) for n, p in trainer.model.named_parameters() if ".teacher." in n]
    assert named, "no teacher weights found"
    out = {}
    for name, param in named:
        value = full(param)
        out[name.removeprefix("module.")] = [float(value.sum()), float((value * value).sum()), value.numel()]
    return out


class Fingerprints(TrainerCallback):
    def __init__(self):
        self.trainer, self.seen, self.step_seconds, self.started = None, {}, [], None

    def on_train_begin(self, args, state, control, **kwargs):
        self.seen["begin"] = fingerprint(self.trainer)

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds.append(time.perf_counter() - self.started)

    def on_train_end(self, args, state, control, **kwargs):
        self.seen["end"] = fingerprint(self.trainer)


class NaNAtStep2(SDFTTrainer):
    def _distillation_loss(self, model, inputs):  # what the loss function returned, before any check sees it
        loss = super()._distillation_loss(model, inputs)
        return loss * float("nan") if self.state.global_step == 1 else loss


class EmptyOnRank1(SDFTTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.accelerator.process_index == 1:  # every token of this process's batch outside the loss
            inputs = {**inputs, "completion_mask": torch.zeros_like(inputs["completion_mask"])}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def main(model_dir: str, output_dir: str, teacher: str, phase: str) -> None:
    faulthandler.dump_traceback_later(400, exit=True)  # a hang: every rank prints its stacks and ends
    peft_config = None
    if teacher == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    settings = dict(
        output_dir=output_dir,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=6,
        max_steps={"resume": 3, "bench": 6}.get(phase, 2),
        learning_rate=5e-2,
        logging_steps=1,
        save_steps=2,
        save_strategy="steps",
        report_to="none",
        bf16=False,
        use_cpu=False,
        seed=0,
        teacher_model_kind="ema",
        teacher_update_rate=0.5,
        disable_tqdm=True,
    )
    args = SDFTConfig(**{**settings, **json.loads(os.environ.get("SHARDED_TEST_CONFIG", "{}"))})
    callback = Fingerprints()
    trainer = {"nan": NaNAtStep2, "skip": EmptyOnRank1}.get(phase, SDFTTrainer)(
        model_dir,
        args=args,
        train_dataset=Dataset.from_list(facts_rows(8)),
        peft_config=peft_config,
        callbacks=[callback],
    )
    callback.trainer = trainer
    error = None
    try:
        trainer.train(resume_from_checkpoint=os.path.join(output_dir, "checkpoint-2") if phase == "resume" else None)
    except ValueError as err:  # NonFiniteTrainingError
        if phase != "nan":
            raise
        error = str(err)
    peak = trainer.accelerator.gather_for_metrics([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024])
    if trainer.accelerator.is_main_process:
        record = {
            "step_seconds": callback.step_seconds,
            "peak_rss_mib_per_rank": peak,
            **callback.seen,
            "world": trainer.accelerator.num_processes,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "loss_chunk_size": trainer.loss_chunk_size,
            "padding_free": trainer.padding_free,
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            "error": error,
        }
    if phase == "vllm":  # the weights pushed again, then vLLM's log-probs against the trainer model's
        stale = max(trainer.rollout.logprob_differences())  # the server holds the weights before the last update
        trainer.rollout.sync(step=-2)
        synced = max(trainer.rollout.logprob_differences())
        if trainer.accelerator.is_main_process:
            record.update(stale_gap=stale, server_gap=synced)
    student = {name: float(full(p).sum()) for name, p in trainer.model.named_parameters()}  # every rank gathers
    if trainer.accelerator.is_main_process:
        record["student"] = student
        with open(os.path.join(output_dir, f"{phase}.json"), "w") as f:
            json.dump(record, f)
    del trainer, callback  # a colocated vLLM engine shuts down (its own process groups too) before ours are destroyed
    close_process_group()
    faulthandler.dump_traceback_later(60, exit=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:5])
