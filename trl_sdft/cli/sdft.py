"""`trl-sdft` / `python scripts/sdft.py`: SDFT from the command line or a YAML config, with TRL's parser.

Flags are those of `SDFTConfig`, TRL's `ModelConfig` (model, dtype, LoRA) and the script arguments below, so the
example command of TRL's SDFT documentation works unchanged. Without a dataset it trains on the embedded
knowledge task (made-up facts) and reports accuracies before and after.
"""

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from ..checkpoints import resolve_resume_from_checkpoint
from ..config import SDFTConfig
from ..data import validate_dataset
from ..demo.default_model import DEFAULT_MODEL, ModelUnavailableError, is_default_alias, resolve_model
from ..models import check_model_path, first_line
from ..rollouts import VLLMServerError
from .data_files import load_local_dataset
from .launch import close_process_group, dropped_engine, relaunch_cpu_processes
from .output_dir import claim_output_dir, is_inside
from .yaml_config import check_yaml_config, load_yaml_config, split_config_flag


@dataclass
class SDFTScriptArguments(ScriptArguments):
    """Dataset selection. With neither `dataset_name` nor `dataset_path`, the embedded knowledge task is used."""

    dataset_path: str | None = field(
        default=None,
        metadata={"help": "Local data: a .json/.jsonl/.parquet/.csv file, or a directory saved by `save_to_disk`."},
    )
    num_facts: int | None = field(
        default=None, metadata={"help": "Embedded task: train on the first N of its 64 facts (default: all)."}
    )
    num_probes: int | None = field(
        default=None, metadata={"help": "Embedded task: how many general-knowledge probes to evaluate (default: all)."}
    )
    knowledge_eval: bool = field(
        default=True,
        metadata={
            "help": "Answer the evaluation questions (embedded task, or --eval_questions) before, during and after training."
        },
    )
    eval_questions: str | None = field(
        default=None,
        metadata={
            "help": "Your own before/after evaluation (with --dataset_path or --dataset_name): a JSONL file of "
            '{"question", "answers" (or "answer"), optional "paraphrase"}, answered greedily; results.json and the '
            "summary as for the embedded task."
        },
    )
    eval_probes: str | None = field(
        default=None,
        metadata={
            "help": "With --eval_questions: a JSONL file of general questions the model should keep answering "
            '({"question", "answers"}), to measure forgetting. Default: the bundled general-knowledge probes.'
        },
    )
    eval_max_new_tokens: int = field(default=24, metadata={"help": "Tokens per greedy answer in the evaluation."})
    agentic_eval: bool = field(
        default=False,
        metadata={
            "help": "Score the bundled agentic task (trl_sdft/demo/agentic.py) before and after training: greedy "
            "multi-turn rollouts with the lookup tool on the 48 questions about held-out entities (tool-call rate, "
            "calls with the asked name, right answers) and the general-knowledge probes. configs/agentic.yaml sets it."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace an earlier run's model and checkpoints in --output_dir. Without it, a directory that "
            "holds them is refused (resume it with --resume_from_checkpoint true instead)."
        },
    )
    tools: list[str] | None = field(
        default=None,
        metadata={
            "help": "Tools the model may call during rollouts (agentic SDFT): one or more `module:function` names, "
            "e.g. --tools my_tools:lookup my_tools:search (in YAML, a list), imported from the working directory or "
            "PYTHONPATH. Each function needs type hints and a Google-style docstring with an `Args:` section (they "
            "describe it to the model). Tools need chat prompts and a chat template that renders tool calls "
            "(--chat_template_path, e.g. smollm2-tools)."
        },
    )
    environment_factory: str | None = field(
        default=None,
        metadata={
            "help": "A `module:name` class or function returning an environment for each rollout: its `reset(**row)` "
            "starts an episode from the dataset row (text it returns is appended to the prompt), and its other public "
            "methods are tools (type hints and Google-style docstrings, as for --tools). Needs chat prompts and a "
            "tool-capable chat template (--chat_template_path)."
        },
    )

    def __post_init__(self):
        if isinstance(self.tools, str):  # `tools: my_tools:lookup` in YAML, one name without a list
            self.tools = [self.tools]


def load_data(script_args: SDFTScriptArguments, training_args: SDFTConfig):
    """(train, eval or None, knowledge question sets or None)."""
    wants_eval = training_args.eval_strategy != "no"
    questions = None
    if script_args.eval_questions or script_args.eval_probes:
        if not script_args.eval_questions:
            raise ValueError("--eval_probes goes with --eval_questions: pass your question file too.")
        if not (script_args.dataset_path or script_args.dataset_name):
            raise ValueError(
                "--eval_questions evaluates your own data: pass it with --dataset_path or --dataset_name (the embedded "
                "task has its own questions)."
            )
        if script_args.knowledge_eval:
            from ..demo.knowledge import question_sets_from_files

            questions = question_sets_from_files(
                script_args.eval_questions, script_args.eval_probes, script_args.num_probes
            )
    if script_args.dataset_path:
        train = load_local_dataset(script_args.dataset_path, script_args.dataset_train_split)
        return train, (train if wants_eval else None), questions
    if script_args.dataset_name:
        import datasets

        try:
            loaded = datasets.load_dataset(script_args.dataset_name, script_args.dataset_config)
        except Exception as err:  # offline hub, unknown name, ...: one line with the cause
            raise ValueError(
                f"--dataset_name {script_args.dataset_name!r} could not be loaded ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}). Use --dataset_path for local files."
            ) from None
        if script_args.dataset_train_split not in loaded:
            raise ValueError(f"--dataset_train_split {script_args.dataset_train_split!r} not in {list(loaded)}.")
        evaluation = loaded.get(script_args.dataset_test_split) if wants_eval else None
        return loaded[script_args.dataset_train_split], evaluation, questions
    from ..demo.knowledge import facts_dataset, load_facts, load_probes, question_sets

    facts = load_facts(script_args.num_facts)
    train = facts_dataset(facts)
    questions = question_sets(facts, load_probes(script_args.num_probes)) if script_args.knowledge_eval else None
    return train, (train if wants_eval else None), questions


def resolve_tools(script_args: SDFTScriptArguments) -> tuple[list | None, object | None]:
    """The callables `--tools` and `--environment_factory` name, imported before the model loads; the working directory
    is importable (as for `python -m`), so `--tools my_tools:lookup` finds ./my_tools.py."""
    from .callables import resolve_callable

    if not script_args.tools and not script_args.environment_factory:
        return None, None
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    tools = [resolve_callable(spec, "--tools") for spec in script_args.tools or []] or None
    factory = script_args.environment_factory
    factory = resolve_callable(factory, "--environment_factory") if factory else None
    return tools, factory


def model_init_kwargs(model_args: ModelConfig, training_args: SDFTConfig) -> dict:
    kwargs = dict(training_args.model_init_kwargs or {})
    kwargs.setdefault("revision", model_args.model_revision)
    kwargs.setdefault("trust_remote_code", training_args.trust_remote_code)
    if model_args.attn_implementation is not None:
        kwargs.setdefault("attn_implementation", model_args.attn_implementation)
    if model_args.dtype is not None:
        kwargs.setdefault("dtype", model_args.dtype)
    return kwargs


ARGUMENT_CLASSES = (SDFTScriptArguments, SDFTConfig, ModelConfig)


def build_parser() -> TrlParser:
    """The training command's parser: a flag for every field of `ARGUMENT_CLASSES` (`--config` is taken out of the
    arguments before it parses, by `split_config_flag`). Errors are one ValueError line instead of argparse's usage."""
    parser = TrlParser(ARGUMENT_CLASSES, prog="trl-sdft")

    def one_line_error(message: str):  # argparse would print its whole usage (100+ lines) first
        raise ValueError(f"{message} (`trl-sdft --help` lists every flag).")

    parser.error = one_line_error
    from ..config import dict_fields

    for action in parser._actions:
        if action.dest in dict_fields(SDFTConfig):
            action.type = str  # JSON text, loaded (and checked) by SDFTConfig, as TRL's configs do
    return parser


def parse(argv=None):
    """Flags and a `--config` YAML file into (script, training, model) arguments; bad input is one ValueError line
    naming the flag, or the file, line and option."""
    config_path, argv = split_config_flag(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    if config_path is not None:
        config, lines = load_yaml_config(config_path)
        config = check_yaml_config(config, lines, config_path, parser, ARGUMENT_CLASSES)
        for name, value in config.pop("env", {}).items():
            os.environ[str(name)] = str(value)
        parser.set_defaults_with_config(**config)
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    model_args.model_name_or_path = model_args.model_name_or_path or DEFAULT_MODEL
    return script_args, training_args, model_args


def train(script_args: SDFTScriptArguments, training_args: SDFTConfig, model_args: ModelConfig):
    from transformers import AutoTokenizer

    from ..demo.evaluation import KnowledgeEvalCallback
    from ..trainer import SDFTTrainer

    started = time.time()
    train_dataset, eval_dataset, questions = load_data(script_args, training_args)
    validate_dataset(train_dataset, "train")  # before the model is loaded
    tools, environment_factory = resolve_tools(script_args)
    resume = resolve_resume_from_checkpoint(
        training_args.resume_from_checkpoint, training_args.output_dir, training_args.teacher_model_kind == "ema"
    )
    model_path = resolve_model(model_args.model_name_or_path)
    check_model_path(model_path, "--model_name_or_path")
    output_dir = training_args.output_dir
    if os.path.isdir(model_path) and os.path.isdir(output_dir) and os.path.samefile(model_path, output_dir):
        raise ValueError(
            f"--output_dir {output_dir!r} is the directory of the model being trained (--model_name_or_path): saving "
            "would replace the model it starts from. Choose another --output_dir."
        )
    check_resume_fits(resume, model_path)
    lock = claim_output_dir(  # noqa: F841 (held until the run returns)
        training_args.output_dir,
        script_args.overwrite_output_dir,
        resuming=resume is not None and is_inside(resume, output_dir),  # from elsewhere: the directory's rule holds
        inputs=run_inputs(script_args, training_args, model_path, resume),
    )
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_path,
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
            padding_side="left",
            truncation_side="left",
        )
    except OSError as err:
        raise ValueError(
            f"--model_name_or_path {model_path!r}: no tokenizer could be loaded ({first_line(err)})."
        ) from None
    use_allocator_setting(training_args)
    callbacks = []
    if script_args.agentic_eval:
        from ..demo.agentic import AgenticEvalCallback

        callbacks.append(AgenticEvalCallback(num_probes=script_args.num_probes))
    elif questions is not None:
        callbacks.append(KnowledgeEvalCallback(questions, max_new_tokens=script_args.eval_max_new_tokens))
    trainer = SDFTTrainer(
        model=model_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=get_peft_config(model_args),
        tools=tools,
        environment_factory=environment_factory,
    )
    for callback in callbacks:
        callback.attach(trainer)
    try:
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_model(training_args.output_dir)
    except (ValueError, ImportError) as err:
        if not diagnosed(err):
            raise TrainingFailed() from err
        raise
    if trainer.accelerator.is_main_process:
        name = model_args.model_name_or_path if is_default_alias(model_args.model_name_or_path) else None
        trainer.create_model_card(model_name=name, dataset_name=script_args.dataset_name or script_args.dataset_path)
        print_summary(callbacks[0].results if callbacks else None, time.time() - started, training_args.output_dir)
    return trainer


class TrainingFailed(Exception):
    """An error training raised that trl-sdft did not diagnose (a bug, here or in a library): `main` shows its whole
    traceback instead of one line."""


def diagnosed(err: BaseException) -> bool:
    """Whether `err` was raised by a `raise` statement in trl-sdft's own code: a problem the package recognized and
    explained (a tool environment that fails its reset, a server that stopped answering). A ValueError raised
    anywhere else during training (an unpacking in our code, a check in torch or transformers) is not a usage error,
    and its traceback is what a bug report needs."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return False
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    last = frames[-1]
    return os.path.abspath(last.filename).startswith(package + os.sep) and (last.line or "").startswith("raise")


def run_inputs(script_args, training_args, model_path: str, resume: str | None) -> list[tuple[str, str]]:
    """(flag, path) of every local file or directory the run reads: `--overwrite_output_dir` must not remove them."""
    template = training_args.chat_template_path
    return [
        ("--model_name_or_path", model_path),
        ("--dataset_path", script_args.dataset_path),
        ("--eval_questions", script_args.eval_questions),
        ("--eval_probes", script_args.eval_probes),
        ("--chat_template_path", template if template and os.path.exists(template) else None),
        ("--resume_from_checkpoint", resume),
    ]


def check_resume_fits(resume: str | None, model_path: str) -> None:
    """Before the model loads: a checkpoint of another model (its config.json against the model's) is named as such."""
    import json

    from ..checkpoints import model_mismatch

    config_path = os.path.join(model_path, "config.json")
    if resume is None or not os.path.isfile(config_path):
        return
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return  # the model's own load reports it
    mismatch = model_mismatch(resume, config if isinstance(config, dict) else None)
    if mismatch:
        raise ValueError(
            f"--resume_from_checkpoint {resume!r} {mismatch} (--model_name_or_path {model_path!r}): resume with the "
            "model it was trained from, or start without --resume_from_checkpoint."
        )


def use_allocator_setting(training_args: SDFTConfig) -> None:
    """The CLI owns its process: on a CPU it turns on malloc's reuse of freed blocks (`reuse_cpu_memory`), which the
    library leaves off unless asked, and says so."""
    from ..utils import has_accelerator

    on_cpu = training_args.use_cpu or not has_accelerator()
    if training_args.reuse_cpu_memory is None and on_cpu:
        training_args.reuse_cpu_memory = True
        print(
            "trl-sdft: this process keeps large freed CPU memory blocks for reuse (malloc thresholds raised: faster "
            "CPU steps); --reuse_cpu_memory false turns it off",
            file=sys.stderr,
            flush=True,
        )


def print_summary(results: dict | None, seconds: float, output_dir: str) -> None:
    lines = ["", "=" * 60, "SDFT summary"]
    if results and results.get("baseline") and results.get("final"):
        lines.append(f"{'':18}{'baseline':>12}{'final':>12}")
        for key, before in results["baseline"].items():  # new_facts, paraphrases, general_probes; or the agentic rates
            after = results["final"].get(key)
            if not isinstance(before, dict) or not isinstance(after, dict) or "accuracy" not in before:
                continue
            lines.append(
                f"{key:18}{before['correct']:>5}/{before['total']:<3} {before['accuracy']:>4.0%}"
                f"{after['correct']:>5}/{after['total']:<3} {after['accuracy']:>4.0%}"
            )
        lines.append(f"answers and accuracies: {os.path.join(output_dir, 'results.json')}")
    lines += [f"wall time: {seconds / 60:.1f} min", f"model saved to: {output_dir}", "=" * 60]
    print("\n".join(lines), flush=True)


def vllm_serve_parser() -> argparse.ArgumentParser:
    """The flags `trl-sdft vllm-serve` reads itself; any other flag goes to vLLM's server unchanged."""
    parser = argparse.ArgumentParser(prog="trl-sdft vllm-serve", description=vllm_serve_command.__doc__)
    parser.add_argument("--model", required=True, help=f"path, hub id or {DEFAULT_MODEL!r}")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only). The server runs with VLLM_SERVER_DEV_MODE=1, so "
        "anyone who can reach the port can replace the model's weights and call RPC methods in the server: bind "
        "another address (e.g. 0.0.0.0, for trainers on other hosts) only on a trusted network.",
    )
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    return parser


def vllm_serve_command(argv: list[str], cuda: bool | None = None) -> tuple[list[str], dict[str, str]]:
    """The command and environment of `trl-sdft vllm-serve`: vLLM's OpenAI server with what the trainer needs.

    Development endpoints on (`VLLM_SERVER_DEV_MODE=1`: weight reloads, RPC, server info; hence loopback by
    default), every log-prob available (teacher scoring), and an NCCL weight-transfer engine on GPU machines. On CPU:
    float32, an eager engine and 20% of the host memory for the KV cache, unless the flags say otherwise. Other flags
    go to vLLM unchanged.
    """
    known, rest = vllm_serve_parser().parse_known_args(argv)
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_model(known.model)]
    command += ["--host", known.host, "--port", str(known.port), "--max-logprobs", "-1"]
    command += ["--logprobs-mode", "processed_logprobs"]
    given = {flag.split("=")[0] for flag in rest if flag.startswith("--")}
    if cuda:
        if "--weight-transfer-config" not in given:
            command += ["--weight-transfer-config", '{"backend": "nccl"}']
    else:
        defaults = {"--dtype": ["float32"], "--enforce-eager": [], "--gpu-memory-utilization": ["0.2"]}
        for flag, values in defaults.items():
            if flag not in given:
                command += [flag, *values]
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
    return command + rest, env


def vllm_serve(argv: list[str]) -> int:
    try:
        command, env = vllm_serve_command(argv)
    except ModelUnavailableError as err:
        print(f"trl-sdft: error: {err}", file=sys.stderr)
        return 2
    print("trl-sdft: starting", " ".join(command), file=sys.stderr, flush=True)
    os.execvpe(command[0], command, env)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["vllm-serve"]:
        return vllm_serve(argv[1:])
    if argv[:1] == ["continual"]:
        from .continual import main as continual_main

        return continual_main(argv[1:])
    warning = dropped_engine()
    if warning:
        print(warning, file=sys.stderr, flush=True)
    try:
        relaunched = relaunch_cpu_processes(argv)
    except ValueError as err:
        print(f"trl-sdft: error: {err}", file=sys.stderr)
        return 2
    if relaunched is not None:
        return relaunched
    code = 1  # an unexpected exception propagates; the teardown watchdog exits with 1 then
    try:
        script_args, training_args, model_args = parse(argv)
        train(script_args, training_args, model_args)
        code = 0
    except TrainingFailed as failed:
        raise failed.__cause__ from None  # not a usage error: the traceback of where it was raised
    except (ValueError, ImportError, ModelUnavailableError, VLLMServerError) as err:
        # Usage errors: anything before training starts (arguments, files, model, dataset, the trainer's checks), and
        # during training what trl-sdft itself diagnosed (`diagnosed`) or a vLLM server that stopped answering.
        code = 2
        if os.environ.get("TRL_SDFT_TRACEBACK"):
            raise
        print(f"trl-sdft: error: {err}", file=sys.stderr)
    finally:
        close_process_group(exit_code=code)
    return code
