"""SFT and SDFT side by side on the bundled agentic task, over a small grid: learning rate x teacher kind x seed.

    python benchmarks/agentic_grid.py [--learning_rates 1e-4 3e-4] [--teacher_kinds base ema] [--seeds 0 1 2]
                                      [--trainers sdft sft] [--quick] [--output benchmarks/results/agentic_grid.json]

Every run starts from the model of `configs/agentic.yaml` (`smollm2-135m-tools`: SmolLM2-135M-Instruct after a format
warm start on other tools, `trl_sdft/demo/tool_format.py`), trains on the 96 questions about the 32 training
entities at that config's steps, batch and lengths (`benchmarks/agentic_task.py` builds the trainers: SDFT with
`tools=[lookup]`, TRL's SFTTrainer with `assistant_only_loss` on the demonstrations; SFT has no teacher, so it runs once
per learning rate and seed), and is scored on the 48 questions about the held-out entities (greedy multi-turn
rollouts: tool-call rate, calls with the asked name, right answers) and on the general-knowledge probes.

The JSON is written after every run and a rerun skips the runs it already holds (same key), so the grid can be filled
over several sessions. It keeps per run: the scores, the tool-call frequency of each logged step, the wall time; and
per configuration the mean and standard deviation over seeds (`summary`). About 25 min per SDFT run on two CPU cores
(from the warm start the rollouts are multi-turn: the config's own run took 21 min for its 20 steps, plus one
evaluation of about 3 min), less per SFT run; do not run anything heavy beside it. A grid file holds runs from one
starting model only (a rerun with another refuses it). `scripts/docs_pages.py` makes the results page from it.
"""

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import agentic_task as task  # noqa: E402

SCORES = ("tool_call_rate", "correct_call_rate", "answer_accuracy", "probes")


def run_key(trainer: str, learning_rate: float, teacher: str | None, seed: int) -> str:
    return f"{trainer}|lr={learning_rate:g}|teacher={teacher or '-'}|seed={seed}"


def config_key(key: str) -> str:
    """A run's configuration: its key without the seed."""
    return key.rsplit("|seed=", 1)[0]


def plan(options) -> list[tuple[str, float, str | None, int]]:
    runs = []
    for trainer in options.trainers:
        for learning_rate in options.learning_rates:
            for teacher in options.teacher_kinds if trainer == "sdft" else [None]:
                runs += [(trainer, learning_rate, teacher, seed) for seed in options.seeds]
    return runs


def scores(record: dict) -> dict:
    agentic = record["agentic"]
    return {**{key: agentic[key] for key in SCORES[:3]}, "probes": record["probes"]["accuracy"]}


def run_one(trainer: str, learning_rate: float, teacher: str | None, seed: int, fields, model_path, rows, options):
    """One run from the base model: train, then score on the held-out questions and the probes."""
    from trl_sdft.demo.agentic import split_entities

    fields = {**fields, "learning_rate": learning_rate, "seed": seed}
    if teacher is not None:
        fields["teacher_model_kind"] = teacher
    model, tokenizer = task.load_base(model_path, fields["chat_template_path"])
    train_entities = split_entities()[0]
    with tempfile.TemporaryDirectory(prefix="agentic-grid-") as output_dir:
        build = task.train_sft if trainer == "sft" else task.train_sdft
        built = build(model, tokenizer, fields, train_entities, output_dir)
        started = time.time()
        built.train()
        train_seconds = round(time.time() - started, 1)
        model = built.accelerator.unwrap_model(built.model)
        history = built.state.log_history
        del built
        gc.collect()
    after = task.evaluate(model, tokenizer, rows, options)
    del model
    gc.collect()
    calls = [entry.get("tools/call_frequency") for entry in history if "tools/call_frequency" in entry]
    samples = after["agentic"]["samples"]
    return {"scores": scores(after), "call_frequency": calls, "train_seconds": train_seconds, "samples": samples}


def summarize(runs: dict) -> dict:
    """Per configuration: the seeds run and each score's mean and standard deviation over them."""
    groups: dict[str, list[dict]] = {}
    for key, record in runs.items():
        groups.setdefault(config_key(key), []).append(record["scores"])
    table = {}
    for name, values in groups.items():
        table[name] = {"seeds": len(values)}
        for score in SCORES:
            numbers = [v[score] for v in values]
            table[name][score] = {
                "mean": statistics.fmean(numbers),
                "std": statistics.stdev(numbers) if len(numbers) > 1 else 0.0,
            }
    return table


def write(results: dict, path: str) -> None:
    results["summary"] = summarize(results["runs"])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "agentic.yaml"))
    parser.add_argument("--trainers", nargs="+", choices=("sdft", "sft"), default=["sdft", "sft"])
    parser.add_argument("--learning_rates", nargs="+", type=float, default=[1e-4, 3e-4])
    parser.add_argument("--teacher_kinds", nargs="+", choices=("base", "ema", "live"), default=["base", "ema"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "agentic_grid.json"))
    parser.add_argument("--quick", action="store_true", help="smoke size: 2 steps of 4 rollouts, 6 questions, 6 probes")
    parser.add_argument("--model", default=None, help="a model directory instead of the config's (tests, smoke runs)")
    parser.add_argument("--num_eval", type=int, default=None)
    parser.add_argument("--num_probes", type=int, default=None)
    parser.add_argument("--eval_max_new_tokens", type=int, default=48)
    parser.add_argument("--eval_max_iterations", type=int, default=2)
    parser.add_argument("--num_samples", type=int, default=2)
    options = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from trl_sdft.demo.agentic import eval_rows, split_entities
    from trl_sdft.demo.default_model import resolve_model
    from trl_sdft.utils import reuse_freed_cpu_memory

    fields, other = task.read_config(options.config)
    if options.quick:
        fields.update(task.QUICK)
        options.num_eval = options.num_eval or 6
        options.num_probes = options.num_probes or 6
    reuse_freed_cpu_memory()
    model_name = options.model or other.get("model_name_or_path", "smollm2-135m-instruct")
    model_path = resolve_model(model_name)
    rows = eval_rows(split_entities()[1])[: options.num_eval]
    results = {"runs": {}}
    if os.path.exists(options.output):
        with open(options.output) as f:
            results = json.load(f)
        held = results.get("config", {}).get("model", "smollm2-135m-instruct")  # files before the field: that model
        if held != model_name:  # a grid is filled over sessions: its runs must share one starting model
            raise SystemExit(f"{options.output} holds runs from {held!r}, not {model_name!r}: pass another --output.")
    warm_start = os.path.join(model_path, "warm_start.json")
    results.update(
        command="python benchmarks/agentic_grid.py " + " ".join(sys.argv[1:] if argv is None else argv),
        machine=task.machine(),
        config={
            "config_file": os.path.relpath(options.config, ROOT),
            "model": model_name,
            "warm_start": json.loads(Path(warm_start).read_text()) if os.path.exists(warm_start) else None,
            "sdft_fields": fields,
            "quick": options.quick,
            "eval_questions": len(rows),
            "num_probes": options.num_probes,
        },
    )
    if results.get("before") is None:
        model, tokenizer = task.load_base(model_path, fields["chat_template_path"])
        results["before"] = scores(task.evaluate(model, tokenizer, rows, options))
        del model
        gc.collect()
        write(results, options.output)
    for trainer, learning_rate, teacher, seed in plan(options):
        key = run_key(trainer, learning_rate, teacher, seed)
        if key in results["runs"]:
            continue
        record = run_one(trainer, learning_rate, teacher, seed, fields, model_path, rows, options)
        results["runs"][key] = record
        write(results, options.output)
        print(f"[{key}] {json.dumps(record['scores'])} ({record['train_seconds']:.0f} s)", flush=True)
    write(results, options.output)
    return results


if __name__ == "__main__":
    main()
