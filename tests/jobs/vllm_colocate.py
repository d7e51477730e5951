"""Colocated vLLM training in its own process (vLLM keeps process-wide state): run by tests/test_vllm.py.

Usage: python tests/jobs/vllm_colocate.py MODEL_DIR OUTPUT_DIR [--gpu]. Prints one JSON line: losses, the vLLM-vs-trainer
log-prob differences before and after the last sync, and the weight-sync method.
"""

import json
import sys

from datasets import Dataset

from trl_sdft import SDFTConfig, SDFTTrainer
from trl_sdft.testing import facts_rows


def main(model_dir: str, output_dir: str, gpu: bool = False) -> None:
    precision = dict(use_cpu=False, bf16=None) if gpu else dict(use_cpu=True, bf16=False)
    args = SDFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        max_steps=3,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_vllm=True,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.05,
        vllm_max_model_length=256,
        # CPU: float32 trainer and engine, whose log-probs agree within 1e-5 after a sync. GPU: bf16 on both sides.
        **precision,
    )
    trainer = SDFTTrainer(model_dir, args=args, train_dataset=Dataset.from_list(facts_rows()))
    initial_gap = trainer.rollout.probe_gap
    trainer.train()
    stale = trainer.rollout.logprob_differences()  # vLLM still holds the weights of the last generation round
    trainer.rollout.sync(trainer.state.global_step)
    synced = trainer.rollout.logprob_differences()
    result = {
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "initial_gap": initial_gap,
        "stale_max": max(stale),
        "synced_max": max(synced),
        "sync_method": trainer.rollout.generation.sync_method,
        "rounds": trainer.num_generation_rounds,
        "importance_ratios": [
            entry["self_distillation/vllm_importance_ratio"]
            for entry in trainer.state.log_history
            if "self_distillation/vllm_importance_ratio" in entry
        ],
        "engine_dtype": str(trainer.rollout.generation.dtype),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3], gpu="--gpu" in sys.argv)
