"""Synchronous vs asynchronous rounds (`async_rollouts`) on this machine as a two-device node, in one run.

    python benchmarks/async_rollouts.py [--rounds 2] [--steps 6] [--skip-learning] \
        [--out benchmarks/results/async_rollouts.json]

The vLLM server (`trl-sdft vllm-serve`, SmolLM2-135M-Instruct) is pinned to core 0 and the trainer to core 1
(`taskset`, one thread each), as a generation device and a training device would be. Two parts:

- throughput: the natural-length workload of `step_throughput.py` (8 rollouts per step sampled at temperature 1
  until EOS, `max_completion_length` 128, the same prompt mix), each side at the trainer's defaults; `sync` and
  `async` alternate (A B A B), each run a fresh trainer process against the same server; the first step of a run is
  warm-up. Reported: median step time, time the trainer waited for the server per step, completion tokens trained per
  second, and the async / sync ratio.
- learning: `configs/demo.yaml` (8 made-up facts) trained through the server in both modes with the CLI; the facts,
  paraphrases and probes answered after training (`results.json`), so that a speed-up is not bought with learning.

Do not run anything heavy beside it.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

SERVER_CORE, TRAINER_CORE = "0", "1"


def start_server(model_dir: str, log_path: str):
    import socket

    import requests

    from trl_sdft.cli import vllm_serve_command

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command, env = vllm_serve_command(["--model", model_dir, "--host", "127.0.0.1", "--port", str(port)])
    env = {**env, "VLLM_CPU_OMP_THREADS_BIND": SERVER_CORE, "OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            ["taskset", "-c", SERVER_CORE, *command],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    for _ in range(300):
        if process.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with {process.returncode}; see {log_path}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process, port
        except requests.RequestException:
            pass
        time.sleep(1)
    os.killpg(process.pid, signal.SIGKILL)
    raise RuntimeError(f"the vLLM server did not start in 300 s; see {log_path}")


def trainer_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def run_case(case: str, port: int, steps: int) -> dict:
    """One training run in this (pinned) process: the natural-length workload, synchronous or asynchronous."""
    import torch
    from bench_common import StepTimer, count_tokens, timed
    from step_throughput import WORKLOADS, config_kwargs, dataset

    from trl_sdft import SDFTConfig, SDFTTrainer
    from trl_sdft.demo.default_model import smollm2_dir

    torch.set_num_threads(1)
    workload = dict(WORKLOADS["natural"], steps=steps)
    kwargs = config_kwargs("ours", workload, f"/tmp/trl-sdft-async-{case}")
    kwargs.update(use_vllm=True, vllm_mode="server", vllm_server_host="127.0.0.1", vllm_server_port=port)
    kwargs["async_rollouts"] = case == "async"
    tokens, waits, timer = [], [], StepTimer()
    args = SDFTConfig(**kwargs)
    trainer = SDFTTrainer(str(smollm2_dir()), args=args, train_dataset=dataset(), callbacks=[timer])
    count_tokens(trainer, tokens)
    if case == "sync":  # the trainer waits for the whole generation
        timed(trainer.rollout, "generate", waits)
    trainer.train()
    if case == "async":
        waits = [e["async/wait_seconds"] for e in trainer.state.log_history if "async/wait_seconds" in e]
    steps_counted, counted = timer.times[1:], tokens[1:]
    return {
        "case": case,
        "bf16": bool(args.bf16),
        "step_s": statistics.median(steps_counted),
        "wait_s": statistics.median(waits[1:]) if len(waits) > 1 else None,
        "tokens_per_step": sum(counted) / len(counted),
        "tokens_per_s": sum(counted) / sum(steps_counted),
    }


def learning(port: int, case: str, output_dir: str) -> dict:
    """The demo, trained through the server with the CLI (pinned like the throughput runs); its final table."""
    command = ["taskset", "-c", TRAINER_CORE, sys.executable, os.path.join(ROOT, "scripts", "sdft.py")]
    command += ["--config", os.path.join(ROOT, "configs", "demo.yaml"), "--output_dir", output_dir]
    command += [
        "--use_vllm",
        "--vllm_mode",
        "server",
        "--vllm_server_host",
        "127.0.0.1",
        "--vllm_server_port",
        str(port),
    ]
    if case == "async":
        command += ["--async_rollouts"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=trainer_env(), cwd=ROOT)
    if result.returncode:
        sys.exit(f"learning/{case} failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(output_dir, "results.json")) as f:
        results = json.load(f)
    return {"case": case, "wall_s": round(time.perf_counter() - start, 1), "results": results}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--skip-learning", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/async_rollouts.json")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.case:
        print("RESULT " + json.dumps(run_case(options.case, options.port, options.steps)), flush=True)
        return
    from trl_sdft.demo.default_model import smollm2_dir

    server, port = start_server(str(smollm2_dir()), "/tmp/trl-sdft-async-server.log")
    runs, learned = [], []
    try:
        for round_index in range(options.rounds):
            for case in ("sync", "async"):
                command = ["taskset", "-c", TRAINER_CORE, sys.executable, __file__, "--case", case]
                command += ["--port", str(port), "--steps", str(options.steps)]
                result = subprocess.run(command, capture_output=True, text=True, env=trainer_env(), cwd=ROOT)
                lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
                if result.returncode or not lines:
                    sys.exit(f"{case} failed:\n{result.stderr[-3000:]}")
                run = {**json.loads(lines[-1][len("RESULT ") :]), "round": round_index}
                runs.append(run)
                print(json.dumps(run), flush=True)
        if not options.skip_learning:
            for case in ("sync", "async"):
                learned.append(learning(port, case, f"/tmp/trl-sdft-async-demo-{case}"))
                print(json.dumps({k: v for k, v in learned[-1].items() if k != "results"}), flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()
    summary = {}
    for case in ("sync", "async"):
        group = [run for run in runs if run["case"] == case]
        summary[case] = {
            key: round(statistics.median(run[key] for run in group if run[key] is not None), 3)
            for key in ("step_s", "wait_s", "tokens_per_s", "tokens_per_step")
            if any(run[key] is not None for run in group)
        }
    summary["async_vs_sync_tokens_per_s"] = round(summary["async"]["tokens_per_s"] / summary["sync"]["tokens_per_s"], 2)
    os.makedirs(os.path.dirname(options.out) or ".", exist_ok=True)
    with open(options.out, "w") as f:
        json.dump(
            {"rounds": options.rounds, "steps": options.steps, "runs": runs, "summary": summary, "learning": learned},
            f,
            indent=2,
        )
    print("| mode | step (s) | waited for the server (s/step) | tokens/step | tokens/s |")
    print("|---|---|---|---|---|")
    for case in ("sync", "async"):
        s = summary[case]
        print(
            f"| {case} | {s['step_s']:.2f} | {s.get('wait_s', '-')} | {s['tokens_per_step']:.0f} | {s['tokens_per_s']:.1f} |"
        )
    print(f"async / sync tokens per second: {summary['async_vs_sync_tokens_per_s']}x")


if __name__ == "__main__":
    sys.exit(main())
