"""Two-process DDP (gloo, CPU) training with multi-turn tool rollouts: run by tests/test_agentic.py via torchrun.

Usage: torchrun --nproc_per_node 2 tests/jobs/ddp_tools.py MODEL_DIR OUTPUT_DIR. A scripted backend makes rank 0's
rollouts call the tool twice and rank 1's answer at once, so the ranks need different numbers of continuations each
round; the loop keeps their backend calls in step (a collective in the backend would hang otherwise). Each rank writes
rank-<r>.json: its losses, its backend calls (prompt counts), the logged tool metrics and a parameter checksum.
"""

import faulthandler
import json
import os
import sys

import torch.distributed as dist
from datasets import Dataset

from trl_sdft import SDFTConfig, SDFTTrainer
from trl_sdft.cli.launch import close_process_group
from trl_sdft.rollouts import Rollouts, register_rollout_backend
from trl_sdft.testing import lookup, tool_call_text, tool_rows

END = "<|im_end|>"


class Scripted:
    """Rank 0: call, call, answer. Rank 1: answer. Every call is collective (an all-reduce), as vLLM's server is."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def generate(self, model, prompt_ids, num_generations, step):
        import torch

        self.calls.append(len(prompt_ids))
        dist.all_reduce(torch.zeros(1))  # a collective: both ranks must reach it the same number of times
        replies = []
        for ids in prompt_ids:
            seen = self.tokenizer.decode(ids).count("<tool_response>")
            calls = 2 if dist.get_rank() == 0 else 0
            text = tool_call_text("Zorbo") if seen < calls else "Zorbo is red."
            replies.append(self.tokenizer(text + END, add_special_tokens=False)["input_ids"])
        return Rollouts(replies)

    def close(self):
        pass

    def describe(self):
        return None


def main(model_dir: str, output_dir: str) -> None:
    faulthandler.dump_traceback_later(240, exit=True)  # a hang: every rank prints its stacks and ends
    backends = []
    register_rollout_backend("scripted", lambda context: backends.append(Scripted(context.tokenizer)) or backends[-1])
    args = SDFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=120,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        rollout_backend="scripted",
        distillation_topk=5,
    )
    trainer = SDFTTrainer(model_dir, args=args, train_dataset=Dataset.from_list(tool_rows(8)), tools=[lookup])
    trainer.train()
    rank = trainer.accelerator.process_index
    logged = [e for e in trainer.state.log_history if "loss" in e]
    with open(os.path.join(output_dir, f"rank-{rank}.json"), "w") as f:
        json.dump(
            {
                "world": trainer.accelerator.num_processes,
                "losses": [e["loss"] for e in logged],
                "calls": backends[0].calls,
                "call_frequency": [e["tools/call_frequency"] for e in logged],
                "checksum": sum(float(p.detach().double().sum()) for p in trainer.model.parameters()),
            },
            f,
        )
    close_process_group()  # gloo's teardown neither hangs nor aborts the exit
    faulthandler.dump_traceback_later(60, exit=True)  # what is left: freeing the trainer and the interpreter's exit


if __name__ == "__main__":
    main(*sys.argv[1:3])
