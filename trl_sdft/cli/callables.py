"""Callables named on the command line or in a YAML config as `module:name` (e.g. `--tools my_tools:lookup`).

`resolve_callable` imports the module with the usual `sys.path` (the CLI adds the working directory to it) and returns
the attribute; every failure is one `ValueError` line naming the flag, the spec and the fix.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def resolve_callable(spec: str, flag: str) -> Callable:
    """The callable `spec` names: `module:name`, where `module` is importable (`pkg.mod`) and `name` an attribute of it,
    dotted for a nested one (`mod:Class.method`). `flag` (e.g. `--tools`) is named in the errors."""
    example = (
        "my_env:MyEnv (the file my_env.py, the class MyEnv)"
        if "environment" in flag
        else "my_tools:lookup (the file my_tools.py, the function lookup)"
    )
    form = f"write it as `module:name`, e.g. {flag} {example}"
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"{flag} {spec!r} is not of the form `module:name`: {form}.")
    module_name, attribute = (part.strip() for part in spec.split(":"))
    if not module_name or not attribute or not all(part.isidentifier() for part in module_name.split(".")):
        raise ValueError(f"{flag} {spec!r} is not of the form `module:name`: {form}.")
    if not all(part.isidentifier() for part in attribute.split(".")):
        raise ValueError(f"{flag} {spec!r}: {attribute!r} is not a Python name: {form}.")
    module = _import(module_name, spec, flag)
    target = module
    for depth, part in enumerate(attribute.split(".")):
        try:
            target = getattr(target, part)
        except AttributeError:
            owner = module_name if depth == 0 else f"{module_name}:{'.'.join(attribute.split('.')[:depth])}"
            raise ValueError(
                f"{flag} {spec!r}: {owner} has no attribute {part!r}{_close_names(target, part)}. Check the name "
                "after the colon."
            ) from None
        except Exception as error:  # a property or module __getattr__ that raises
            raise ValueError(
                f"{flag} {spec!r}: getting {part!r} raised {type(error).__name__}: {_first_line(error)}"
            ) from None
    if not callable(target):
        raise ValueError(
            f"{flag} {spec!r} names a {type(target).__name__}, which is not callable: name a function"
            + (" or a class (an environment factory)." if flag == "--environment_factory" else ".")
        )
    return target


def _import(module_name: str, spec: str, flag: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or module_name
        if missing == module_name or module_name.startswith(f"{missing}."):
            where = module_name.replace(".", "/")
            raise ValueError(
                f"{flag} {spec!r}: no module named {missing!r} could be imported. Run from the directory that holds "
                f"{where}.py (or the package {missing}), or add that directory to PYTHONPATH."
            ) from None
        raise ValueError(  # the user's module imports something that is not installed
            f"{flag} {spec!r}: importing {module_name!r} failed: ModuleNotFoundError: {_first_line(error)}"
        ) from None
    except (Exception, SystemExit) as error:  # SyntaxError, an exception or sys.exit() at import time, ...
        raise ValueError(
            f"{flag} {spec!r}: importing {module_name!r} raised {type(error).__name__}: {_first_line(error)}"
        ) from None


def _close_names(target, name: str) -> str:
    import difflib

    names = [entry for entry in dir(target) if not entry.startswith("_")]
    close = difflib.get_close_matches(name, names, n=3)
    return f" (did you mean {', '.join(repr(entry) for entry in close)}?)" if close else ""


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else "(no message)"
