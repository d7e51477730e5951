"""SDFT step time with vLLM (colocate, server) versus transformers `generate`, on SmolLM2-135M-Instruct, in one run.

    python benchmarks/vllm_step.py [--steps 6] [--tokens 64] [--out benchmarks/results/vllm_step.json]

Each backend trains the same config (full fine-tuning, the live teacher, the default loss: `topk_logits` with k=100 and
alpha 0.5) with 8 rollouts per step forced to exactly `--tokens` tokens (`min_new_tokens` / `min_tokens`), so every
backend generates the same amount. `server+teacher` also scores the teacher on the server (`use_teacher_server`). The first step (warm-up, first sync) is not counted. Reported per backend: mean step time, mean time in
generation (sync included), mean weight-sync time. The server is a `trl-sdft vllm-serve` process on 127.0.0.1 started
and stopped here; it shares the machine's cores with the trainer, as colocated vLLM does.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

import requests
from bench_common import StepTimer, forced_length_fields, timed

from trl_sdft import SDFTConfig, SDFTTrainer
from trl_sdft.cli import vllm_serve_command
from trl_sdft.demo.default_model import smollm2_dir
from trl_sdft.demo.knowledge import facts_dataset, load_facts


def start_server(model_dir: str) -> tuple[subprocess.Popen, int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command, env = vllm_serve_command(["--model", model_dir, "--host", "127.0.0.1", "--port", str(port)])
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    for _ in range(300):
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process, port
        except requests.RequestException:
            time.sleep(1)
    os.killpg(process.pid, signal.SIGKILL)
    raise RuntimeError("the vLLM server did not start in 300 s")


def run(backend: str, model_dir: str, steps: int, tokens: int, port: int | None) -> dict:
    vllm = backend != "transformers"
    extra = {}
    if backend == "colocate":
        extra = dict(vllm_mode="colocate", vllm_gpu_memory_utilization=0.1, vllm_max_model_length=512)
    elif backend.startswith("server"):
        extra = dict(vllm_mode="server", vllm_server_host="127.0.0.1", vllm_server_port=port)
        extra["use_teacher_server"] = backend == "server+teacher"
    args = SDFTConfig(
        **forced_length_fields(
            f"/tmp/trl-sdft-bench-{backend.replace('+', '-')}",
            tokens,
            max_steps=steps + 1,
            teacher_model_kind="live",
            teacher_prompt_template="{prompt}\n\nExample answer: {privileged_context}",
            generation_kwargs={"min_tokens" if vllm else "min_new_tokens": tokens},
            use_vllm=vllm,
            **extra,
        )
    )
    timer = StepTimer()
    start = time.perf_counter()
    trainer = SDFTTrainer(model_dir, args=args, train_dataset=facts_dataset(load_facts(16)), callbacks=[timer])
    init_seconds = time.perf_counter() - start
    generation = []
    timed(trainer.rollout, "generate", generation)
    trainer.train()
    lengths = [entry["completions/mean_length"] for entry in trainer.state.log_history if "loss" in entry]
    syncs = trainer.rollout.generation.sync_seconds[2:] if vllm else []  # after the initial sync and the warm-up step
    result = {
        "backend": backend,
        "init_s": round(init_seconds, 1),
        "step_s": round(sum(timer.times[1:]) / steps, 2),
        "generation_s": round(sum(generation[1:]) / steps, 2),
        "sync_s": round(sum(syncs) / len(syncs), 2) if syncs else None,
        "mean_completion_tokens": sum(lengths[1:]) / steps,
    }
    print(json.dumps(result), flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/vllm_step.json")
    options = parser.parse_args()
    model_dir = str(smollm2_dir())
    results = [run("transformers", model_dir, options.steps, options.tokens, None)]
    server, port = start_server(model_dir)
    try:
        results.append(run("server", model_dir, options.steps, options.tokens, port))
        results.append(run("server+teacher", model_dir, options.steps, options.tokens, port))
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server, its engine and workers
        server.wait()
    results.append(run("colocate", model_dir, options.steps, options.tokens, None))
    base = results[0]["step_s"]
    for result in results:
        result["speedup_vs_transformers"] = round(base / result["step_s"], 2)
    os.makedirs(os.path.dirname(options.out), exist_ok=True)
    with open(options.out, "w") as f:
        json.dump(
            {"steps": options.steps, "tokens": options.tokens, "rollouts_per_step": 8, "results": results}, f, indent=2
        )
    print("| backend | step (s) | generation incl. sync (s) | weight sync (s) | speed-up |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['backend']} | {r['step_s']} | {r['generation_s']} | {r['sync_s'] or '-'} | "
            f"{r['speedup_vs_transformers']}x |"
        )


if __name__ == "__main__":
    sys.exit(main())
