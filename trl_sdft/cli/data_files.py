"""`--dataset_path`: local data files (JSON, JSON Lines, Parquet, CSV) and `save_to_disk` directories, loaded with
`datasets`; what `datasets` cannot load becomes one line naming the file and the line at fault (found only then, so
good files cost nothing extra)."""

import json
import os

from ..jsonl import JSONLineError, json_lines

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_local_dataset(path: str, split: str):
    """A split of a local file or saved dataset directory; a one-line error names what is wrong."""
    import datasets

    if not os.path.exists(path):
        raise ValueError(f"--dataset_path {path!r} does not exist.")
    if os.path.isdir(path):
        try:
            loaded = datasets.load_from_disk(path)
        except FileNotFoundError:
            raise ValueError(
                f"--dataset_path {path!r} is a directory but not one written by `Dataset.save_to_disk`."
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"--dataset_path {path!r} has splits {list(loaded)}, not {split!r}.")
            loaded = loaded[split]
        return _with_rows(loaded, path)
    extension = os.path.splitext(path)[1].lower()
    if extension not in LOCAL_FORMATS:
        raise ValueError(
            f"--dataset_path {path!r}: unknown format {extension or '(no extension)'!r}; use one of "
            f"{', '.join(sorted(LOCAL_FORMATS))} or a saved dataset directory."
        )
    if _is_blank(path):
        raise ValueError(f"--dataset_path {path!r} is empty: it has no rows. {ROW_HINT}")
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its error log would repeat ours on a second line
    try:
        loaded = datasets.load_dataset(LOCAL_FORMATS[extension], data_files=path, split="train")
    except Exception as err:  # `datasets` says only "An error occurred while generating the dataset"
        raise ValueError(_load_error(path, extension, err)) from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    return _with_rows(loaded, path)


ROW_HINT = 'Each row needs `prompt` and `privileged_context`, e.g. {"prompt": "...", "privileged_context": "..."}.'


def _with_rows(dataset, path: str):
    if len(dataset) == 0:
        raise ValueError(f"--dataset_path {path!r} has no rows. {ROW_HINT}")
    return dataset


def _is_blank(path: str) -> bool:
    """Only whitespace (or nothing): `datasets` fails on such files with an empty StopIteration."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _load_error(path: str, extension: str, err: Exception) -> str:
    """The one-line error for a file `datasets` could not load: for JSON the line at fault, found with `json` (only
    now, so loading good files costs nothing extra); otherwise the parser's own first line."""
    if LOCAL_FORMATS[extension] == "json":
        problem = _json_problem(path)
        if problem:
            return f"--dataset_path {path!r}: {problem}"
    from datasets.exceptions import DatasetsError

    cause = err
    while isinstance(cause, DatasetsError) and (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, UnicodeDecodeError):
        return f"--dataset_path {path!r}: {_utf8_problem(path)}. Save the file as UTF-8."
    detail = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    if "corresponds to no data" in detail:  # a CSV header and no row, say
        return f"--dataset_path {path!r} has no rows. {ROW_HINT}"
    kind = {".json": "JSON", ".jsonl": "JSON Lines", ".parquet": "Parquet", ".csv": "CSV"}[extension]
    fix = "Fix the file." if kind.startswith("JSON") else "Fix the file, or convert it to JSON Lines."
    return f"--dataset_path {path!r} could not be read as {kind} ({type(cause).__name__}: {detail}). {fix}"


def _json_problem(path: str) -> str | None:
    """What is wrong in a JSON array or JSON Lines file, with its line: a syntax error, a row that is not an object,
    a lone surrogate, or text and chat prompts mixed (which some `datasets` versions cannot load)."""
    with open(path, "rb") as f:
        is_array = f.read(1 << 16).lstrip().startswith(b"[")
    try:
        return _rows_problem(_array_rows(path) if is_array else _line_rows(path))
    except _BadJSON as err:
        return str(err)


def _utf8_problem(path: str) -> str:
    from ..text_files import utf8_problem

    with open(path, "rb") as f:
        return utf8_problem(f.read()) or "is not UTF-8 text"


class _BadJSON(Exception):
    """A file that does not parse, with what to fix."""


def _array_rows(path: str):
    with open(path, "rb") as f:
        try:
            rows = json.load(f)
        except UnicodeDecodeError:
            raise _BadJSON(f"{_utf8_problem(path)}. Save the file as UTF-8.") from None
        except json.JSONDecodeError as err:
            raise _BadJSON(
                f"not valid JSON at line {err.lineno}, column {err.colno} ({err.msg}). Fix the file there."
            ) from None
    yield from ((f"row {index}", row) for index, row in enumerate(rows if isinstance(rows, list) else [rows]))


def _line_rows(path: str):
    """The rows of a JSON Lines file, one line at a time (a large file is never held whole)."""
    with open(path, "rb") as f:
        try:
            for number, row in json_lines(f):
                yield f"line {number}", row
        except JSONLineError as err:
            if err.not_utf8:
                raise _BadJSON(f"line {err.number} is not UTF-8 text. Save the file as UTF-8.") from None
            if err.number == 1 and _is_one_document(path):
                raise _BadJSON(f"holds one JSON object spread over lines, not rows. {ROWS_HINT}") from None
            raise _BadJSON(
                f"line {err.number} is not valid JSON ({err.msg}, column {err.colno}). Fix or remove that line "
                "(JSON Lines: one object per line)."
            ) from None


ROWS_HINT = "Write a JSON array of row objects, or one row object per line (JSON Lines)."


def _is_one_document(path: str) -> bool:
    with open(path, "rb") as f:
        try:
            json.load(f)
        except ValueError:
            return False
    return True


def _rows_problem(numbered) -> str | None:
    from ..data import lone_surrogate, prompt_kind

    first = None
    empty = True
    for where, row in numbered:
        empty = False
        if not isinstance(row, dict):
            return f"{where} is not a JSON object. {ROWS_HINT} {ROW_HINT}"
        for name, value in row.items():
            if lone_surrogate(value):
                return (
                    f"{where}: `{name}` holds a lone surrogate (half of a UTF-16 pair, e.g. the escape \\ud800), "
                    "which is not text. Fix or remove that row."
                )
        if "prompt" in row:
            kind = prompt_kind(row["prompt"])
            first = first or (where, kind)
            if kind != first[1]:
                return (
                    f"{where} has a {kind} prompt but {first[0]} a {first[1]} one: prompts must be all text or all "
                    'chat messages. Convert the odd rows, e.g. a text prompt to [{"role": "user", '
                    '"content": text}].'
                )
    return f"has no rows. {ROW_HINT}" if empty else None
