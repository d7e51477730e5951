"""`python scripts/continual.py` / `trl-sdft continual`: the SFT-vs-SDFT continual-learning comparison."""

import argparse
import os
import sys
import time

from ..continual.harness import ContinualConfig, ContinualRunner
from ..continual.tasks import BUNDLED_TASKS
from ..demo.default_model import is_default_alias
from ..models import check_model_path
from .output_dir import OutputDirLock

# `--quick`: a smoke run of every method on a few rows (minutes on a CPU); explicit flags still win.
QUICK = {"steps": 2, "max_train_rows": 4, "max_test_rows": 4, "num_probes": 8, "learning_rates": [1e-4]}


def _list(kind):
    def parse(text: str):
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {kind.__name__}, got {text!r}"
            ) from None

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/continual.py",
        description="Train tasks in sequence with SFT and/or SDFT; write retention.json (every accuracy), "
        "answers.json (every answer), retention.md and retention.png (accuracy on every task and the general probes "
        "after each stage).",
    )
    defaults = ContinualConfig()
    p.add_argument("--method", choices=["sft", "sdft", "both"], default="both")
    p.add_argument(
        "--tasks",
        type=_list(str),
        default=defaults.tasks,
        help=f"comma-separated, trained in this order: bundled ({', '.join(BUNDLED_TASKS)}) or JSONL paths. A task "
        "file is code: its `python` scorers import and run the module or file they name when it loads, so only run "
        "task files you trust",
    )
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps per task (default {defaults.steps})")
    p.add_argument(
        "--learning_rates",
        type=_list(float),
        default=None,
        help=f"the learning-rate grid every method runs, comma-separated (default {defaults.learning_rates})",
    )
    p.add_argument(
        "--alphas",
        type=_list(float),
        default=defaults.alphas,
        help="SDFT distillation_alpha values: 0 forward KL, 0.5 JSD, 1 reverse KL",
    )
    p.add_argument("--seeds", type=_list(int), default=defaults.seeds, help="comma-separated; every run once per seed")
    p.add_argument(
        "--grid",
        default=None,
        help="a budget grid file (YAML list or JSON lines of {method, learning_rate, steps, variant, alpha} points, "
        "e.g. configs/continual_pareto.yaml): its points, once per seed, replace --learning_rates x --alphas",
    )
    p.add_argument("--model", default=defaults.model, help="model path or the smollm2-135m-instruct alias")
    p.add_argument("--batch_size", type=int, default=defaults.batch_size, help="sequences per optimizer step")
    p.add_argument(
        "--num_generations",
        type=int,
        default=defaults.num_generations,
        help="SDFT completions per prompt (batch_size / num_generations prompts per step)",
    )
    p.add_argument("--distillation_mode", default=defaults.distillation_mode, help="SDFT's distillation_mode")
    p.add_argument(
        "--teacher_model_kind",
        default=defaults.teacher_model_kind,
        help="base: the model at the start of each stage, frozen",
    )
    p.add_argument("--max_train_rows", type=int, default=None, help="train on the first N rows of each task")
    p.add_argument("--max_test_rows", type=int, default=None, help="score the first N test rows of each task")
    p.add_argument("--num_probes", type=int, default=None, help="how many general-knowledge probes (default: all)")
    p.add_argument(
        "--min_teacher_gap",
        type=float,
        default=defaults.min_teacher_gap,
        help="the in-context teacher check warns when the teacher beats the base model by less on a task",
    )
    p.add_argument("--output_dir", default=defaults.output_dir, help="where the reports and answers.json go")
    p.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK} unless given explicitly")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="keep the finished runs of an earlier identical call")
    group.add_argument("--overwrite", action="store_true", help="replace an existing retention.json")
    return p


def config_from_args(args: argparse.Namespace) -> ContinualConfig:
    values = {
        "tasks": args.tasks,
        "methods": ["sft", "sdft"] if args.method == "both" else [args.method],
        "model": args.model,
        "alphas": args.alphas,
        "seeds": args.seeds,
        "batch_size": args.batch_size,
        "num_generations": args.num_generations,
        "distillation_mode": args.distillation_mode,
        "teacher_model_kind": args.teacher_model_kind,
        "min_teacher_gap": args.min_teacher_gap,
        "output_dir": args.output_dir,
        "grid": args.grid,
    }
    for key in ("steps", "max_train_rows", "max_test_rows", "num_probes", "learning_rates"):
        value = getattr(args, key)
        if value is None and args.quick:
            value = QUICK[key]
        if value is not None:
            values[key] = value
    return ContinualConfig(**values)


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = time.time()
    try:  # tasks and an existing output are checked here, before any model is loaded
        if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
            raise ValueError(f"--output_dir {config.output_dir!r} is a file, not a directory: choose a directory path.")
        if not is_default_alias(config.model):  # the embedded model is fetched when first used
            check_model_path(config.model, "--model")
        runner = ContinualRunner(config, overwrite=args.overwrite, resume=args.resume)
        os.makedirs(config.output_dir, exist_ok=True)
        lock = OutputDirLock(config.output_dir)  # noqa: F841 (held until the run returns: one run per directory)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runner.run()
    out = config.output_dir
    print(
        f"\nretention table: {os.path.join(out, 'retention.md')}\nplot: {os.path.join(out, 'retention.png')}\n"
        f"all scores: {os.path.join(out, 'retention.json')}\nall answers: {os.path.join(out, 'answers.json')}\n"
        f"wall time: {(time.time() - started) / 60:.1f} min"
    )
    return 0
