"""Two-process DDP (gloo, CPU) training with the loss from hidden states: run by tests/test_chunked_loss.py via torchrun.

Usage: torchrun --nproc_per_node 2 tests/jobs/ddp_chunked_loss.py MODEL_DIR OUTPUT_DIR {liger|chunked}. Each rank writes
rank-<r>.json: its losses and a checksum of every parameter after training (DDP keeps the ranks identical only if the
lm_head gradients computed outside the model's forward are all-reduced too).
"""

import faulthandler
import json
import os
import sys

from datasets import Dataset

from trl_sdft import SDFTConfig, SDFTTrainer
from trl_sdft.cli.launch import close_process_group
from trl_sdft.testing import facts_rows


def main(model_dir: str, output_dir: str, path: str) -> None:
    faulthandler.dump_traceback_later(240, exit=True)  # a hang in training: every rank prints its stacks and ends
    extra = dict(use_liger_kernel=True) if path == "liger" else dict(loss_chunk_size=4)
    args = SDFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        max_steps=3,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,  # no `use_cpu`: two torchrun processes on a CPU train as one by default
        distillation_mode="full_logits",
        distillation_alpha=0.0,
        **extra,
    )
    trainer = SDFTTrainer(model_dir, args=args, train_dataset=Dataset.from_list(facts_rows(8)))
    trainer.train()
    rank = trainer.accelerator.process_index
    checksums = {name: float(p.detach().double().sum()) for name, p in trainer.model.named_parameters()}
    with open(os.path.join(output_dir, f"rank-{rank}.json"), "w") as f:
        json.dump(
            {
                "world": trainer.accelerator.num_processes,
                "checksums": checksums,
                "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            },
            f,
        )
    close_process_group()  # gloo's teardown neither hangs nor aborts the exit (its own watchdogs re-arm faulthandler)
    faulthandler.dump_traceback_later(60, exit=True)  # what is left: freeing the trainer and the interpreter's exit


if __name__ == "__main__":
    main(*sys.argv[1:4])
