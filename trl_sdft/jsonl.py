"""The one JSON Lines reader: every JSONL file the package reads goes through `json_lines`, and each caller words the
error for its own file (which flag, which fix)."""

import json
from collections.abc import Iterable, Iterator
from typing import Any


class JSONLineError(ValueError):
    """Line `number` (1-based) is not UTF-8 text (`not_utf8`) or not valid JSON (`msg`, `colno` from `json`)."""

    def __init__(self, number: int, msg: str, colno: int = 0, not_utf8: bool = False):
        super().__init__(f"line {number}: {'not UTF-8 text' if not_utf8 else f'not valid JSON ({msg})'}")
        self.number, self.msg, self.colno, self.not_utf8 = number, msg, colno, not_utf8


def json_lines(lines: Iterable[str | bytes]) -> Iterator[tuple[int, Any]]:
    """`(line number, value)` for each line that is not blank, one at a time (a large file is never held whole)."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)  # bytes: json detects UTF-8 (with or without a BOM)
        except UnicodeDecodeError:
            raise JSONLineError(number, "not UTF-8 text", not_utf8=True) from None
        except json.JSONDecodeError as err:
            raise JSONLineError(number, err.msg, err.colno) from None
        yield number, value
