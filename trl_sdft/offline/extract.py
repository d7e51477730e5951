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

from .checks import first_line
from .records import (
    POSITIONS_RULE,
    ROW_HASH_RULE,
    SkipCounter,
    normalize_record,
    token_hash,
    tokenize_with_assistant_span,
)

SCHEMA = pa.schema(
    [
        ("idx", pa.int64()),
        ("topk_indices", pa.list_(pa.int32())),
        ("topk_values", pa.list_(pa.float32())),
        ("input_hash", pa.string()),  # token_hash of the record's input ids: ties the row to its record's content
    ]
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
    row_hash: str = ROW_HASH_RULE


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
    """The extraction settings stored in a Parquet file's metadata ({} when it has none)."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (pa.ArrowException, OSError) as err:
        raise ValueError(
            f"{path} is not a readable Parquet file ({first_line(err)}); re-create it with extract_logits.py."
        ) from None
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
        if not torch.isfinite(values).all():
            raise ValueError(
                f"the teacher's logits for input record idx {item.idx} are non-finite (NaN or inf); a student must not "
                "train on them, so its batch was not written. Check the teacher model (float16 logits overflow: use "
                "--dtype float32 or bfloat16)."
            )
        results.append((indices.flatten().int().tolist(), values.flatten().tolist()))
    return results


def _write_table(path: str, rows: list[tuple[int, list[int], list[float], str]], settings: ExtractionSettings) -> None:
    table = pa.table(
        {
            "idx": pa.array([r[0] for r in rows], pa.int64()),
            "topk_indices": pa.array([r[1] for r in rows], pa.list_(pa.int32())),
            "topk_values": pa.array([r[2] for r in rows], pa.list_(pa.float32())),
            "input_hash": pa.array([r[3] for r in rows], pa.string()),
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
        try:
            stored = read_settings(path)
        except ValueError:
            stored = {}
        if not stored:
            raise ValueError(
                f"--output_file {output!r}: {path} exists and is not a Parquet file written by extract_logits.py; "
                "nothing was overwritten. Choose another --output_file (or delete that file)."
            )
        if "row_hash" not in stored:
            raise ValueError(
                f"{path} was written by an older extract_logits.py (without the per-row `input_hash`), which "
                "distill_sft.py no longer accepts; delete it (and any parts) and re-extract, or choose another "
                "--output_file."
            )
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
    try:
        return _extract_batches(model, items, settings, output, pad_token_id, rank, world_size, log)
    except BaseException:
        if world_size == 1 and not os.listdir(parts_dir(output)):  # nothing to resume from: leave nothing behind
            shutil.rmtree(parts_dir(output), ignore_errors=True)
        raise


def _extract_batches(model, items, settings, output, pad_token_id, rank, world_size, log) -> int:
    done = written_parts(output)
    batches = range(0, len(items), settings.batch_size)
    tokens = 0
    started = time.time()
    for number, start in enumerate(batches):
        if number % world_size != rank or number in done:
            continue
        batch = items[start : start + settings.batch_size]
        results = topk_for_batch(model, batch, settings.topk, pad_token_id)
        rows = [
            (item.idx, indices, values, token_hash(item.input_ids)) for item, (indices, values) in zip(batch, results)
        ]
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
        raise ValueError(f"Cannot merge: {len(missing)} batches were not written (first: {missing[0]}); re-run.")
    tmp = output + ".tmp"
    writer = pq.ParquetWriter(tmp, SCHEMA.with_metadata(file_metadata(settings)))
    rows = 0
    try:
        for number in range(num_batches):
            table = pq.read_table(parts[number]).cast(SCHEMA)
            expected = [item.idx for item in items[number * settings.batch_size : (number + 1) * settings.batch_size]]
            if table.column("idx").to_pylist() != expected:
                raise ValueError(
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


def filtered_lines(items: list[Item], kept_messages: list[list]):
    for item, messages in zip(items, kept_messages):
        yield json.dumps({"idx": item.idx, "messages": messages}, ensure_ascii=False) + "\n"


def check_filtered(items: list[Item], kept_messages: list[list], path: str, overwrite: bool) -> None:
    """An existing --filtered_data file is replaced only by the same records (another top-K of the same data) or
    with `--overwrite`: it may be a file the user still needs."""
    if overwrite or not os.path.exists(path):
        return
    with open(path, "rb") as f:
        if f.read() == "".join(filtered_lines(items, kept_messages)).encode("utf-8"):
            return
    raise ValueError(
        f"--filtered_data {path!r} exists and holds other records than this extraction keeps; pass --overwrite to "
        "replace it, or choose another --filtered_data."
    )


def write_filtered(items: list[Item], kept_messages: list[list], path: str) -> None:
    """The kept records (`idx` and normalised messages), one per line, in the Parquet's row order."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(filtered_lines(items, kept_messages))
    os.replace(path + ".tmp", path)
