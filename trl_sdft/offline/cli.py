"""`python scripts/extract_logits.py`: a teacher's top-K logits at every assistant token, to Parquet.

Several processes: `torchrun --nproc_per_node N scripts/extract_logits.py ...` (gloo on CPU, NCCL on GPUs).
"""

import argparse
import json
import os
import sys
import time

import torch

from ..models import DEFAULT_MODEL, resolve_model
from .extract import (
    ExtractionSettings,
    check_resumable,
    extract_shard,
    merge,
    plan,
    read_settings,
    vocab_fingerprint,
    write_filtered,
)


def extract_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/extract_logits.py", description=__doc__.splitlines()[0])
    p.add_argument("--data_file", required=True, help="JSON or JSONL; each record {'messages': [{role, content}, ...]}")
    p.add_argument("--output_file", required=True, help="the Parquet file to write")
    p.add_argument("--filtered_data_file", required=True, help="JSONL of the kept records, in the Parquet's row order")
    p.add_argument("--model_name", default=DEFAULT_MODEL, help="teacher: a path, a hub id or smollm2-135m-instruct")
    p.add_argument("--topk", type=int, default=100)
    p.add_argument("--max_length", type=int, default=2048, help="records with more tokens are skipped")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--sort_by_len", action="store_true", help="process (and write) records shortest first")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return p


def read_records(path: str) -> list:
    """Records through `datasets`; files whose records `datasets` cannot unify are read line by line instead."""
    if not os.path.isfile(path):
        raise ValueError(f"--data_file {path!r} does not exist.")
    from datasets import load_dataset

    try:
        return list(load_dataset("json", data_files=path, split="train"))
    except Exception:  # mixed record shapes: malformed records are counted and skipped below, not fatal
        with open(path) as f:
            text = f.read()
        if path.endswith(".json") and text.lstrip().startswith("["):
            return json.loads(text)
        records = []
        for line in text.splitlines():
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    records.append(None)  # counted as "no messages"
        return records


def _distributed() -> tuple[int, int]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world_size


def run_extraction(args: argparse.Namespace, log=print) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.topk < 1 or args.batch_size < 1 or args.max_length < 2:
        raise ValueError("--topk and --batch_size must be >= 1 and --max_length >= 2.")
    rank, world_size = _distributed()
    log = log if rank == 0 else None
    started = time.time()
    records = read_records(args.data_file)
    model_path = resolve_model(args.model_name)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    settings = ExtractionSettings(
        model_name=args.model_name,
        topk=args.topk,
        max_length=args.max_length,
        sort_by_len=args.sort_by_len,
        batch_size=args.batch_size,
        tokenizer=tokenizer.name_or_path if not os.path.isdir(str(tokenizer.name_or_path)) else args.model_name,
        vocab_size=len(tokenizer),
        vocab_hash=vocab_fingerprint(tokenizer),
    )
    check_resumable(args.output_file, settings)
    items, kept_messages, skips = plan(records, tokenizer, args.max_length, args.sort_by_len)
    tokens = 0
    if not os.path.exists(args.output_file):
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, args.dtype))
        model.eval()
        if torch.cuda.is_available():
            model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
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
            write_filtered(kept_messages, args.filtered_data_file)
    seconds = time.time() - started
    summary = {
        "records": len(records),
        "kept": len(items),
        "skipped": dict(skips.reasons),
        "assistant_tokens": sum(item.end - item.start for item in items),
        "tokens_this_run_rank0": tokens,
        "seconds": round(seconds, 2),
    }
    if log:
        log(f"kept {len(items)} of {len(records)} records; {skips.summary()}")
        log(f"wrote {args.output_file} (top-{args.topk}) and {args.filtered_data_file} in {seconds:.1f} s")
    if world_size > 1:
        torch.distributed.destroy_process_group()
    return summary


def extract_main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = extract_parser().parse_args(argv)
    try:
        run_extraction(args)
    except ValueError as err:
        print(f"extract_logits: error: {err}", file=sys.stderr)
        return 2
    return 0


__all__ = ["extract_main", "extract_parser", "read_records", "read_settings", "run_extraction"]
