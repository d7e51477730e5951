"""Chat records for offline distillation: normalisation, the reasons a record is skipped, and assistant-token spans.

Pure functions over `{"messages": [{"role", "content"}, ...]}` records and a tokenizer's chat template.
"""

import hashlib
import json
import os
from collections import Counter

from ..jsonl import JSONLineError, json_lines

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"bot": "assistant"}

# The positions rule, stored in every Parquet file: row i holds, for each assistant token t of record idx in order,
# the teacher's top-K logits of the distribution that predicts t (the logits at position t - 1).
POSITIONS_RULE = "assistant-tokens:next-token"

# The per-row content tie, stored in every Parquet file: `input_hash` = token_hash of the record's token ids as the
# extraction tokenized them, so a row can be checked against the record it is trained with.
ROW_HASH_RULE = "sha256-16:input_ids"


def token_hash(input_ids) -> str:
    """A short hash of a token id sequence: equal hashes mean the same conversation, tokenized the same way."""
    return hashlib.sha256(",".join(map(str, input_ids)).encode()).hexdigest()[:16]


def _check_unicode(path: str, where: str, record) -> None:
    """JSON escapes can carry lone surrogates (`"\\ud800"`), which no tokenizer or UTF-8 file accepts."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        bad = err.object[err.start : err.end].encode("unicode_escape").decode()
        raise ValueError(
            f"{path}, {where}: the text holds a lone surrogate ({bad}), which is not valid Unicode; fix or delete "
            "the record."
        ) from None


def read_records(path: str, flag: str = "--input_file") -> list:
    """The records of a JSON Lines file (or of a JSON array). A line that is not JSON, or text that is not valid
    Unicode, is an error naming the line: a record that silently disappears is worse than a stop."""
    if not os.path.isfile(path):
        raise ValueError(
            f"{flag} {path!r} does not exist." if not os.path.exists(path) else f"{flag} {path!r} is not a file."
        )
    with open(path, "rb") as f:
        data = f.read()
    if data.lstrip()[:1] == b"[":
        try:
            records = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text (byte {err.start}); convert the file to UTF-8.") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno}, column {err.colno}).") from None
        for number, record in enumerate(records):
            _check_unicode(path, f"record {number}", record)
        return records
    records = []
    try:
        for number, record in json_lines(data.splitlines()):
            _check_unicode(path, f"line {number}", record)
            records.append(record)
    except JSONLineError as err:
        if err.not_utf8:
            raise ValueError(f"{path}, line {err.number}: not UTF-8 text; convert the file to UTF-8.") from None
        raise ValueError(
            f"{path}, line {err.number}: not valid JSON ({err.msg}, column {err.colno}); each line must be one JSON "
            "record: fix or delete the line."
        ) from None
    return records


def normalize_record(record) -> tuple[list[dict] | None, str | None]:
    """The record's messages with roles normalised, or (None, reason) when it must be skipped."""
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        return None, "no messages"
    normalized = []
    for message in messages:
        if not isinstance(message, dict):
            return None, "a message is not an object"
        role = message.get("role")
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            return None, f"unknown role {message.get('role')!r}"
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            return None, "empty content"
        normalized.append({"role": role, "content": content})
    assistants = sum(message["role"] == "assistant" for message in normalized)
    if assistants == 0:
        return None, "no assistant turn"
    if assistants > 1:
        return None, "more than one assistant turn"
    return normalized, None


def _ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def tokenize_with_assistant_span(tokenizer, messages: list[dict]) -> tuple[list[int], int, int]:
    """Token ids of the whole conversation and the [start, end) span of the assistant turn's tokens.

    The span is what the chat template adds for the assistant turn after the generation prompt: its content and the
    end-of-turn tokens (what a model must learn to produce).
    """
    turn = next(i for i, message in enumerate(messages) if message["role"] == "assistant")
    prefix = _ids(tokenizer, messages[:turn], add_generation_prompt=True)
    through = _ids(tokenizer, messages[: turn + 1], add_generation_prompt=False)
    full = _ids(tokenizer, messages, add_generation_prompt=False)
    if through[: len(prefix)] != prefix or full[: len(through)] != through:
        raise ValueError(
            "The tokenizer's chat template does not render the conversation incrementally (the prompt's tokens are "
            "not a prefix of the conversation's), so the assistant tokens cannot be located. Use a tokenizer whose "
            "chat template renders each turn independently of later turns."
        )
    return full, len(prefix), len(through)


class SkipCounter:
    """Counts skipped records by reason, for the summary printed at the end."""

    def __init__(self):
        self.reasons = Counter()

    def add(self, reason: str) -> None:
        self.reasons[reason] += 1

    def update(self, other: dict) -> None:
        self.reasons.update(other)

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def summary(self) -> str:
        if not self.reasons:
            return "skipped 0 records"
        parts = ", ".join(f"{count} {reason}" for reason, count in self.reasons.most_common())
        return f"skipped {self.total} records: {parts}"
