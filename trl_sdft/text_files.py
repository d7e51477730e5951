"""Text files the package reads (chat templates, prompt templates, task and grid files): UTF-8, and where a file is
not, an error that names the file, the line and the column, instead of a bare codec message."""


def utf8_problem(data: bytes) -> str | None:
    """Where `data` stops being UTF-8 (`line L, column C ...`), or None when it is UTF-8 throughout."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        return f"line {line}, column {column} is not UTF-8 text (byte 0x{data[err.start]:02x})"
    return None


def read_text(path: str, what: str) -> str:
    """The text of the file at `path` (UTF-8, a leading byte-order mark dropped); `what` names it in the error (a flag
    or a field)."""
    with open(path, "rb") as f:
        data = f.read()
    problem = utf8_problem(data)
    if problem:
        raise ValueError(f"{what} {path!r}: {problem}. Save the file as UTF-8.")
    return data.decode("utf-8-sig")
