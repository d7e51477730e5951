"""Sequential training on tasks with SFT or SDFT, evaluating every task and the probes after each stage.

One *run* is a method (SFT, or SDFT with one `distillation_alpha`), a learning rate from the shared grid and a seed.
Every run starts from the same base model and trains the tasks in the given order with the same number of optimizer
steps and sequences per step. Stage 0 is the base model, scored once with greedy decoding like every later stage.
With a budget grid (`grid`, see `grid.py`) the runs are the grid's points instead, each with its own learning rate,
steps and SDFT variant, every point once per seed.

Two files hold the results: `retention.json` (settings, the in-context teacher check, every accuracy: what the
reports are made from, small enough to keep) and `answers.json` (every answer of every evaluation, by run and stage).
"""

import gc
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from ..demo.default_model import resolve_model
from ..demo.evaluation import summary
from ..generation import greedy_answers
from ..utils import ensure_pad_token, reuse_freed_cpu_memory
from .grid import VARIANTS, Point, load_grid
from .report import summarize, write_reports
from .tasks import PROBES, Task, load_tasks, probes_task

METHODS = ("sft", "sdft")
RETENTION_FILE = "retention.json"
ANSWERS_FILE = "answers.json"


@dataclass
class ContinualConfig:
    """Settings of a continual-learning comparison; every method shares them."""

    tasks: list[str] = field(default_factory=lambda: ["facts", "tool_call", "identity"])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    model: str = "smollm2-135m-instruct"
    steps: int = 15
    learning_rates: list[float] = field(default_factory=lambda: [3e-5, 1e-4])
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    seeds: list[int] = field(default_factory=lambda: [42])
    batch_size: int = 4
    num_generations: int = 1
    distillation_mode: str = "full_logits"
    teacher_model_kind: str = "base"
    lr_scheduler_type: str = "constant"
    max_train_rows: int | None = None
    max_test_rows: int | None = None
    num_probes: int | None = None
    eval_batch_size: int = 32
    min_teacher_gap: float = 0.25
    output_dir: str = "outputs/continual"
    grid: str | None = None  # a budget grid file (`grid.py`): its points replace learning_rates x alphas

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"Unknown method(s) {unknown or self.methods}: use sft, sdft or both.")
        if not self.tasks:
            raise ValueError("No tasks given: pass --tasks, e.g. facts,tool_call,identity.")
        for name, value in (("steps", self.steps), ("batch_size", self.batch_size)):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}.")
        if self.batch_size % self.num_generations:
            raise ValueError(
                f"`batch_size={self.batch_size}` must be divisible by `num_generations={self.num_generations}`."
            )
        if not self.learning_rates or any(lr <= 0 for lr in self.learning_rates):
            raise ValueError(f"`learning_rates` must be positive, got {self.learning_rates}.")
        if "sdft" in self.methods and (not self.alphas or any(not 0 <= a <= 1 for a in self.alphas)):
            raise ValueError(f"`alphas` must lie in [0, 1] (0 forward KL, 0.5 JSD, 1 reverse KL), got {self.alphas}.")
        if not self.seeds:
            raise ValueError("`seeds` is empty.")


@dataclass(frozen=True)
class RunSpec:
    method: str
    learning_rate: float
    seed: int
    alpha: float | None = None
    steps: int | None = None  # None: the comparison's `steps`
    variant: str | None = None  # an SDFT variant of `grid.VARIANTS`; None: the harness's defaults ("base")

    @property
    def label(self) -> str:
        """The run's name without the seed: seeds of one label are averaged."""
        name = "SFT" if self.method == "sft" else f"SDFT{f' {self.variant}' if self.variant else ''} a={self.alpha:g}"
        return f"{name} lr={self.learning_rate:g}" + (f" {self.steps} steps" if self.steps else "")

    @property
    def key(self) -> tuple:
        """What identifies a finished run in `retention.json` (for `--resume`)."""
        return (self.method, self.learning_rate, self.alpha, self.seed, self.steps, self.variant)

    def sdft_overrides(self) -> dict:
        return Point(self.method, self.learning_rate, self.steps, self.variant, self.alpha).sdft_overrides()


def run_specs(config: ContinualConfig, points: list[Point] | None = None) -> list[RunSpec]:
    """Every run: the grid's points (those of `config.methods`) x seeds, seed by seed (a grid cut short has every point
    at its first seeds rather than the first points at every seed), else methods x learning rates x alphas x seeds."""
    if points is not None:
        return [
            RunSpec(p.method, p.learning_rate, seed, p.alpha, p.steps, p.variant)
            for seed in config.seeds
            for p in points
            if p.method in config.methods
        ]
    specs = []
    for method in config.methods:
        for lr in config.learning_rates:
            for alpha in config.alphas if method == "sdft" else [None]:
                specs += [RunSpec(method, lr, seed, alpha) for seed in config.seeds]
    return specs


def evaluate(model, tokenizer, tasks: list[Task], batch_size: int = 32, with_context: bool = False) -> dict:
    """Greedy answers to every test row; per task the accuracy, counts and the answers."""
    results = {}
    for task in tasks:
        answers = greedy_answers(model, tokenizer, task.test_prompts(with_context), task.max_new_tokens, batch_size)
        correct = task.score(answers)
        results[task.name] = {
            "accuracy": sum(correct) / len(correct),
            "correct": sum(correct),
            "total": len(correct),
            "answers": [
                {"prompt": row["prompt"], "answer": answer, "correct": ok}
                for row, answer, ok in zip(task.test, answers, correct)
            ],
        }
    return results


def split_answers(scores: dict) -> tuple[dict, dict]:
    """`evaluate`'s result as (accuracies and counts per task, answers per task)."""
    kept = {name: {k: v for k, v in task.items() if k != "answers"} for name, task in scores.items()}
    answers = {name: task["answers"] for name, task in scores.items() if "answers" in task}
    return kept, answers


def _run_key(run: dict) -> tuple:
    return RunSpec(**{k: run.get(k) for k in RunSpec.__dataclass_fields__}).key


def _split_saved(results: dict) -> tuple[dict, dict]:
    """A `retention.json` written before the answers had their own file: its answers moved out, as `_save` does."""
    answers = {"base": {}, "teacher": {}, "runs": []}
    if "base" in results:
        results["base"], answers["base"] = split_answers(results["base"])
    if "teacher_answers" in results:
        answers["teacher"] = split_answers(results.pop("teacher_answers"))[1]
    for run in results.get("runs", []):
        stages = []
        for stage in run["stages"]:
            stage["scores"], stage_answers = split_answers(stage["scores"])
            if stage["stage"]:
                stages.append({"stage": stage["stage"], "trained": stage["trained"], "answers": stage_answers})
        answers["runs"].append({k: v for k, v in run.items() if k != "stages"} | {"stages": stages})
    return results, answers


def _common_args(config: ContinualConfig, spec: RunSpec, output_dir: str) -> dict:
    return dict(
        output_dir=output_dir,
        max_steps=spec.steps or config.steps,
        learning_rate=spec.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=1,
        gradient_checkpointing=False,
        seed=spec.seed,
        data_seed=spec.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        logging_steps=max(1, config.steps // 5),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


def sdft_settings(config: ContinualConfig, spec: RunSpec, task: Task, common: dict) -> dict:
    """The SDFTConfig fields of one SDFT stage: the harness's, then the run's variant (`grid.VARIANTS`) over them."""
    settings = dict(
        common,
        num_generations=config.num_generations,
        max_completion_length=task.max_new_tokens,
        teacher_model_kind=config.teacher_model_kind,
        teacher_prompt_template=task.teacher_prompt_template,
        distillation_mode=config.distillation_mode,
        distillation_alpha=spec.alpha,
    )
    settings.update(spec.sdft_overrides())
    return settings


def train_stage(model, tokenizer, task: Task, spec: RunSpec, config: ContinualConfig) -> dict:
    """Train `model` in place on one task; returns the stage's training statistics."""
    with tempfile.TemporaryDirectory(prefix=f"continual-{task.name}-") as output_dir:
        common = _common_args(config, spec, output_dir)
        if spec.method == "sft":
            from trl import SFTConfig, SFTTrainer

            args = SFTConfig(**common, max_length=1024, packing=False, dataset_num_proc=None)
            trainer = SFTTrainer(model=model, args=args, train_dataset=task.sft_dataset(), processing_class=tokenizer)
        else:
            from ..config import SDFTConfig
            from ..trainer import SDFTTrainer

            args = SDFTConfig(**sdft_settings(config, spec, task, common))
            trainer = SDFTTrainer(model=model, args=args, train_dataset=task.sdft_dataset(), processing_class=tokenizer)
        started = time.time()
        output = trainer.train()
        stats = {"train_seconds": round(time.time() - started, 1), "train_loss": output.training_loss}
        del trainer
        gc.collect()
    return stats


def load_model(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(path, padding_side="left"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tokenizer


def teacher_check(student_scores: dict, teacher_scores: dict, tasks: list[Task], min_gap: float) -> dict:
    """The in-context teacher's accuracy against the student's, per task, and whether the gap is large enough."""
    check = {}
    for task in tasks:
        if task.name not in teacher_scores:
            check[task.name] = {"student": student_scores[task.name], "teacher": None, "clear": None}
            continue
        gap = teacher_scores[task.name] - student_scores[task.name]
        check[task.name] = {
            "student": student_scores[task.name],
            "teacher": teacher_scores[task.name],
            "gap": gap,
            "clear": gap >= min_gap,
        }
    return check


EXTENDABLE = ("seeds", "grid_points")  # settings a resumed run may extend


def _extends(new, old) -> bool:
    """`new` holds every entry of `old` (and more): a list of seeds or of grid points, grown."""
    return isinstance(new, list) and isinstance(old, list) and len(new) > len(old) and all(o in new for o in old)


class ContinualRunner:
    """Runs every (method, learning rate, alpha, seed) over the task sequence and writes the reports as it goes."""

    def __init__(self, config: ContinualConfig, overwrite: bool = False, resume: bool = False, log=print):
        self.config = config
        self.log = log
        self.tasks = [t.head(config.max_train_rows, config.max_test_rows) for t in load_tasks(config.tasks)]
        self.probes = probes_task(config.num_probes)
        prompts_per_step = config.batch_size // config.num_generations
        small = [f"{t.name} ({len(t.train)})" for t in self.tasks if len(t.train) < prompts_per_step]
        if "sdft" in config.methods and small:
            raise ValueError(
                f"SDFT takes {prompts_per_step} distinct prompts per step (batch_size {config.batch_size} / "
                f"num_generations {config.num_generations}) but task(s) {', '.join(small)} have fewer train rows. "
                "Add rows, lower --batch_size or raise --num_generations."
            )
        self.points = load_grid(config.grid) if config.grid else None
        self.path = os.path.join(config.output_dir, RETENTION_FILE)
        self.answers_path = os.path.join(config.output_dir, ANSWERS_FILE)
        self.answers = {"base": {}, "teacher": {}, "runs": []}  # every answer; `results` holds the accuracies
        self.results = self._start(overwrite, resume)

    def _start(self, overwrite: bool, resume: bool) -> dict:
        settings = asdict(self.config)
        if self.points is not None:  # the grid's content, not only its path, decides what --resume may keep
            settings["grid_points"] = [asdict(point) for point in self.points]
        fresh = {"config": settings, "tasks": self._task_info(), "runs": []}
        if not os.path.exists(self.path) or overwrite:
            return fresh
        with open(self.path) as f:
            previous = json.load(f)
        if not resume:
            raise FileExistsError(
                f"{self.path} already exists. Pass --resume to finish it (runs already done are kept), --overwrite "
                "to replace it, or another --output_dir."
            )
        before = previous.get("config", {})
        changed = sorted(k for k in fresh["config"] if before.get(k) != fresh["config"][k])
        # More seeds or more grid points only add runs: the finished ones stay valid (the grid file may move then).
        grown = {k for k in changed if k in EXTENDABLE and _extends(fresh["config"][k], before.get(k))}
        if "grid_points" in grown:
            grown.add("grid")
        if set(changed) - grown:
            raise ValueError(
                f"--resume: {self.path} was written with other settings ({', '.join(sorted(set(changed) - grown))} "
                "differ); use the same settings (adding seeds or grid points is fine), or --overwrite / another "
                "--output_dir."
            )
        if grown:
            self.log(f"--resume: {', '.join(sorted(grown))} extended; only the new runs will run")
        previous["config"] = fresh["config"]
        previous["runs"] = [run for run in previous["runs"] if len(run["stages"]) == len(self.tasks) + 1]
        previous, migrated = _split_saved(previous)
        answers = migrated
        if os.path.exists(self.answers_path):  # the answers of the kept runs (a missing file loses only answers)
            with open(self.answers_path) as f:
                answers = json.load(f)
            for key in ("base", "teacher"):
                answers[key] = answers.get(key) or migrated[key]
            answers["runs"] = answers.get("runs", []) + migrated["runs"]
        kept = {_run_key(run) for run in previous["runs"]}
        seen = set()
        self.answers["base"], self.answers["teacher"] = answers["base"], answers["teacher"]
        for run in answers["runs"]:
            key = _run_key(run)
            if key in kept and key not in seen:
                seen.add(key)
                self.answers["runs"].append(run)
        return previous

    def _task_info(self) -> list[dict]:
        return [
            {
                "name": t.name,
                "kind": t.kind,
                "description": t.description,
                "num_train": len(t.train),
                "num_test": len(t.test),
            }
            for t in [*self.tasks, self.probes]
        ]

    def _save(self):
        os.makedirs(self.config.output_dir, exist_ok=True)
        self.results["summary"] = summarize(self.results)
        for path, content, indent in ((self.answers_path, self.answers, None), (self.path, self.results, 1)):
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(content, f, indent=indent)
            os.replace(tmp, path)
        write_reports(self.results, self.config.output_dir)

    def _baseline(self, model, tokenizer):
        if "base" in self.results:
            return
        started = time.time()
        scores = evaluate(model, tokenizer, [*self.tasks, self.probes], self.config.eval_batch_size)
        with_context = [t for t in self.tasks if t.has_test_context]
        teacher = evaluate(model, tokenizer, with_context, self.config.eval_batch_size, with_context=True)
        self.results["base"], self.answers["base"] = split_answers(scores)
        self.results["teacher_check"] = teacher_check(
            summary(scores), summary(teacher), self.tasks, self.config.min_teacher_gap
        )
        self.answers["teacher"] = split_answers(teacher)[1]
        self.log(f"[base] {_fmt(summary(scores))} ({time.time() - started:.0f} s)")
        for name, check in self.results["teacher_check"].items():
            if check["teacher"] is None:
                self.log(f"[teacher check] {name}: test rows carry no privileged_context, not checked")
                continue
            verdict = "ok" if check["clear"] else f"WARNING: gap below {self.config.min_teacher_gap:.0%}"
            self.log(
                f"[teacher check] {name}: in-context teacher {check['teacher']:.0%} vs student {check['student']:.0%}"
                f" ({verdict})"
            )
        self._save()

    def run(self) -> dict:
        if not torch.cuda.is_available():  # SFT and SDFT stages alike (SDFTTrainer would set it for its own runs only)
            reuse_freed_cpu_memory()
        model_path = resolve_model(self.config.model)
        done = {RunSpec(**{k: r.get(k) for k in RunSpec.__dataclass_fields__}).key for r in self.results["runs"]}
        model, tokenizer = load_model(model_path)
        self._baseline(model, tokenizer)
        base_scores = self.results["base"]
        for spec in run_specs(self.config, self.points):
            if spec.key in done:
                self.log(f"[{spec.label} seed={spec.seed}] done before, kept")
                continue
            model, tokenizer = load_model(model_path)
            run = {
                **asdict(spec),
                "label": spec.label,
                "stages": [{"stage": 0, "trained": None, "scores": base_scores}],
            }
            answers = {**asdict(spec), "label": spec.label, "stages": []}
            for number, task in enumerate(self.tasks, start=1):
                stats = train_stage(model, tokenizer, task, spec, self.config)
                scores, stage_answers = split_answers(
                    evaluate(model, tokenizer, [*self.tasks, self.probes], self.config.eval_batch_size)
                )
                run["stages"].append({"stage": number, "trained": task.name, **stats, "scores": scores})
                answers["stages"].append({"stage": number, "trained": task.name, "answers": stage_answers})
                self.log(
                    f"[{spec.label} seed={spec.seed}] after {task.name} ({stats['train_seconds']:.0f} s): "
                    f"{_fmt(summary(scores))}"
                )
            self.results["runs"].append(run)
            self.answers["runs"].append(answers)
            self._save()
            del model
            gc.collect()
        self._save()
        return self.results


def _fmt(scores: dict) -> str:
    return ", ".join(f"{name} {value:.0%}" for name, value in scores.items())


def run_continual(config: ContinualConfig, overwrite: bool = False, resume: bool = False, log=print) -> dict:
    """Run the comparison and write retention.json, answers.json, retention.md and retention.png (and pareto.md,
    pareto.png) into `config.output_dir`."""
    return ContinualRunner(config, overwrite=overwrite, resume=resume, log=log).run()


__all__ = [
    "ANSWERS_FILE",
    "PROBES",
    "RETENTION_FILE",
    "VARIANTS",
    "ContinualConfig",
    "ContinualRunner",
    "RunSpec",
    "evaluate",
    "run_continual",
    "run_specs",
    "sdft_settings",
    "split_answers",
]
