"""Extract a teacher's top-K logits at every assistant token into Parquet, once, for many distillation runs.

The work is cut into batches of the kept records (in input order, or by length with `sort_by_len`); process r of W
takes batches r, r + W, ... so every batch, and so every number, is the same whatever the process count. Each batch
is written at once as a small part file under `<output>.parts/` (atomically), so an interrupted run loses at most the
batches in flight and a re-run skips every idx already written. When all parts exist, process 0 merges them into
`<output>` in the planned order, row group by row group, with the kept records in the same order in
`filtered_data_file`, then removes the parts.
"""

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .records import POSITIONS_RULE, SkipCounter, normalize_record, tokenize_with_assistant_span

SCHEMA = pa.schema(
    [("idx", pa.int64()), ("topk_indices", pa.list_(pa.int32())), ("topk_values", pa.list_(pa.float32()))]
)
META_PREFIX = "trl_sdft."
MERGE_ROW_GROUP = 256


@dataclass
class ExtractionSettings:
    """What makes two extractions interchangeable; stored in the file metadata and checked on resume."""

    model_name: str
    topk: int
    max_length: int
    sort_by_len: bool
    batch_size: int
    positions: str = POSITIONS_RULE
    data_hash: str = ""
    tokenizer: str = ""
    vocab_size: int = 0
    vocab_hash: str = ""


def vocab_fingerprint(tokenizer) -> str:
    """A hash of the token -> id map: equal hashes mean the same vocabulary."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def file_fingerprint(path: str) -> str:
    """A hash of the input file's bytes: a resumed extraction must read the same records."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def file_metadata(settings: ExtractionSettings) -> dict[bytes, bytes]:
    return {(META_PREFIX + key).encode(): json.dumps(value).encode() for key, value in asdict(settings).items()}


def read_settings(path: str) -> dict:
    """The extraction settings stored in a Parquet file's metadata."""
    metadata = pq.read_schema(path).metadata or {}
    return {
        key.decode()[len(META_PREFIX) :]: json.loads(value)
        for key, value in metadata.items()
        if key.decode().startswith(META_PREFIX)
    }


@dataclass
class Item:
    idx: int
    input_ids: list[int]
    start: int
    end: int


def plan(records: list, tokenizer, max_length: int, sort_by_len: bool) -> tuple[list[Item], list[list], SkipCounter]:
    """Kept items in processing order, their normalised messages (same order), and the skip counts."""
    skips = SkipCounter()
    items, kept_messages = [], []
    for idx, record in enumerate(records):
        messages, reason = normalize_record(record)
        if messages is None:
            skips.add(reason)
            continue
        input_ids, start, end = tokenize_with_assistant_span(tokenizer, messages)
        if len(input_ids) > max_length:
            skips.add(f"longer than max_length {max_length}")
            continue
        if start == 0 or end <= start:
            skips.add("no assistant tokens")
            continue
        items.append(Item(idx, input_ids, start, end))
        kept_messages.append(messages)
    if sort_by_len:
        order = sorted(range(len(items)), key=lambda i: (len(items[i].input_ids), items[i].idx))
        items = [items[i] for i in order]
        kept_messages = [kept_messages[i] for i in order]
    return items, kept_messages, skips


@torch.no_grad()
def topk_for_batch(model, items: list[Item], topk: int, pad_token_id: int) -> list[tuple[list[int], list[float]]]:
    """Per item: the flattened (position-major) top-K indices and logits predicting each assistant token."""
    width = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        input_ids[row, : len(item.input_ids)] = torch.tensor(item.input_ids)
        attention_mask[row, : len(item.input_ids)] = 1
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    results = []
    for row, item in enumerate(items):
        predicting = logits[row, item.start - 1 : item.end - 1].float()  # logits at t-1 predict token t
        values, indices = predicting.topk(min(topk, predicting.shape[-1]), dim=-1)
        results.append((indices.flatten().int().tolist(), values.flatten().tolist()))
    return results


def _write_table(path: str, rows: list[tuple[int, list[int], list[float]]], settings: ExtractionSettings) -> None:
    table = pa.table(
        {
            "idx": pa.array([r[0] for r in rows], pa.int64()),
            "topk_indices": pa.array([r[1] for r in rows], pa.list_(pa.int32())),
            "topk_values": pa.array([r[2] for r in rows], pa.list_(pa.float32())),
        },
        schema=SCHEMA.with_metadata(file_metadata(settings)),
    )
    tmp = path + ".tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def parts_dir(output: str) -> str:
    return output + ".parts"


def written_parts(output: str) -> dict[int, str]:
    """batch number -> part file, for the parts already written."""
    directory = parts_dir(output)
    if not os.path.isdir(directory):
        return {}
    parts = {}
    for name in os.listdir(directory):
        if name.startswith("batch-") and name.endswith(".parquet"):
            parts[int(name[len("batch-") : -len(".parquet")])] = os.path.join(directory, name)
    return parts


def check_resumable(output: str, settings: ExtractionSettings) -> None:
    """Parts (or a finished file) from another extraction must not be mixed into this one."""
    for path in [output] if os.path.exists(output) else list(written_parts(output).values())[:1]:
        stored = read_settings(path)
        changed = {key: (stored.get(key), value) for key, value in asdict(settings).items() if stored.get(key) != value}
        if changed:
            details = ", ".join(f"{key}: {old!r} there, {new!r} now" for key, (old, new) in changed.items())
            raise ValueError(
                f"{path} was written by an extraction with other settings ({details}). Re-run with the same "
                "settings to resume, or choose another --output_file (or delete the old one)."
            )


def extract_shard(
    model,
    items: list[Item],
    settings: ExtractionSettings,
    output: str,
    pad_token_id: int,
    rank: int = 0,
    world_size: int = 1,
    log=print,
) -> int:
    """Write the missing batches of this process's shard; returns the number of assistant tokens processed."""
    os.makedirs(parts_dir(output), exist_ok=True)
    done = written_parts(output)
    batches = range(0, len(items), settings.batch_size)
    tokens = 0
    started = time.time()
    for number, start in enumerate(batches):
        if number % world_size != rank or number in done:
            continue
        batch = items[start : start + settings.batch_size]
        results = topk_for_batch(model, batch, settings.topk, pad_token_id)
        rows = [(item.idx, indices, values) for item, (indices, values) in zip(batch, results)]
        _write_table(os.path.join(parts_dir(output), f"batch-{number:07d}.parquet"), rows, settings)
        tokens += sum(item.end - item.start for item in batch)
        if log and number // world_size % 20 == 0:
            rate = tokens / max(time.time() - started, 1e-9)
            log(f"[rank {rank}] batch {number + 1}/{len(batches)}: {tokens} assistant tokens, {rate:.0f} tokens/s")
    return tokens


def merge(
    items: list[Item],
    kept_messages: list[list],
    settings: ExtractionSettings,
    output: str,
    filtered_data_file: str | None,
) -> int:
    """Join the parts into `output` in the planned order (one part in memory at a time); write the kept records."""
    parts = written_parts(output)
    num_batches = (len(items) + settings.batch_size - 1) // settings.batch_size
    missing = [number for number in range(num_batches) if number not in parts]
    if missing:
        raise RuntimeError(f"Cannot merge: {len(missing)} batches were not written (first: {missing[0]}); re-run.")
    tmp = output + ".tmp"
    writer = pq.ParquetWriter(tmp, SCHEMA.with_metadata(file_metadata(settings)))
    rows = 0
    try:
        for number in range(num_batches):
            table = pq.read_table(parts[number]).cast(SCHEMA)
            expected = [item.idx for item in items[number * settings.batch_size : (number + 1) * settings.batch_size]]
            if table.column("idx").to_pylist() != expected:
                raise RuntimeError(
                    f"{parts[number]} does not hold the planned records {expected[:3]}...; delete "
                    f"{parts_dir(output)} and re-run."
                )
            writer.write_table(table, row_group_size=MERGE_ROW_GROUP)
            rows += table.num_rows
    finally:
        writer.close()
    if filtered_data_file:
        write_filtered(items, kept_messages, filtered_data_file)
    os.replace(tmp, output)
    shutil.rmtree(parts_dir(output), ignore_errors=True)
    return rows


def write_filtered(items: list[Item], kept_messages: list[list], path: str) -> None:
    """The kept records (`idx` and normalised messages), one per line, in the Parquet's row order."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        for item, messages in zip(items, kept_messages):
            f.write(json.dumps({"idx": item.idx, "messages": messages}, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
