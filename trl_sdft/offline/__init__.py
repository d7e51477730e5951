"""Offline distillation: extract a teacher's top-K logits once (`extract.py`), distil students on them many times."""

from .extract import ExtractionSettings, read_settings
from .records import POSITIONS_RULE, normalize_record, tokenize_with_assistant_span

__all__ = ["POSITIONS_RULE", "ExtractionSettings", "normalize_record", "read_settings", "tokenize_with_assistant_span"]
