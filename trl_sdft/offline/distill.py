"""Distil a student on stored teacher top-K logits: `SFT + loss_multi * KD`, on TRL's SFTTrainer.

The chat records (the extraction's filtered JSONL) are tokenized with the student's chat template; each row keeps its
`idx`, and the collator joins the Parquet rows by `idx` and places the teacher's top-K at the logit positions that
predict the assistant tokens. Every mismatch between the two files, or with the student's tokenizer, is an error
before training.
"""

import json
import os
from dataclasses import dataclass, field, fields

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets import Dataset
from trl import SFTTrainer

from ..text_files import read_text
from .checks import check_number, first_line, scan_logits
from .extract import SCHEMA, read_settings, vocab_fingerprint
from .kd import sft_kd_loss
from .records import (
    POSITIONS_RULE,
    ROW_HASH_RULE,
    normalize_record,
    read_records,
    token_hash,
    tokenize_with_assistant_span,
)

SCAN_ROWS = 4096  # rows per record batch of the logits check


@dataclass
class DistillConfig:
    """The JSON config of scripts/distill_sft.py (sections `trainer`, `lora`, `train`, `validation`)."""

    train: dict
    model_name: str = "smollm2-135m-instruct"
    trainer: dict = field(default_factory=dict)
    lora: dict | None = None
    validation: dict | None = None
    loss_multi: float = 1.0
    only_target_loss: bool = True
    max_seq_length: int = 2048
    per_token: bool = True
    adaptive_kd: bool = False
    gradient_checkpointing: bool = False
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None

    @classmethod
    def from_file(cls, path: str) -> "DistillConfig":
        try:
            raw = json.loads(read_text(path, "--config_file"))
        except FileNotFoundError:
            raise ValueError(f"--config_file {path!r} does not exist.") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"--config_file {path!r} is not valid JSON ({err}).") from None
        except OSError as err:
            raise ValueError(f"--config_file {path!r} cannot be read ({first_line(err)}).") from None
        if not isinstance(raw, dict):
            raise ValueError(
                f"{path}: the config must be a JSON object with sections trainer, lora, train, validation; it is a "
                f"{type(raw).__name__}."
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(known)}.")
        if "train" not in raw:
            raise ValueError(f'{path}: the `train` section is required: {{"data_path": ..., "teacher_logits": ...}}.')
        check_types(path, raw)
        config = cls(**raw)
        for name in ("train", "validation"):
            section = getattr(config, name)
            if section is None:
                continue
            missing = [key for key in ("data_path", "teacher_logits") if not section.get(key)]
            if missing:
                raise ValueError(f"{path}: section `{name}` lacks {missing}.")
            for key in ("data_path", "teacher_logits"):
                if not isinstance(section[key], str):
                    raise ValueError(f"{path}: `{name}.{key}` must be a path (a string), not {section[key]!r}.")
        if config.load_in_8bit and config.load_in_4bit:
            raise ValueError(f"{path}: set at most one of load_in_8bit and load_in_4bit.")
        return config


SECTIONS = {"train": False, "trainer": False, "validation": True, "lora": True}  # name -> may be null
FLAGS = ("only_target_loss", "per_token", "adaptive_kd", "gradient_checkpointing", "load_in_8bit", "load_in_4bit")
TOKENS = ("bos_token", "eos_token", "pad_token")


def check_types(path: str, raw: dict) -> None:
    """Each config value has its field's type: JSON takes `"10"`, `[...]` and `NaN` anywhere, and each would fail
    far from the config, mid-training or (NaN) not at all."""
    for name, nullable in SECTIONS.items():
        if name in raw and not isinstance(raw[name], dict) and not (nullable and raw[name] is None):
            null = " or null" if nullable else ""
            raise ValueError(f"{path}: `{name}` must be an object{null}, not {raw[name]!r}.")
    for name in FLAGS:
        if name in raw and not isinstance(raw[name], bool):
            raise ValueError(f"{path}: `{name}` must be true or false, not {raw[name]!r}.")
    for name in TOKENS:
        if raw.get(name) is not None and not isinstance(raw[name], str):
            raise ValueError(f"{path}: `{name}` must be a token (a string) or null, not {raw[name]!r}.")
    if "model_name" in raw and (not isinstance(raw["model_name"], str) or not raw["model_name"]):
        raise ValueError(
            f"{path}: `model_name` must be a model directory or hub id (a string), not {raw['model_name']!r}."
        )
    if "loss_multi" in raw:
        check_number(path, "loss_multi", raw["loss_multi"], minimum=0)
    if "max_seq_length" in raw:
        check_number(path, "max_seq_length", raw["max_seq_length"], integer=True, minimum=2)


def check_quantization(config: DistillConfig) -> dict:
    """from_pretrained kwargs for 8/4-bit loading, or a clear error where bitsandbytes + CUDA are missing."""
    if not (config.load_in_8bit or config.load_in_4bit):
        return {}
    from importlib.util import find_spec

    bits = 8 if config.load_in_8bit else 4
    if find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        raise ValueError(
            f"load_in_{bits}bit needs the bitsandbytes package and a CUDA GPU "
            f"(bitsandbytes {'found' if find_spec('bitsandbytes') else 'not installed'}, CUDA "
            f"{'available' if torch.cuda.is_available() else 'not available'}). Install bitsandbytes on a GPU machine, "
            f"or set load_in_{bits}bit to false."
        )
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(**{f"load_in_{bits}bit": True})}


def read_kept_records(path: str) -> list[dict]:
    """The filtered JSONL's records; a line that is not JSON or not valid Unicode is an error naming the line."""
    return read_records(path, flag="data_path")


def read_logits(path: str) -> tuple[pa.Table, dict]:
    """The teacher's Parquet file and its settings, refused unless extract_logits.py wrote it (its metadata and
    columns)."""
    settings = read_settings(path)
    if not settings:
        raise ValueError(
            f"{path} was not written by extract_logits.py (it lacks the trl_sdft.* metadata: top-K, vocabulary hash, "
            "positions rule), so it cannot be checked against the student. Make it with `python "
            "scripts/extract_logits.py --input_file DATA --output_file FILE.parquet --filtered_data KEPT.jsonl` and "
            "distil on KEPT.jsonl."
        )
    schema = pq.read_schema(path)
    if "input_hash" not in schema.names or settings.get("row_hash") != ROW_HASH_RULE:
        raise ValueError(
            f"{path} was written by an older extract_logits.py, without the per-row `input_hash` that ties each row "
            "to its record's content (so swapped or edited records would train silently); re-extract it with this "
            "version."
        )
    for name in SCHEMA.names:
        if name not in schema.names or schema.field(name).type != SCHEMA.field(name).type:
            found = schema.field(name).type if name in schema.names else "missing"
            raise ValueError(
                f"{path}: column `{name}` is {found}, expected {SCHEMA.field(name).type} as extract_logits.py writes "
                "it; re-extract the file."
            )
    topk, teacher_vocab = settings.get("topk"), settings.get("vocab_size")
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"{path}: its metadata's top-K is {topk!r}, not a positive integer; re-extract the file.")
    if isinstance(teacher_vocab, int) and 0 < teacher_vocab < topk:
        raise ValueError(
            f"{path} was extracted with --topk {topk}, above the vocabulary size {teacher_vocab}, so its rows hold "
            f"fewer logits than K; re-extract it with --topk <= {teacher_vocab}."
        )
    try:
        table = pq.read_table(path, memory_map=True)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(
            f"{path} is not a readable Parquet file ({first_line(err)}); re-create it with extract_logits.py."
        ) from None
    return table, settings


def build_rows(
    data_path: str,
    logits_path: str,
    tokenizer,
    max_seq_length: int,
    only_target_loss: bool,
    source: str = "train",
    vocab_size: int | None = None,
):
    """Tokenized rows (input_ids, labels, idx, span) and the Parquet table; checks that the two files line up, row by
    row and token by token. `vocab_size`: the student's logits width (default: its tokenizer's size)."""
    for path in (data_path, logits_path):
        if not os.path.isfile(path):
            raise ValueError(f"{path!r} does not exist.")
    records = read_kept_records(data_path)
    table, settings = read_logits(logits_path)
    parquet_idx = table.column("idx").to_pylist()
    if len(records) != len(parquet_idx):
        raise ValueError(
            f"{data_path} has {len(records)} records but {logits_path} has {len(parquet_idx)} rows: they are not from "
            "the same extraction. Pass the --filtered_data_file written with that Parquet file."
        )
    for row, (record, idx) in enumerate(zip(records, parquet_idx)):
        if not isinstance(record, dict):
            raise ValueError(f"{data_path}, row {row}: not a JSON object; use the extraction's --filtered_data file.")
        if record.get("idx", row) != idx:
            raise ValueError(
                f"{data_path} and {logits_path} are not aligned: first mismatch at row {row}, idx {record.get('idx', row)} "
                f"in the JSONL vs idx {idx} in the Parquet."
            )
    if settings.get("positions", POSITIONS_RULE) != POSITIONS_RULE:
        raise ValueError(
            f"{logits_path} stores positions by rule {settings['positions']!r}; expected {POSITIONS_RULE!r}."
        )
    if settings.get("vocab_hash") and settings["vocab_hash"] != vocab_fingerprint(tokenizer):
        raise ValueError(
            f"The teacher logits in {logits_path} index the vocabulary of {settings.get('tokenizer')!r} "
            f"({settings.get('vocab_size')} tokens), which differs from the student's ({len(tokenizer)} tokens). "
            "Top-K distillation needs one vocabulary: use a student with the teacher's tokenizer, or extract the "
            "logits with a teacher that shares the student's."
        )
    topk = settings["topk"]
    # Every value is checked before training (NaN, inf, out-of-vocabulary indices). Over the loaded table's record
    # batches: the collator needs the whole table in memory anyway, so this costs no second read or decompression.
    scan_logits(table.to_batches(max_chunksize=SCAN_ROWS), logits_path, topk, vocab_size or len(tokenizer))
    rows, too_long = [], 0
    lengths = table.column("topk_indices").combine_chunks().value_lengths().to_pylist()
    hashes = table.column("input_hash").to_pylist()
    for row, (record, idx, length, stored) in enumerate(zip(records, parquet_idx, lengths, hashes)):
        messages, reason = normalize_record(record)
        if messages is None:
            raise ValueError(f"{data_path}, row {row} (idx {idx}): {reason}; use the extraction's filtered file.")
        input_ids, start, end = tokenize_with_assistant_span(tokenizer, messages)
        if topk is None or length != (end - start) * topk:
            raise ValueError(
                f"idx {idx}: the Parquet holds {length // topk if topk else '?'} top-{topk} positions but the student's "
                f"chat template gives {end - start} assistant tokens. Extract the logits with the student's tokenizer "
                "and chat template (or set the same bos/eos/pad tokens as at extraction)."
            )
        if token_hash(input_ids) != stored:
            raise ValueError(
                f"{data_path}, row {row} (idx {idx}): its tokens are not the ones the teacher scored in {logits_path} "
                "(the record was edited or the rows reordered, or the student's chat template renders it otherwise); "
                "re-extract the logits with extract_logits.py and distil on the --filtered_data file it writes."
            )
        if len(input_ids) > max_seq_length:
            too_long += 1
            continue
        labels = list(input_ids) if not only_target_loss else [-100] * len(input_ids)
        labels[start:end] = input_ids[start:end]
        rows.append(
            {
                "input_ids": input_ids,
                "labels": labels,
                "idx": idx,
                "kd_start": start,
                "kd_end": end,
                "row": row,
                "source": source,
            }
        )
    if not rows:
        raise ValueError(f"No record of {data_path} fits max_seq_length {max_seq_length}.")
    return Dataset.from_list(rows), table, topk, too_long


class TopKCollator:
    """Pads a batch and joins the teacher's top-K from the Parquet tables (by source and row) at the predicting
    positions. `tables`: source name ("train", "validation") -> Parquet table."""

    def __init__(self, tables: dict, topk: int, pad_token_id: int):
        self.columns = {name: (t.column("topk_indices"), t.column("topk_values")) for name, t in tables.items()}
        self.topk = topk
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch = len(features)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        teacher_indices = torch.zeros((batch, width, self.topk), dtype=torch.long)
        teacher_values = torch.zeros((batch, width, self.topk), dtype=torch.float32)
        kd_mask = torch.zeros((batch, width), dtype=torch.bool)
        for b, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[b, :n] = torch.tensor(feature["input_ids"])
            attention_mask[b, :n] = 1
            labels[b, :n] = torch.tensor(feature["labels"])
            start, end, row = feature["kd_start"], feature["kd_end"], feature["row"]
            indices, values = self.columns[feature["source"]]
            positions = slice(start - 1, end - 1)  # logits at t - 1 predict token t
            teacher_indices[b, positions] = torch.tensor(indices[row].as_py()).view(end - start, self.topk)
            teacher_values[b, positions] = torch.tensor(values[row].as_py()).view(end - start, self.topk)
            kd_mask[b, positions] = True
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "teacher_indices": teacher_indices,
            "teacher_values": teacher_values,
            "kd_mask": kd_mask,
        }


class DistillSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer with the loss `SFT + loss_multi * KD` on stored top-K teacher logits."""

    def __init__(self, *args, loss_multi: float = 1.0, per_token: bool = True, adaptive_kd: bool = False, **kwargs):
        self.loss_multi = loss_multi
        self.per_token = per_token
        self.adaptive_kd = adaptive_kd
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        loss, parts = sft_kd_loss(
            outputs.logits,
            inputs["labels"],
            inputs["teacher_indices"],
            inputs["teacher_values"],
            inputs["kd_mask"],
            loss_multi=self.loss_multi,
            per_token=self.per_token,
            adaptive=self.adaptive_kd,
        )
        mode = "train" if model.training else "eval"
        for name, value in parts.items():
            self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value).mean().item())
        return (loss, outputs) if return_outputs else loss
