"""Text files the package reads (chat templates, prompt templates, task, grid and config files): UTF-8, and where a
file is not, an error that names the file, the line and the column, instead of a bare codec message; a YAML error as
one line that names the file and the line."""


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


def yaml_error_line(path: str, err, flag: str = "--config") -> str:
    """A YAML error (several lines, with a caret) as one line with the file and the line."""
    import re

    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    name = f"{flag} {path}" if flag else path
    where = f"{name}, line {mark.line + 1}" if mark is not None else name
    problem = " ".join(str(getattr(err, "problem", None) or err).split())
    if "expected a single document" in str(getattr(err, "context", "")):
        return f"{where}: a second YAML document (after `---`): keep one document of `option: value` lines."
    tag = re.search(r"constructor for the tag '([^']*)'", problem)
    if tag:
        name = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        return f"{where}: the tag {name} is not allowed: write plain values (numbers, strings, true/false, lists)."
    context = getattr(err, "context", None)
    context_mark = getattr(err, "context_mark", None)
    if context and context_mark is not None and context_mark is not mark:
        context = f"{context} on line {context_mark.line + 1}"
    return f"{where}: {problem}" + (f" ({' '.join(context.split())})" if context else "") + "."
