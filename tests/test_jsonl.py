"""`jsonl.json_lines`, the one JSON Lines reader behind every JSONL file the package reads."""

import pytest

from trl_sdft.jsonl import JSONLineError, json_lines


def test_rows_are_numbered_by_file_line_and_blank_lines_skipped():
    assert list(json_lines(['{"a": 1}', "", "  ", "[2]"])) == [(1, {"a": 1}), (4, [2])]
    assert list(json_lines([b'\xef\xbb\xbf{"a": 1}', b"3"])) == [(1, {"a": 1}), (2, 3)]  # a UTF-8 BOM is fine


@pytest.mark.parametrize(
    ("lines", "number", "not_utf8"), [(['{"a": 1}', "{oops"], 2, False), ([b"1", b"", b'"\xc3\x28"'], 3, True)]
)
def test_a_bad_line_is_named(lines, number, not_utf8):
    with pytest.raises(JSONLineError) as caught:
        list(json_lines(lines))
    assert (caught.value.number, caught.value.not_utf8) == (number, not_utf8)
    assert f"line {number}" in str(caught.value)
