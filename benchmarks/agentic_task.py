"""The bundled agentic task (`trl_sdft/demo/agentic.py`): does SDFT with tools teach SmolLM2-135M-Instruct to call
`lookup` on entities it never trained on, and what does SFT on the same demonstrations do?

    python benchmarks/agentic_task.py [--variants sdft sdft-from-teacher sdft-lr3x sft] [--quick]
                                      [--output benchmarks/results/agentic.json]

The base model is scored first (greedy multi-turn rollouts on the 48 questions about the 16 held-out entities, and the
general-knowledge probes). Then each variant starts from the base model, trains on the 96 questions about the 32
training entities and is scored the same way:

- `sdft`: `SDFTTrainer(..., tools=[lookup])` at the hyperparameters of `configs/agentic.yaml` (student rollouts,
  frozen base teacher with the demonstration trajectory in view);
- `sdft-from-teacher`: the same with `generate_from_teacher=True` (rollouts sampled from the teacher's prompt, so
  they start with the demonstrated call more often);
- `sdft-lr3x`: the same at three times the learning rate (the student's first token must move from answering to
  `<tool_call>` before its own rollouts hold calls to learn from);
- `sft`: TRL's `SFTTrainer` on the demonstration trajectories (`messages` with the tool call, its result and the
  answer; the same tool list in the prompt), `assistant_only_loss=True`, at the same learning rate, steps, sequences
  per step and seed as `sdft`.

The JSON (written after every phase, so a partial run keeps its results) holds the configuration, the metrics before
and after each variant, a few decoded trajectories, the wall time of each phase, the machine and the command. CPU,
float32. Do not run anything heavy beside it.
"""

import argparse
import dataclasses
import gc
import json
import os
import platform
import sys
import tempfile
import time

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("sdft", "sdft-from-teacher", "sdft-lr3x", "sft")
QUICK = {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 2, "logging_steps": 1}


def variant_overrides(name: str, fields: dict) -> dict:
    """The SDFTConfig fields a variant changes (SFT: none; it takes the shared ones)."""
    if name == "sdft-from-teacher":
        return {"generate_from_teacher": True}
    if name == "sdft-lr3x":
        return {"learning_rate": round(3 * fields["learning_rate"], 12)}
    return {}


def read_config(path: str) -> tuple[dict, dict]:
    """(the YAML's SDFTConfig fields, its other keys: model, dataset, tools, ...)."""
    from trl_sdft.config import SDFTConfig

    with open(path) as f:
        config = yaml.safe_load(f)
    names = {field.name for field in dataclasses.fields(SDFTConfig)}
    return {k: v for k, v in config.items() if k in names}, {k: v for k, v in config.items() if k not in names}


def load_base(model_path: str, chat_template_path: str):
    from trl_sdft.chat_templates import load_chat_template
    from trl_sdft.continual.harness import load_model

    model, tokenizer = load_model(model_path)
    tokenizer.chat_template = load_chat_template(chat_template_path)
    return model, tokenizer


def evaluate(model, tokenizer, rows: list[dict], options) -> dict:
    from trl_sdft.demo.agentic import evaluate_agentic, evaluate_probes

    started = time.time()
    agentic = evaluate_agentic(
        model,
        tokenizer,
        rows,
        max_new_tokens=options.eval_max_new_tokens,
        max_iterations=options.eval_max_iterations,
        num_samples=options.num_samples,
    )
    agentic.pop("outcomes")
    probes = evaluate_probes(model, tokenizer, options.num_probes)
    probes = {"accuracy": probes["accuracy"], "correct": probes["correct"], "total": probes["total"]}
    return {"agentic": agentic, "probes": probes, "eval_seconds": round(time.time() - started, 1)}


def train_sdft(model, tokenizer, fields: dict, train_entities: list[dict], output_dir: str):
    from trl_sdft.config import SDFTConfig
    from trl_sdft.demo.agentic import lookup, sdft_dataset
    from trl_sdft.trainer import SDFTTrainer

    args = SDFTConfig(**{**fields, "output_dir": output_dir, "disable_tqdm": True})
    trainer = SDFTTrainer(
        model=model,
        args=args,
        train_dataset=sdft_dataset(train_entities),
        processing_class=tokenizer,
        tools=[lookup],
    )
    return trainer


def train_sft(model, tokenizer, fields: dict, train_entities: list[dict], output_dir: str):
    from trl import SFTConfig, SFTTrainer

    from trl_sdft.demo.agentic import sft_dataset

    names = {field.name for field in dataclasses.fields(SFTConfig)}
    # The tokenizer already holds the chat template (SFTConfig's `chat_template_path` does not know the presets).
    shared = {k: v for k, v in fields.items() if k in names and k != "chat_template_path"}
    shared.update(output_dir=output_dir, disable_tqdm=True, data_seed=fields.get("seed", 42))
    args = SFTConfig(**shared, max_length=1024, packing=False, assistant_only_loss=True, dataset_num_proc=None)
    return SFTTrainer(model=model, args=args, train_dataset=sft_dataset(train_entities), processing_class=tokenizer)


def run_variant(name: str, fields: dict, model_path: str, train_entities, rows, options) -> dict:
    overrides = variant_overrides(name, fields)
    fields = {**fields, **overrides}
    model, tokenizer = load_base(model_path, fields["chat_template_path"])
    with tempfile.TemporaryDirectory(prefix=f"agentic-{name}-") as output_dir:
        build = train_sft if name == "sft" else train_sdft
        trainer = build(model, tokenizer, fields, train_entities, output_dir)
        started = time.time()
        output = trainer.train()
        train_seconds = round(time.time() - started, 1)
        model = trainer.accelerator.unwrap_model(trainer.model)
        history = trainer.state.log_history
        del trainer
        gc.collect()
    record = {
        "trainer": "trl.SFTTrainer (assistant_only_loss)" if name == "sft" else "trl_sdft.SDFTTrainer (tools=[lookup])",
        "overrides": overrides,
        "train_seconds": train_seconds,
        "train_loss": output.training_loss,
        "log_history": history,
        "after": evaluate(model, tokenizer, rows, options),
    }
    del model
    gc.collect()
    return record


def machine() -> dict:
    import transformers
    import trl

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
    }


def summary(results: dict) -> dict:
    def scores(record):
        agentic = record["agentic"]
        keys = ("tool_call_rate", "correct_call_rate", "answer_accuracy")
        return {**{key: agentic[key] for key in keys}, "probes": record["probes"]["accuracy"]}

    table = {"base": scores(results["before"])} if results.get("before") else {}
    for name, record in results["variants"].items():
        table[name] = {**scores(record["after"]), "train_seconds": record["train_seconds"]}
    return table


def write(results: dict, path: str) -> None:
    results["summary"] = summary(results)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "agentic.yaml"))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "agentic.json"))
    parser.add_argument("--quick", action="store_true", help="smoke size: 2 steps of 4 rollouts, 6 questions, 6 probes")
    parser.add_argument("--model", default=None, help="a model directory instead of the config's (tests, smoke runs)")
    parser.add_argument("--num_eval", type=int, default=None, help="held-out questions to score (default: all 48)")
    parser.add_argument("--num_probes", type=int, default=None, help="general-knowledge probes (default: all)")
    parser.add_argument("--eval_max_new_tokens", type=int, default=48, help="greedy tokens per turn")
    parser.add_argument("--eval_max_iterations", type=int, default=2, help="rounds of tool calls when scoring")
    parser.add_argument("--num_samples", type=int, default=3, help="decoded trajectories kept per evaluation")
    parser.add_argument("--skip_base", action="store_true", help="do not score the base model")
    options = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from trl_sdft.demo.agentic import eval_rows, split_entities
    from trl_sdft.demo.default_model import resolve_model
    from trl_sdft.utils import reuse_freed_cpu_memory

    fields, other = read_config(options.config)
    if options.quick:
        fields.update(QUICK)
        options.num_eval = options.num_eval or 6
        options.num_probes = options.num_probes or 6
    if not torch.cuda.is_available():
        reuse_freed_cpu_memory()  # as the CLI and the continual harness do on a CPU
    model_path = options.model or resolve_model(other.get("model_name_or_path", "smollm2-135m-instruct"))
    train_entities, heldout = split_entities()
    rows = eval_rows(heldout)[: options.num_eval]
    started = time.time()
    results = {
        "command": " ".join(
            ["python", os.path.relpath(os.path.abspath(__file__), ROOT), *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": machine(),
        "config": {
            "config_file": os.path.relpath(options.config, ROOT),
            "model": model_path if options.model else other.get("model_name_or_path"),
            "sdft_fields": fields,
            "variants": {name: variant_overrides(name, fields) for name in options.variants},
            "quick": options.quick,
            "train_entities": len(train_entities),
            "train_rows": len(train_entities) * 3,
            "heldout_entities": len(heldout),
            "eval_questions": len(rows),
            "eval": {
                "max_new_tokens_per_turn": options.eval_max_new_tokens,
                "max_tool_calling_iterations": options.eval_max_iterations,
                "decoding": "greedy",
                "num_probes": options.num_probes,
            },
        },
        "before": None,
        "variants": {},
    }
    if not options.skip_base:
        model, tokenizer = load_base(model_path, fields["chat_template_path"])
        results["before"] = evaluate(model, tokenizer, rows, options)
        del model
        gc.collect()
        print(f"[base] {json.dumps(summary(results)['base'])}", flush=True)
        write(results, options.output)
    for name in options.variants:
        results["variants"][name] = run_variant(name, fields, model_path, train_entities, rows, options)
        results["total_seconds"] = round(time.time() - started, 1)
        print(f"[{name}] {json.dumps(summary(results)[name])}", flush=True)
        write(results, options.output)
    results["total_seconds"] = round(time.time() - started, 1)
    write(results, options.output)
    print(f"wrote {options.output} ({results['total_seconds'] / 60:.1f} min)", flush=True)
    return results


if __name__ == "__main__":
    main()
