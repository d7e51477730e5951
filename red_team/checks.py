"""How a case judges a run (exit 0 right or wrong, weights finite) and the damage it does to files beforehand."""

import hashlib
import math
import os
from collections.abc import Callable
from pathlib import Path

from red_team.processes import Result

SURROGATE = "\\ud800"  # as JSON text: the escape of a lone surrogate


def digest(path: str) -> str:
    """The content hash of a file (a symlink: its target; unreadable: the error number)."""
    if os.path.islink(path):
        return "link:" + os.readlink(path)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        return f"unreadable:{err.errno}"
    return digest.hexdigest()


def weights_problem(directory: Path) -> str | None:
    """None when `directory` holds a model.safetensors with finite weights."""
    import torch
    from safetensors import safe_open

    path = directory / "model.safetensors"
    if not path.is_file():
        return f"no model was saved ({path.name} missing in {directory.name}/)"
    try:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                if not torch.isfinite(f.get_tensor(name)).all():
                    return f"non-finite weights saved ({name} in {directory.name}/)"
    except Exception as err:  # any failure to read is the finding
        return f"saved weights unreadable ({type(err).__name__}: {str(err).splitlines()[0][:100]})"
    return None


def model_saved(directory: Path, why: str | None = None) -> Callable[[Result], str | None]:
    """exit 0 is right when a finite model was saved (else: what is wrong); with `why`, exit 0 is wrong anyway."""

    def check(result: Result) -> str | None:
        problem = weights_problem(directory)
        if why:
            return f"{why}; {problem}" if problem else why
        return problem

    return check


def accepted(what: str) -> Callable[[Result], str]:
    return lambda result: f"exit 0: {what}"


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def rewrite_parquet(src: Path, dst: Path, change=None, metadata="keep", drop=()) -> Path:
    """The Parquet at `src` with its rows changed by `change(rows)`, written to `dst` with pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(src)
    rows = table.to_pylist()
    if change:
        change(rows)
    new = pa.Table.from_pylist(rows, schema=table.schema)
    if metadata != "keep":
        new = new.replace_schema_metadata(metadata)
    if drop:
        new = new.drop_columns(list(drop))
    pq.write_table(new, dst)
    return dst


def poison_weights(model_dir: Path, tensor: str = "lm_head.weight", row: int | None = 7) -> None:
    """NaN into one row (or all) of a saved tensor."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    if row is None:
        tensors[tensor].fill_(math.nan)
    else:
        tensors[tensor][row] = math.nan
    save_file(tensors, str(path), metadata={"format": "pt"})


def no_code_ran(marker: Path) -> Callable[[Result], str | None]:
    def check(result: Result) -> str | None:
        if marker.exists() or any(line.strip() == "pwned" for line in result.stdout.splitlines()):
            return "the YAML tag RAN CODE (os.system)"
        return None

    return check


def pwn_tag(marker: Path) -> str:
    return f'!!python/object/apply:os.system ["echo pwned && touch {marker}"]'
