"""Multi-turn rollouts with tools on colocated vLLM, in its own process (vLLM keeps process-wide state): run by
tests/test_vllm_tools.py.

Usage: python tests/jobs/vllm_tools.py MODEL_DIR OUTPUT_DIR. Prints one JSON line: losses, tool metrics, a decoded
trajectory with its tool-result part, and the engine importance ratios (the engine's log-probs of the generated
tokens against the trainer's, tool results masked).
"""

import json
import sys

from datasets import Dataset

from trl_sdft import SDFTConfig, SDFTTrainer
from trl_sdft.testing import lookup, tool_rows


def main(model_dir: str, output_dir: str) -> None:
    args = SDFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=64,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_vllm=True,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.05,
        vllm_max_model_length=256,
        temperature=0.5,
        use_cpu=True,
        bf16=False,
    )
    trainer = SDFTTrainer(model_dir, args=args, train_dataset=Dataset.from_list(tool_rows()), tools=[lookup])
    batch = trainer.build_batch(tool_rows()[:2])
    tokenizer = trainer.processing_class
    ids, mask, tools = batch["completion_ids"][0], batch["completion_mask"][0], batch["tool_mask"][0]
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    result = {
        "losses": [entry["loss"] for entry in logged],
        "calls": [entry["tools/call_frequency"] for entry in logged],
        "trajectory": tokenizer.decode(ids[mask.bool()]),
        "tool_part": tokenizer.decode(ids[(mask * (1 - tools)).bool()]),
        "importance_ratios": [entry.get("self_distillation/vllm_importance_ratio") for entry in logged],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
