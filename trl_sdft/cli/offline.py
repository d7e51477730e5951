"""`python scripts/extract_logits.py`: a teacher's top-K logits at every assistant token, to Parquet.

Several processes: `torchrun --nproc_per_node N scripts/extract_logits.py ...` (gloo on CPU, NCCL on GPUs).
"""

import argparse
import dataclasses
import os
import sys
import time

import pyarrow as pa
import torch

from ..demo.default_model import DEFAULT_MODEL, ModelUnavailableError, resolve_model
from ..models import check_model_path
from ..offline.checks import check_distinct_paths, check_trainer_values, check_writable, first_line, same_file
from ..offline.extract import (
    ExtractionSettings,
    check_filtered,
    check_resumable,
    extract_shard,
    file_fingerprint,
    merge,
    plan,
    read_settings,
    vocab_fingerprint,
    write_filtered,
)
from ..offline.records import read_records
from ..utils import ensure_pad_token
from .launch import close_process_group
from .output_dir import MODEL_FILES, OutputDirLock, foreign_files, is_main_process

# What the CLIs print as one line (`<prog>: error: ...`, exit 2); TRL_SDFT_TRACEBACK=1 shows the traceback instead.
USER_ERRORS = (ValueError, OSError, pa.ArrowException, ImportError, ModelUnavailableError)


def check_output_dir(output_dir: str, model_path: str, overwrite: bool) -> None:
    """The student is never saved over the model it was loaded from, nor over another finished model unless
    `--overwrite` says so."""
    if os.path.isdir(model_path) and same_file(output_dir, model_path):
        raise ValueError(
            f"--output_dir {output_dir!r} is the student model's directory (model_name {model_path!r}): saving would "
            "overwrite the model trained from. Choose another --output_dir."
        )
    if os.path.isdir(output_dir) and not overwrite:
        found = [name for name in MODEL_FILES if os.path.exists(os.path.join(output_dir, name))]
        if found:
            raise ValueError(
                f"--output_dir {output_dir!r} holds a finished model already ({', '.join(found)}): pass --overwrite to "
                "replace it, or choose another --output_dir."
            )
        foreign = foreign_files(output_dir)
        if foreign:
            raise ValueError(
                f"--output_dir {output_dir!r} holds {', '.join(foreign)}, which saving the student would write over "
                "(not an earlier run's): move it, pass --overwrite to replace it, or choose another --output_dir."
            )
    check_writable(output_dir, "--output_dir", directory=True)


def extract_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/extract_logits.py", description=__doc__.splitlines()[0])
    # The offline pipeline's users type `--input_file` and `--filtered_data`; the longer names are kept as aliases.
    p.add_argument(
        "--input_file",
        "--data_file",
        dest="data_file",
        required=True,
        help="JSON or JSONL; each record {'messages': [{role, content}, ...]}",
    )
    p.add_argument("--output_file", required=True, help="the Parquet file to write")
    p.add_argument(
        "--filtered_data",
        "--filtered_data_file",
        dest="filtered_data_file",
        required=True,
        help="JSONL of the kept records, in the Parquet's row order",
    )
    p.add_argument("--model_name", default=DEFAULT_MODEL, help="teacher: a path, a hub id or smollm2-135m-instruct")
    p.add_argument("--topk", type=int, default=100, help="logits kept per token (K)")
    p.add_argument("--max_length", type=int, default=2048, help="records with more tokens are skipped")
    p.add_argument("--batch_size", type=int, default=8, help="records per teacher forward")
    p.add_argument("--sort_by_len", action="store_true", help="process (and write) records shortest first")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --filtered_data file that holds other records"
    )
    return p


def load_tokenizer(name: str, flag: str):
    """The model path and its tokenizer; a model that cannot be found is one line naming it, not a hub traceback."""
    from transformers import AutoTokenizer

    path = resolve_model(name)
    local = os.path.isabs(path) or path.startswith(".") or os.path.exists(path)
    if local and not os.path.isdir(path):
        raise ValueError(f"{flag} {name!r}: no such model directory; pass a model directory or a hub id.")
    check_model_path(path, flag)  # a cut-short weight file is named here, not a traceback after the data checks
    try:
        return path, AutoTokenizer.from_pretrained(path)
    except Exception as err:  # hub errors, missing tokenizer files, ...: one line with the cause
        raise ValueError(
            f"{flag} {name!r}: its tokenizer could not be loaded ({type(err).__name__}: {first_line(err)}); pass a "
            "model directory with tokenizer files, or a hub id."
        ) from None


def logits_width(model_path: str, tokenizer) -> int:
    """The model's vocabulary dimension (its logits' width) from its config, without loading the weights; the
    tokenizer's size where the config cannot tell."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path)
    except Exception:  # no config: the model load reports it
        return len(tokenizer)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None) or len(tokenizer)


def _distributed() -> tuple[int, int]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world_size


def run_extraction(args: argparse.Namespace, log=print) -> dict:
    from transformers import AutoModelForCausalLM

    if args.topk < 1 or args.batch_size < 1 or args.max_length < 2:
        raise ValueError("--topk and --batch_size must be >= 1 and --max_length >= 2.")
    paths = {
        "--input_file": args.data_file,
        "--output_file": args.output_file,
        "--filtered_data": args.filtered_data_file,
    }
    check_distinct_paths(paths)
    check_writable(args.output_file, "--output_file")
    check_writable(args.filtered_data_file, "--filtered_data")
    records = read_records(args.data_file)
    if not records:
        raise ValueError(f"--input_file {args.data_file!r} holds no records (the file is empty).")
    rank, world_size = _distributed()
    log = log if rank == 0 else None
    started = time.time()
    model_path, tokenizer = load_tokenizer(args.model_name, "--model_name")
    vocab = min(len(tokenizer), logits_width(model_path, tokenizer))
    if args.topk > vocab:
        raise ValueError(
            f"--topk {args.topk} is larger than the teacher's vocabulary ({vocab} tokens), so no row could hold K "
            f"logits per token; pass --topk {vocab} or less."
        )
    settings = ExtractionSettings(
        model_name=args.model_name,
        topk=args.topk,
        max_length=args.max_length,
        sort_by_len=args.sort_by_len,
        batch_size=args.batch_size,
        data_hash=file_fingerprint(args.data_file),
        tokenizer=tokenizer.name_or_path if not os.path.isdir(str(tokenizer.name_or_path)) else args.model_name,
        vocab_size=len(tokenizer),
        vocab_hash=vocab_fingerprint(tokenizer),
    )
    check_resumable(args.output_file, settings)
    items, kept_messages, skips = plan(records, tokenizer, args.max_length, args.sort_by_len)
    if not items:
        raise ValueError(
            f"--input_file {args.data_file!r}: none of its {len(records)} records can be used ({skips.summary()}); "
            'each needs {"messages": [{"role", "content"}, ...]} with one assistant turn, within --max_length tokens.'
        )
    tokens, extract_started = 0, time.time()
    if not os.path.exists(args.output_file):
        check_filtered(items, kept_messages, args.filtered_data_file, args.overwrite)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, args.dtype))
        model.eval()
        if torch.cuda.is_available():
            model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        pad = ensure_pad_token(tokenizer).pad_token_id
        tokens = extract_shard(model, items, settings, args.output_file, pad, rank, world_size, log)
        if world_size > 1:
            torch.distributed.barrier()
        if rank == 0:
            merge(items, kept_messages, settings, args.output_file, args.filtered_data_file)
        if world_size > 1:
            torch.distributed.barrier()
    elif rank == 0:
        if log:
            log(f"{args.output_file} is complete already (same settings): nothing to extract")
        if not os.path.exists(args.filtered_data_file):
            write_filtered(items, kept_messages, args.filtered_data_file)
    seconds = time.time() - started
    extract_seconds = time.time() - extract_started
    summary = {
        "records": len(records),
        "kept": len(items),
        "skipped": dict(skips.reasons),
        "assistant_tokens": sum(item.end - item.start for item in items),
        "input_tokens": sum(len(item.input_ids) for item in items),
        "tokens_this_run_rank0": tokens,
        "seconds": round(seconds, 2),
        "extract_seconds": round(extract_seconds, 2),  # model load, forwards, writes and merge
    }
    if log:
        log(f"kept {len(items)} of {len(records)} records; {skips.summary()}")
        log(f"wrote {args.output_file} (top-{args.topk}) and {args.filtered_data_file} in {seconds:.1f} s")
    if world_size > 1:
        close_process_group()
    return summary


def report(prog: str, err: BaseException) -> int:
    """One line on stderr for an error the user can fix; exit status 2."""
    if os.environ.get("TRL_SDFT_TRACEBACK"):
        raise err
    message = first_line(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {first_line(err)}"
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def extract_main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = extract_parser().parse_args(argv)
    try:
        run_extraction(args)
    except USER_ERRORS as err:
        return report("extract_logits", err)
    return 0


__all__ = ["extract_main", "extract_parser", "read_records", "read_settings", "run_extraction"]


def distill_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/distill_sft.py",
        description="Distil a student on stored teacher top-K logits: SFT + loss_multi * KD (TRL SFTTrainer).",
    )
    p.add_argument("--config_file", required=True, help="JSON with sections trainer, lora, train, validation")
    p.add_argument("--output_dir", required=True, help="where the model and tokenizer are saved")
    p.add_argument("--overwrite", action="store_true", help="replace a finished model already in --output_dir")
    return p


def _set_special_tokens(tokenizer, config) -> None:
    vocab = tokenizer.get_vocab()
    for name in ("bos_token", "eos_token", "pad_token"):
        token = getattr(config, name)
        if token is None:
            continue
        if token not in vocab:
            raise ValueError(f"{name} {token!r} is not in the student's vocabulary; pick an existing token.")
        setattr(tokenizer, name, token)
    ensure_pad_token(tokenizer)


def _lora_config(config, config_file: str):
    if not config.lora:
        return None
    from peft import LoraConfig

    lora = dict(config.lora)
    peft_config = LoraConfig(
        r=lora.pop("r", 16),
        lora_alpha=lora.pop("alpha", 32),
        lora_dropout=lora.pop("dropout", 0.05),
        bias=lora.pop("bias", "none"),
        target_modules=lora.pop("target_modules", "all-linear"),
        modules_to_save=lora.pop("modules_to_save", None),
        task_type="CAUSAL_LM",
    )
    if lora:
        raise ValueError(f"{config_file}: unknown `lora` keys {sorted(lora)}.")
    return peft_config


def run_distillation(config_file: str, output_dir: str, log=print, overwrite: bool = False):
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from ..offline.distill import DistillConfig, DistillSFTTrainer, TopKCollator, build_rows, check_quantization

    config = DistillConfig.from_file(config_file)
    quantization = check_quantization(config)
    known = {f.name for f in dataclasses.fields(SFTConfig)}
    unknown = sorted(set(config.trainer) - known)
    if unknown:
        raise ValueError(f"{config_file}: `trainer` has keys that are not SFTConfig fields: {unknown}.")
    model_path = resolve_model(config.model_name)
    check_output_dir(output_dir, model_path, overwrite)
    model_path, tokenizer = load_tokenizer(config.model_name, f"{config_file}: model_name")
    _set_special_tokens(tokenizer, config)
    vocab_size = logits_width(model_path, tokenizer)
    train, train_table, topk, too_long = build_rows(
        config.train["data_path"],
        config.train["teacher_logits"],
        tokenizer,
        config.max_seq_length,
        config.only_target_loss,
        vocab_size=vocab_size,
    )
    tables, eval_dataset = {"train": train_table}, None
    if config.validation:
        eval_dataset, tables["validation"], eval_topk, _ = build_rows(
            config.validation["data_path"],
            config.validation["teacher_logits"],
            tokenizer,
            config.max_seq_length,
            config.only_target_loss,
            source="validation",
            vocab_size=vocab_size,
        )
        if eval_topk != topk:
            raise ValueError(f"train logits are top-{topk} but validation logits top-{eval_topk}; extract both alike.")
    if log:
        log(f"{len(train)} training rows (top-{topk} teacher logits), {too_long} longer than max_seq_length skipped")
    trainer_args = {
        "report_to": "none",
        "use_cpu": not torch.cuda.is_available(),
        **config.trainer,
        "output_dir": output_dir,
        "gradient_checkpointing": config.gradient_checkpointing,
        "max_length": config.max_seq_length,
        "remove_unused_columns": False,
        "dataset_kwargs": {"skip_prepare_dataset": True},
    }
    check_trainer_values(config_file, config.trainer, SFTConfig)
    try:
        args = SFTConfig(**trainer_args)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_file}: `trainer`: {first_line(err)}") from None
    try:
        peft_config = _lora_config(config, config_file)
    except TypeError as err:
        raise ValueError(f"{config_file}: `lora`: {first_line(err)}") from None
    os.makedirs(output_dir, exist_ok=True)  # every input is checked: now the run owns its directory
    lock = OutputDirLock(output_dir) if is_main_process() else None  # noqa: F841 (held until the run returns)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, **quantization)
    collator = TopKCollator(tables, topk, tokenizer.pad_token_id)
    trainer = DistillSFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=collator,
        peft_config=peft_config,
        loss_multi=config.loss_multi,
        per_token=config.per_token,
        adaptive_kd=config.adaptive_kd,
    )
    trainer.train()
    trainer.save_model(output_dir)
    tokenizer.save_pretrained(output_dir)
    if log:
        log(f"model and tokenizer saved to {output_dir}")
    return trainer


def distill_main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = distill_parser().parse_args(argv)
    try:
        run_distillation(args.config_file, args.output_dir, overwrite=args.overwrite)
    except USER_ERRORS as err:
        return report("distill_sft", err)
    return 0
