"""Whole SDFT training steps on SmolLM2-135M-Instruct with the logits path and with the chunked loss: peak RSS, step time.

    python benchmarks/train_step_memory.py [--tokens 256] [--steps 2] [--mode full_logits]

Each configuration runs in its own process: full fine-tuning, base teacher, 8 rollouts of exactly `--tokens` tokens
per step (`min_new_tokens`), AdamW. Reported: the process's peak RSS (VmHWM) over the whole run (model, teacher copy,
optimizer state included, so the difference between rows is what the loss path costs) and the mean step time after the
first step. Both run with MALLOC_MMAP_THRESHOLD_=65536, as the memory runs of loss_memory.py (glibc would otherwise
keep freed blocks and overstate the peak); times are therefore comparable between rows only.
"""

import argparse
import json
import os
import subprocess
import sys


def run(chunk: int | None, tokens: int, steps: int, mode: str) -> dict:
    from bench_common import StepTimer, forced_length_fields

    from trl_sdft import SDFTConfig, SDFTTrainer
    from trl_sdft.demo.default_model import smollm2_dir
    from trl_sdft.demo.knowledge import facts_dataset, load_facts

    args = SDFTConfig(
        **forced_length_fields(
            "/tmp/trl-sdft-bench-step",
            tokens,
            max_steps=steps,
            distillation_mode=mode,
            distillation_alpha=0.0 if mode == "full_logits" else 0.5,
            loss_chunk_size=chunk,
        )
    )
    timer = StepTimer()
    trainer = SDFTTrainer(str(smollm2_dir()), args=args, train_dataset=facts_dataset(load_facts(16)), callbacks=[timer])
    trainer.train()
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    later = timer.times[1:] or timer.times
    return {
        "loss_path": "logits" if chunk == 0 else f"chunked ({trainer.loss_chunk_size})",
        "mode": mode,
        "tokens": tokens,
        "peak_rss_mib": round(peak / 1024),
        "step_s": round(sum(later) / len(later), 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--mode", default="full_logits")
    parser.add_argument("--out", default="benchmarks/results/train_step_memory.json")
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.case is not None:
        chunk = None if options.case < 0 else options.case  # -1: the default (None)
        print(json.dumps(run(chunk, options.tokens, options.steps, options.mode)))
        return
    results = []
    for chunk in (0, None):
        command = [sys.executable, __file__, "--tokens", str(options.tokens), "--steps", str(options.steps)]
        command += ["--mode", options.mode, "--case", "0" if chunk == 0 else "-1"]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    os.makedirs(os.path.dirname(options.out), exist_ok=True)
    with open(options.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
