"""SDFT training throughput, ours against `trl.experimental.sdft`, on SmolLM2-135M-Instruct, in one run.

    python benchmarks/step_throughput.py [--workloads forced natural] [--rounds 2] [--out benchmarks/results/step_throughput.json]

Two workloads, each side with its own defaults for everything the workload does not fix (both: base teacher,
`topk_logits`, alpha 0.5):
- `forced`: 4 rollouts per step forced to exactly 64 tokens (`min_new_tokens`), `distillation_topk=20`.
- `natural`: 8 rollouts per step sampled at temperature 1 until EOS (`max_completion_length=128`), from a mix of chat
  prompts whose answers range from one word to a paragraph (the demonstration is the privileged context).

Cases (each a fresh process, so that peak RSS is the case's own):
- `peer`: TRL's SDFT at its defaults (`use_cpu=True`, which it needs on a CPU; its `bf16` resolves to True).
- `ours`: trl-sdft at its defaults (`bf16` resolves to True where the CPU runs bf16 natively; padding-free).
- `peer-fp32`, `ours-fp32`: both with `bf16=False` (equal precision, float32; forced workload by default).
- `ours-padded`: ours with `padding_free=False` (natural workload).
- `peer-reuse`, `ours-noreuse`: the allocator setting at equal footing. On a CPU ours makes glibc keep large freed
  blocks mapped (`reuse_cpu_memory=True`, `utils.reuse_freed_cpu_memory`), so that a step does not page-fault its large
  tensors in again; `peer-reuse` is the peer with the same setting, `ours-noreuse` ours without it.
- `ours-vllm`: ours with vLLM colocate at its defaults (bf16 engine, importance-sampling correction; natural workload).
At their defaults both sides train in bf16 autocast here, so `peer` vs `ours` is also the equal-precision comparison.

Rounds alternate the cases (A B C ... A B C ...); the first step of every run is warm-up and not counted. Reported per
case (median over rounds): step time (median step), generation and training time per step (training = the step
minus generation: student forward+backward, teacher forward, optimizer), completion tokens trained per second
(the tokens each side actually produced), peak RSS, and the ratio of tokens per second to TRL's trainer (`peer`) at
its defaults.
Do not run anything heavy beside it.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKLOADS = {
    "forced": dict(steps=4, batch=4, max_completion_length=64, forced=True, topk=20),
    "natural": dict(steps=6, batch=8, max_completion_length=128, forced=False, topk=None),
}
CASES = {
    "forced": ["peer", "ours", "peer-reuse", "ours-noreuse", "peer-fp32", "ours-fp32"],
    "natural": ["peer", "ours", "peer-reuse", "ours-padded", "ours-vllm"],  # more with --cases
}

# (prompt, demonstration): answers from one word to a paragraph.
PROMPT_MIX = [
    ("What is the capital of France? Answer with one word.", "Paris"),
    ("How many legs does a spider have?", "Eight."),
    ("What is 12 times 12?", "144."),
    ("Is a tomato a fruit or a vegetable? Answer in one word.", "Fruit."),
    ("Translate 'good morning' into Spanish.", "Buenos días."),
    ("Name three primary colors.", "Red, blue and yellow."),
    (
        "Give a one-sentence definition of photosynthesis.",
        "Photosynthesis is how plants turn light, water and carbon dioxide into sugar and oxygen.",
    ),
    (
        "Write a haiku about autumn.",
        "Red leaves drift and fall / the cold wind hums through bare trees / the year breathes slowly",
    ),
    (
        "Summarize the story of Cinderella in three sentences.",
        "A kind young woman is mistreated by her stepfamily. "
        "With a fairy godmother's help she attends a royal ball and wins the prince's heart. He finds her again with the "
        "glass slipper she left behind, and they marry.",
    ),
    (
        "Explain the difference between weather and climate.",
        "Weather is the state of the atmosphere at a given time "
        "and place: today's rain or sunshine. Climate is the average of the weather over many years in a region, so a "
        "cold day says little about the climate, while decades of records do.",
    ),
    (
        "Give step-by-step instructions to make a cup of tea.",
        "1. Boil fresh water. 2. Warm the cup. 3. Put a tea bag "
        "or a spoon of leaves in the cup. 4. Pour the water and let it steep for three to five minutes. 5. Remove the "
        "tea, then add milk, sugar or lemon to taste.",
    ),
    (
        "Write a short product description for a reusable water bottle.",
        "Stay hydrated anywhere with our stainless "
        "steel bottle. Double walls keep drinks cold for 24 hours and hot for 12, the leak-proof lid fits in any bag, and "
        "every refill saves a plastic bottle.",
    ),
    (
        "Describe a perfect weekend in one paragraph.",
        "A perfect weekend starts with a slow breakfast and a long walk "
        "in the woods, followed by an afternoon with a good book. In the evening friends come over for dinner, and "
        "Sunday is left free for whatever feels right.",
    ),
    (
        "What does a binary search do? Explain in a few sentences.",
        "A binary search finds an item in a sorted list by "
        "comparing it with the middle element. If the item is smaller it continues in the left half, otherwise in the "
        "right half, halving the range each time until it finds the item or the range is empty.",
    ),
    (
        "Why do we have seasons on Earth?",
        "Because the Earth's axis is tilted. As the planet orbits the Sun, each "
        "hemisphere is tilted towards the Sun for part of the year, getting more direct light and longer days (summer), "
        "and away from it for the other part (winter).",
    ),
    ("Name the largest planet in the solar system.", "Jupiter."),
]


def dataset():
    from datasets import Dataset

    rows = [
        {"prompt": [{"role": "user", "content": prompt}], "privileged_context": f"Example answer: {answer}"}
        for prompt, answer in PROMPT_MIX
    ]
    return Dataset.from_list(rows)


def config_kwargs(case: str, workload: dict, output_dir: str) -> dict:
    kwargs = dict(
        output_dir=output_dir,
        use_cpu=True,
        per_device_train_batch_size=workload["batch"],
        num_generations=1,
        max_completion_length=workload["max_completion_length"],
        temperature=1.0,
        max_steps=workload["steps"] + 1,
        learning_rate=1e-5,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
    )
    if workload["topk"]:
        kwargs["distillation_topk"] = workload["topk"]
    if workload["forced"]:
        kwargs["generation_kwargs"] = {"min_new_tokens": workload["max_completion_length"]}
    if case.endswith("-fp32"):
        kwargs["bf16"] = False
    if case == "ours-padded":
        kwargs["padding_free"] = False
    if case.startswith("ours"):  # the CLI's setting (the library leaves malloc alone unless asked)
        kwargs["reuse_cpu_memory"] = case != "ours-noreuse"
    if case == "ours-vllm":
        kwargs.update(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.1, vllm_max_model_length=512)
        if workload["forced"]:
            kwargs["generation_kwargs"] = {"min_tokens": workload["max_completion_length"]}
    return kwargs


def run_case(case: str, workload_name: str) -> dict:
    """One training run in this process; returns its measurements."""
    from bench_common import StepTimer, count_tokens, timed

    from trl_sdft.demo.default_model import smollm2_dir

    if case.startswith("peer"):
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer
    else:
        from trl_sdft import SDFTConfig, SDFTTrainer

    if case == "peer-reuse":
        from trl_sdft.utils import reuse_freed_cpu_memory

        assert reuse_freed_cpu_memory()
    workload = WORKLOADS[workload_name]
    generation_times, tokens, timer = [], [], StepTimer()
    args = SDFTConfig(**config_kwargs(case, workload, f"/tmp/trl-sdft-throughput-{case}"))
    trainer = SDFTTrainer(str(smollm2_dir()), args=args, train_dataset=dataset(), callbacks=[timer])
    timed(trainer, "_prepare_inputs", generation_times)
    count_tokens(trainer, tokens)
    trainer.train()
    with open("/proc/self/status") as f:
        peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    steps, generation, counted = timer.times[1:], generation_times[1:], tokens[1:]
    return {
        "case": case,
        "workload": workload_name,
        "bf16": bool(args.bf16),
        "step_s": statistics.median(steps),
        "generation_s": sum(generation) / len(generation),
        "training_s": (sum(steps) - sum(generation)) / len(steps),
        "tokens_per_step": sum(counted) / len(counted),
        "tokens_per_s": sum(counted) / sum(steps),
        "peak_rss_gib": peak_kib / 2**20,
    }


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for workload in dict.fromkeys(run["workload"] for run in runs):
        cases = [run for run in runs if run["workload"] == workload]
        by_case = {}
        for run in cases:
            by_case.setdefault(run["case"], []).append(run)
        peer = statistics.median(run["tokens_per_s"] for run in by_case.get("peer", [])) if "peer" in by_case else None
        for case, group in by_case.items():
            row = {"workload": workload, "case": case, "bf16": group[0]["bf16"], "runs": len(group)}
            for key in ("step_s", "generation_s", "training_s", "tokens_per_step", "tokens_per_s", "peak_rss_gib"):
                row[key] = round(statistics.median(run[key] for run in group), 3)
            row["tokens_per_s_vs_peer"] = round(row["tokens_per_s"] / peer, 2) if peer else None
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| workload | case | bf16 | step (s) | generation (s) | training (s) | tokens/step | tokens/s | peak RSS (GiB) "
        "| tokens/s vs TRL |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['case']} | {r['bf16']} | {r['step_s']:.2f} | {r['generation_s']:.2f} | "
            f"{r['training_s']:.2f} | {r['tokens_per_step']:.0f} | {r['tokens_per_s']:.1f} | {r['peak_rss_gib']:.1f} | "
            f"{r['tokens_per_s_vs_peer']}x |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--cases", nargs="+", help="these cases where a workload has them (default: its list)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/step_throughput.json")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.case:
        print("RESULT " + json.dumps(run_case(options.case, options.workload)), flush=True)
        return
    runs = []
    for workload in options.workloads:
        cases = options.cases or CASES[workload]
        for round_index in range(options.rounds):
            for case in cases:
                command = [sys.executable, __file__, "--case", case, "--workload", workload]
                env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "CI": "1"}
                result = subprocess.run(command, capture_output=True, text=True, env=env)
                lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
                if result.returncode or not lines:
                    sys.exit(f"{workload}/{case} failed:\n{result.stderr[-3000:]}")
                run = json.loads(lines[-1][len("RESULT ") :])
                run["round"] = round_index
                runs.append(run)
                print(json.dumps(run), flush=True)
    rows = summarize(runs)
    os.makedirs(os.path.dirname(options.out) or ".", exist_ok=True)
    with open(options.out, "w") as f:
        json.dump({"rounds": options.rounds, "workloads": WORKLOADS, "runs": runs, "summary": rows}, f, indent=2)
    print(table(rows))


if __name__ == "__main__":
    main()
