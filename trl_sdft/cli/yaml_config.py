"""`--config` YAML files for the CLI: read safely (no tags that build objects or run code), a key given twice refused,
every value type-checked against the field it sets, and each problem one line naming the file, the line and the
option. TRL's parser would take the values as they are (a float where an int is expected failed at step 1)."""

from ..text_files import yaml_error_line

YAML_TYPE_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    type(None): "null",
    list: "a list",
    dict: "a mapping (or a JSON object string)",
}
YAML_VALUE_KINDS = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list"}
# Accepted beyond a field's type: the Trainer's `resume_from_checkpoint=True` (the latest checkpoint).
YAML_EXTRA_TYPES = {"resume_from_checkpoint": bool}


def split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """The path of `--config PATH` (or `--config=PATH`) and the other arguments."""
    paths, rest, index = [], [], 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--config":
            if index + 1 == len(argv) or argv[index + 1].startswith("--"):
                raise ValueError("--config needs the path of a YAML file, e.g. --config configs/demo.yaml.")
            paths.append(argv[index + 1])
            index += 2
            continue
        if arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        index += 1
    if len(paths) > 1:
        raise ValueError(f"--config given {len(paths)} times ({', '.join(paths)}): pass one file; flags override it.")
    return (paths[0] if paths else None), rest


def load_yaml_config(path: str) -> tuple[dict, dict[str, int]]:
    """The mapping in a `--config` file and the line of each of its keys. Plain YAML only (PyYAML's safe loader: no
    tag builds an object or runs code), and a key given twice is an error rather than the last one winning."""
    import yaml

    from ..text_files import read_text

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            first = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *defaults` may be overridden key by key
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first
                except TypeError:  # unhashable: the base class says so
                    continue
                if seen:
                    problem = f"`{key}` is given twice (first on line {first[key]}): keep one"
                    raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
                first[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep)

    try:
        text = read_text(path, "--config")
    except FileNotFoundError:
        raise ValueError(f"--config {path!r} does not exist.") from None
    except IsADirectoryError:
        raise ValueError(f"--config {path!r} is a directory, not a YAML file.") from None
    except OSError as err:
        raise ValueError(f"--config {path!r} could not be read ({err.strerror}).") from None
    loader = Loader(text)
    try:
        root = loader.get_single_node()
        config = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as err:
        raise ValueError(yaml_error_line(path, err)) from None
    finally:
        loader.dispose()
    if config is None:
        raise ValueError(f"--config {path} is empty: write one `option: value` per line (e.g. `max_steps: 100`).")
    if not isinstance(config, dict):
        raise ValueError(
            f"--config {path} must contain a YAML mapping (`option: value` lines), not a {type(config).__name__}."
        )
    lines = {key.value: key.start_mark.line + 1 for key, _ in root.value if isinstance(key, yaml.ScalarNode)}
    return config, lines


def yaml_accepts(value, hint) -> bool:
    """Whether a YAML value already has a type the field takes (ints for floats; any text for choices and enums)."""
    import enum
    import types
    import typing

    origin = typing.get_origin(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(yaml_accepts(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return isinstance(value, str) or value in typing.get_args(hint)
    if origin is list or hint is list:
        (item,) = typing.get_args(hint) or (typing.Any,)
        return isinstance(value, list) and all(yaml_accepts(entry, item) for entry in value)
    if origin is dict or hint is dict:
        return isinstance(value, (dict, str))  # a JSON string: the config loads it
    if hint in (bool, str, type(None)):
        return isinstance(value, hint)
    if hint in (int, float):
        return isinstance(value, (int, hint)) and not isinstance(value, bool)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, (str, hint))
    return True  # another class: its dataclass checks it


def yaml_expected(hint) -> str:
    """A field's type in words."""
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(yaml_expected(arg) for arg in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint) or (str,)
        return f"a list of {YAML_TYPE_NAMES.get(item, item.__name__).split(' ', 1)[-1]}s"
    member = origin or hint
    return YAML_TYPE_NAMES.get(member, f"a {getattr(member, '__name__', member)}")


def check_yaml_config(config: dict, lines: dict[str, int], path: str, parser, argument_classes) -> dict:
    """The `--config` values, type-checked: TRL's parser sets them as defaults unconverted (except text, which the
    flag's own conversion reads), so a float where an int is expected reached the trainer and failed at step 1."""
    import difflib
    import typing

    hints = {}
    for cls in argument_classes:
        hints.update(typing.get_type_hints(cls))
    converters = {}  # option -> the flag's conversion of text (None for the `--no_<option>` flags)
    for action in parser._actions:
        if action.dest != "help" and converters.get(action.dest) is None:
            converters[action.dest] = action.type
    checked = {}
    for key, value in config.items():
        where = f"--config {path}, line {lines.get(str(key), '?')}"
        if key == "env":
            if not isinstance(value, dict):
                raise ValueError(f"{where}: `env` must be a mapping of environment variable names to values.")
            checked[key] = value
            continue
        if key not in converters:
            close = difflib.get_close_matches(str(key), converters, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise ValueError(f"{where}: unknown option `{key}`{hint}. Remove it or correct its name.")
        expected = hints.get(key, typing.Any)
        hint = expected | YAML_EXTRA_TYPES[key] if key in YAML_EXTRA_TYPES else expected
        if not yaml_accepts(value, hint) and not converts(converters[key], value):
            kind = YAML_VALUE_KINDS.get(type(value), type(value).__name__)
            given = "null" if value is None else f"{value!r} ({kind})"
            message = f"{where}: `{key}` is {given}; expected {yaml_expected(expected)}."
            if isinstance(value, float) and value.is_integer() and int in typing.get_args(hint) + (hint,):
                message += f" Write it without a decimal point: `{key}: {int(value)}`."
            elif isinstance(value, (int, float)) and yaml_accepts(str(value), hint):
                message += f" Quote it to mean the text: `{key}: '{value}'`."
            raise ValueError(message)
        if isinstance(value, int) and not isinstance(value, bool) and float in typing.get_args(hint) + (hint,):
            value = float(value)  # as the flag would be: `num_train_epochs: 2` is 2.0
        checked[key] = value
    return checked


def converts(converter, value) -> bool:
    """Whether a flag's conversion reads this YAML text (`learning_rate: 2e-5` is a string to YAML)."""
    import argparse

    if converter is None or not isinstance(value, str):
        return False
    try:
        converter(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return False
    return True
