"""Checks of the offline pipeline's paths and files, before any model loads: pure functions raising ValueError with a
message that names the file, row or field and the fix (the CLIs print it as one line and exit 2)."""

import functools
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (library errors often carry pages of help below it)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: through symlinks, `..` and hard links where both exist."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet): compare what they would resolve to
        return os.path.realpath(a) == os.path.realpath(b)


def check_distinct_paths(paths: dict[str, str]) -> None:
    """No two of the named paths (flag -> path) are the same file: an output must never replace an input, nor
    another output."""
    named = list(paths.items())
    for i, (flag_a, a) in enumerate(named):
        for flag_b, b in named[i + 1 :]:
            if same_file(a, b):
                raise ValueError(
                    f"{flag_b} {b!r} is the same file as {flag_a} {a!r}: writing it would destroy the other. Choose "
                    f"another {flag_b}."
                )


def check_writable(path: str, flag: str, directory: bool = False) -> None:
    """`path` (a file, or a directory with `directory`) can be created or replaced: its nearest existing ancestor
    is a writable directory. Checked before hours of work whose result would then be lost."""
    target = os.path.abspath(path)
    if os.path.isdir(target) and not directory:
        raise ValueError(f"{flag} {path!r} is a directory; pass a file path.")
    if os.path.exists(target) and directory and not os.path.isdir(target):
        raise ValueError(f"{flag} {path!r} is a file, not a directory; choose another {flag}.")
    parent = target if directory else os.path.dirname(target)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(
            f"{flag} {path!r} lies under {parent!r}, which is a file, not a directory; choose another {flag}."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path!r}: cannot write in {parent!r} (permission denied); choose a writable {flag}.")


def check_number(path: str, name: str, value, integer: bool = False, minimum: float | None = None) -> None:
    """A config value is a finite number (an integer with `integer`) of at least `minimum`; JSON lets `"10"`, `true`
    and `NaN` through, and each fails far from the config otherwise."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{path}: `{name}` must be {kind}, not {value!r} ({type(value).__name__}).")
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = f" and >= {minimum:g}" if minimum is not None else ""
        raise ValueError(f"{path}: `{name}` must be finite{bound}, not {value!r}.")


def _where(path: str, first: int, idx: pa.Array, row: int) -> str:
    return f"{path}, row {first + row} (idx {idx[row].as_py()})"


def _owner(column: pa.Array, position: int) -> int:
    """The row (within a batch) of the flattened list element at `position`."""
    return pc.list_parent_indices(column)[position].as_py()


def scan_logits(batches, path: str, topk: int, vocab_size: int) -> int:
    """Every row of the teacher's file can be trained on: no nulls, as many indices as logits in whole positions of
    K, finite logits (one NaN or inf turns the whole student into NaN), indices in [0, vocab_size) (others crash the
    first step). One pass over record batches (a fast sum / min / max each; the exact position only on failure).
    Returns the number of rows."""
    first = 0
    for batch in batches:
        idx, indices, values = (batch.column(name) for name in ("idx", "topk_indices", "topk_values"))
        where = functools.partial(_where, path, first, idx)

        for name, column in (("idx", idx), ("topk_indices", indices), ("topk_values", values)):
            if column.null_count:
                row = int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))
                raise ValueError(
                    f"{path}, row {first + row}: `{name}` is null; re-extract the file with extract_logits.py."
                )
        flat_indices, flat_values = indices.flatten(), values.flatten()
        for name, column, flat in (("topk_indices", indices, flat_indices), ("topk_values", values, flat_values)):
            if flat.null_count:
                position = int(np.argmax(flat.is_null().to_numpy(zero_copy_only=False)))
                raise ValueError(f"{where(_owner(column, position))}: `{name}` holds a null; re-extract the file.")
        index_lengths = indices.value_lengths().to_numpy()
        value_lengths = values.value_lengths().to_numpy()
        bad = (index_lengths != value_lengths) | (index_lengths % topk != 0) | (index_lengths == 0)
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(
                f"{where(row)}: {index_lengths[row]} top-K indices and {value_lengths[row]} logits, not the same "
                f"positive multiple of K = {topk}; the file is corrupt: re-extract it with extract_logits.py."
            )
        logits = flat_values.to_numpy()
        if len(logits) and not math.isfinite(logits.sum(dtype=np.float64)):  # a float64 sum of float32s overflows never
            position = int(np.argmin(np.isfinite(logits)))
            row = _owner(values, position)
            within = position - (values.offsets[row].as_py() - values.offsets[0].as_py())
            raise ValueError(
                f"{where(row)}: non-finite teacher logit {logits[position]} (assistant token {within // topk}); the "
                "student would train on NaN. Re-extract the file (a float16 teacher overflows: use --dtype float32 or "
                "bfloat16)."
            )
        ids = flat_indices.to_numpy()
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
            position = int(np.argmax((ids < 0) | (ids >= vocab_size)))
            raise ValueError(
                f"{where(_owner(indices, position))}: top-K index {ids[position]} is outside the student's vocabulary "
                f"[0, {vocab_size}); the file is corrupt or from another model: re-extract it with extract_logits.py."
            )
        first += batch.num_rows
    return first


def check_trainer_values(path: str, trainer: dict, config_class) -> None:
    """Each `trainer` value has its field's plain type (`"max_steps": "two"` would pass the config and fail deep in
    training): a whole number for an `int` field, a number for a `float` one, true/false for a flag, text for a
    string. Fields of other types are left to the config."""
    from dataclasses import fields

    wanted = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "a string"}
    types = {f.name: getattr(f.type, "__name__", f.type) for f in fields(config_class)}
    for key, value in trainer.items():
        kind = types.get(key)
        if kind not in wanted or value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        ok = {
            "bool": isinstance(value, bool),
            "int": number and isinstance(value, int),
            "float": number,
            "str": isinstance(value, str),
        }[kind]
        if not ok:
            raise ValueError(f"{path}: `trainer.{key}` must be {wanted[kind]}, not {value!r}.")
