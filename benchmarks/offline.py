"""Offline pipeline cost on SmolLM2-135M: extraction throughput and Parquet size for K in {10, 100}, and the time of a
distillation step (SFT + top-100 KD) against plain SFT (TRL's SFTTrainer) on the same rows.

    python benchmarks/offline.py [--steps 10] [--out benchmarks/results/offline.json]
"""

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from trl_sdft.cli.offline import extract_parser, run_distillation, run_extraction  # noqa: E402
from trl_sdft.demo.default_model import resolve_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "trl_sdft", "resources", "offline", "chat.jsonl")


def extraction(tmp: str, k: int) -> dict:
    output = os.path.join(tmp, f"top{k}.parquet")
    args = extract_parser().parse_args(
        [
            "--data_file",
            DATA,
            "--output_file",
            output,
            "--filtered_data_file",
            os.path.join(tmp, "kept.jsonl"),
            "--topk",
            str(k),
            "--batch_size",
            "8",
        ]
    )
    started = time.time()
    summary = run_extraction(args, log=None)
    seconds = time.time() - started
    tokens = summary["assistant_tokens"]
    return {
        "topk": k,
        "records": summary["kept"],
        "assistant_tokens": tokens,
        "input_tokens": summary["input_tokens"],
        "seconds_whole_run": round(seconds, 2),
        "seconds_extracting": summary["extract_seconds"],
        "assistant_tokens_per_second": round(tokens / summary["extract_seconds"], 1),
        "input_tokens_per_second": round(summary["input_tokens"] / summary["extract_seconds"], 1),
        "parquet_bytes": os.path.getsize(output),
        "bytes_per_assistant_token": round(os.path.getsize(output) / tokens, 1),
        "rows": pq.read_metadata(output).num_rows,
    }


def train_runtime(trainer) -> float:
    """Seconds in the training loop (model loading and data preparation left out)."""
    return next(h["train_runtime"] for h in trainer.state.log_history if "train_runtime" in h)


def distill_step(tmp: str, steps: int) -> float:
    config = json.load(open(os.path.join(ROOT, "configs", "distill_config.json")))
    config["train"] = {
        "data_path": os.path.join(tmp, "kept.jsonl"),
        "teacher_logits": os.path.join(tmp, "top100.parquet"),
    }
    config["trainer"].update(max_steps=steps, logging_steps=steps, disable_tqdm=True)
    path = os.path.join(tmp, "distill.json")
    json.dump(config, open(path, "w"))
    trainer = run_distillation(path, os.path.join(tmp, "student"), log=None)
    return train_runtime(trainer) / steps


def sft_step(tmp: str, steps: int) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    config = json.load(open(os.path.join(ROOT, "configs", "distill_config.json")))
    records = [json.loads(line) for line in open(os.path.join(tmp, "kept.jsonl"))]
    rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in records]
    path = resolve_model(config["model_name"])
    trainer_args = {**config["trainer"], "max_steps": steps, "logging_steps": steps, "disable_tqdm": True}
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        args=SFTConfig(
            output_dir=os.path.join(tmp, "sft"),
            use_cpu=True,
            gradient_checkpointing=False,
            max_length=config["max_seq_length"],
            **trainer_args,
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(path),
    )
    trainer.train()
    return train_runtime(trainer) / steps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "offline.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        results = {"extraction": [extraction(tmp, k) for k in (10, 100)]}
        results["sft_seconds_per_step"] = round(sft_step(tmp, args.steps), 2)
        results["distill_seconds_per_step"] = round(distill_step(tmp, args.steps), 2)
    results["distill_over_sft"] = round(results["distill_seconds_per_step"] / results["sft_seconds_per_step"], 2)
    results["steps"] = args.steps
    results["threads"] = torch.get_num_threads()
    print(json.dumps(results, indent=1))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    json.dump(results, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
