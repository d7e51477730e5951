"""Step time and peak memory per rank under DDP, DeepSpeed ZeRO-3 and FSDP2: two CPU processes over gloo, the tiny
test Llama, an EMA teacher, the library's default loss path.

Each engine runs the job of the sharded tests (`tests/jobs/sharded/train.py`, phase `bench`: 6 steps) in a fresh pair
of processes, engines alternating over `--rounds` rounds. The step time is the median of steps 2-6 (step 1 includes
the engines' first collectives and DeepSpeed's first-use setup); the memory is each process's peak RSS. On a model this
small, memory is the framework's own footprint, not the model's: the figures say what each engine costs to run, not
what sharding saves (that needs a model whose weights dominate).

    python benchmarks/sharded_step.py [--rounds 2] [--out benchmarks/results/sharded_step.json]
"""

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = os.path.join(ROOT, "tests", "jobs", "sharded")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(engine: str, model_dir: str, output_dir: str) -> tuple[list[str], dict]:
    job = [os.path.join(JOBS, "train.py"), model_dir, output_dir, "ema", "bench"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SHARDED_TEST_CONFIG": json.dumps({"save_strategy": "no"})}
    port = str(free_port())
    if engine == "ddp":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            port,
            *job,
        ], env
    if engine == "fsdp2":
        env.update(PYTHONPATH=os.path.join(JOBS, "fsdp_cpu"), ACCELERATE_TORCH_DEVICE="cpu")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(JOBS, f"{engine}.yaml")]
    return [*launch, "--main_process_port", port, *job], env


def run(engine: str, model_dir: str) -> dict:
    with tempfile.TemporaryDirectory() as output_dir:
        cmd, env = command(engine, model_dir, output_dir)
        done = subprocess.run(cmd, cwd=JOBS, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise SystemExit(f"{engine} failed:\n{done.stderr[-4000:]}")
        with open(os.path.join(output_dir, "bench.json")) as f:
            record = json.load(f)
    steps = record["step_seconds"]
    return {
        "engine": engine,
        "distributed_type": record["distributed_type"],
        "world": record["world"],
        "step_s": statistics.median(steps[1:]),
        "steps_s": steps,
        "peak_rss_mib_per_rank": [round(value) for value in record["peak_rss_mib_per_rank"]],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--engines", nargs="+", default=["ddp", "zero3", "fsdp2"])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "sharded_step.json"))
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    from trl_sdft.testing import build_model, build_tokenizer

    with tempfile.TemporaryDirectory() as model_dir:
        tokenizer = build_tokenizer()
        build_model(tokenizer).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        runs = [run(engine, model_dir) for _ in range(args.rounds) for engine in args.engines]
    summary = []
    for engine in args.engines:
        mine = [r for r in runs if r["engine"] == engine]
        summary.append(
            {
                "engine": engine,
                "distributed_type": mine[0]["distributed_type"],
                "step_s": statistics.median(r["step_s"] for r in mine),
                "peak_rss_mib": max(max(r["peak_rss_mib_per_rank"]) for r in mine),
            }
        )
    import deepspeed
    import torch

    result = {
        "model": "tiny Llama (2 layers, hidden 32, about 40k parameters), EMA teacher, 6 steps of 2 rollouts x 6 tokens",
        "processes": 2,
        "backend": "gloo",
        "versions": {
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "python": platform.python_version(),
        },
        "summary": summary,
        "runs": runs,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
