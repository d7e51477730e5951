"""Accuracies on the knowledge task's question sets and the knowledge-evaluation callback (baseline, each
evaluation, final). The greedy answers come from `generation.py`."""

import json
import os
import time

from transformers import TrainerCallback

from ..generation import greedy_answers
from ..utils import tokenizer_of
from .knowledge import is_correct


def accuracies(model, tokenizer, question_sets: dict, max_new_tokens: int = 24, batch_size: int = 32) -> dict:
    """Accuracy per set, plus the answers for inspection."""
    results = {}
    for name, pairs in question_sets.items():
        answers = greedy_answers(model, tokenizer, [q for q, _ in pairs], max_new_tokens, batch_size, desc=name)
        correct = [is_correct(answer, accepted) for answer, (_, accepted) in zip(answers, pairs)]
        results[name] = {
            "accuracy": sum(correct) / max(len(correct), 1),
            "correct": sum(correct),
            "total": len(correct),
            "answers": [{"question": q, "answer": a, "correct": c} for (q, _), a, c in zip(pairs, answers, correct)],
        }
    return results


def summary(results: dict) -> dict[str, float]:
    """Accuracy per set (or task) of `accuracies`' / the continual harness's results."""
    return {name: value["accuracy"] for name, value in results.items()}


class KnowledgeEvalCallback(TrainerCallback):
    """Answers the task's questions greedily before training, at each evaluation and at the end.

    Accuracies go to the trainer's logs (`knowledge/<set>`) and, with every answer, to `results.json` in the output
    directory. Runs on the main process only; the others wait at their next collective operation.
    """

    log_prefix = "knowledge"  # the trainer logs `<log_prefix>/<set>`

    def __init__(self, question_sets: dict, max_new_tokens: int = 24, batch_size: int = 32, output_dir=None):
        self.question_sets = question_sets
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.output_dir = output_dir
        self.trainer = None
        self.results = {"baseline": None, "evaluations": [], "final": None}
        self._started = None

    def attach(self, trainer) -> "KnowledgeEvalCallback":
        self.trainer = trainer
        self.output_dir = self.output_dir or trainer.args.output_dir
        return self

    def evaluate(self, model, tokenizer) -> dict:
        """`{name: {"accuracy", "correct", "total", ...}}` for the current model (subclasses score other tasks)."""
        return accuracies(model, tokenizer, self.question_sets, self.max_new_tokens, self.batch_size)

    def _run(self, args, state, model, processing_class, label: str):
        if not state.is_world_process_zero:
            return None
        tokenizer = tokenizer_of(processing_class)
        model = self.trainer.accelerator.unwrap_model(model) if self.trainer is not None else model
        results = self.evaluate(model, tokenizer)
        scores = summary(results)
        print(
            f"[{label} @ step {state.global_step}] " + ", ".join(f"{k} {v:.1%}" for k, v in scores.items()), flush=True
        )
        record = {"step": state.global_step, **results}
        if self.trainer is not None and label != "baseline":
            self.trainer.log({f"{self.log_prefix}/{k}": v for k, v in scores.items()})
        return record

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._started = time.time()
        if self.results["baseline"] is None:
            self.results["baseline"] = self._run(args, state, model, processing_class, "baseline")
            self._write(state)

    def on_evaluate(self, args, state, control, model=None, processing_class=None, **kwargs):
        record = self._run(args, state, model, processing_class, "eval")
        if record is not None:
            self.results["evaluations"].append(record)
            self._write(state)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        self.results["final"] = self._run(args, state, model, processing_class, "final")
        self.results["train_seconds"] = time.time() - self._started if self._started else None
        self._write(state)

    def _write(self, state):
        if not state.is_world_process_zero or self.output_dir is None:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, "results.json"), "w") as f:
            json.dump(self.results, f, indent=2)
