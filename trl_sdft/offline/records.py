"""Chat records for offline distillation: normalisation, the reasons a record is skipped, and assistant-token spans.

Pure functions over `{"messages": [{"role", "content"}, ...]}` records and a tokenizer's chat template.
"""

from collections import Counter

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"bot": "assistant"}

# The positions rule, stored in every Parquet file: row i holds, for each assistant token t of record idx in order,
# the teacher's top-K logits of the distribution that predicts t (the logits at position t - 1).
POSITIONS_RULE = "assistant-tokens:next-token"


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
