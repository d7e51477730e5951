"""The package's import structure: modules import downward only, so each seam can be read (and replaced) alone.

From the bottom: pure helpers and math (`importance.py` imports nothing of the package) -> losses, rollouts,
teachers, batches -> `settings.py` (config -> settings objects) and `config.py` -> `trainer.py` -> the CLIs. Read from
the source with `ast`, so a lazy import inside a function counts too."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "trl_sdft"
CLIS = {"cli", "continual", "offline"}  # the commands and the harnesses they run: above the trainer
# Modules that may import `config` (besides the CLIs): none reads SDFTConfig but these.
CONFIG_READERS = {"trainer", "__init__"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _imports(path: Path) -> set[str]:
    """The package modules `path` imports (resolved to dotted names under trl_sdft, first component kept)."""
    name = _module_name(path)
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    if path.name == "__init__.py" and name == "__init__":
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("trl_sdft."):
                    found.add(node.module.split(".")[1])
                continue
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = [*base, *(node.module.split(".") if node.module else [])]
            if target:
                found.add(target[0])
            else:  # `from . import x, y`
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("trl_sdft."):
                    found.add(alias.name.split(".")[1])
    return found - {name.split(".")[0]}


def _graph() -> dict[str, set[str]]:
    graph = {_module_name(path): _imports(path) for path in PACKAGE.rglob("*.py")}
    assert len(graph) > 20 and "trainer" in graph, sorted(graph)  # the package was found and read
    return graph


def test_importance_depends_on_nothing_in_the_package():
    assert _imports(PACKAGE / "importance.py") == set()


def test_nothing_below_the_trainer_imports_it_or_a_cli():
    graph = _graph()
    for module, imported in graph.items():
        top = module.split(".")[0]
        if top in CLIS or top in ("trainer", "__init__"):
            continue
        assert not imported & ({"trainer"} | CLIS), (module, imported & ({"trainer"} | CLIS))


def test_only_the_trainer_and_the_clis_import_the_config():
    graph = _graph()
    readers = {module for module, imported in graph.items() if "config" in imported}
    assert {module.split(".")[0] for module in readers} <= CONFIG_READERS | CLIS, readers


def test_the_seams_do_not_import_each_other_upward():
    """Losses, teachers and rollout backends know nothing of the settings builder, the config or the trainer."""
    graph = _graph()
    for module in (
        "losses",
        "chunked_loss",
        "teachers",
        "rollouts",
        "rollouts.base",
        "rollouts.vllm",
        "rollouts.vllm_engine",
        "rollouts.transformers",
    ):
        assert not graph[module] & {"settings", "config", "trainer"}, (module, graph[module])


def test_the_core_does_not_import_the_demo():
    """The embedded default model and the knowledge task (`demo/`) are the demo's and the CLIs': the trainer and what
    it calls run without them."""
    graph = _graph()
    assert any(module.startswith("demo.") for module in graph), sorted(graph)  # the demo package was read
    outside_core = CLIS | {"demo", "testing"}
    for module, imported in graph.items():
        if module.split(".")[0] in outside_core:
            continue
        assert "demo" not in imported, module


PROCESS_SIDE = {"yaml_config", "data_files", "output_dir", "launch", "callables"}


def test_the_process_side_lives_in_cli_and_nothing_else_imports_it():
    """Config files, data files, the output directory, launching and `module:function` names act on a process: they
    live in `trl_sdft/cli/` with the commands themselves (`trl-sdft`, its `continual` subcommand, the offline
    scripts), and no other part of the package imports `cli`: the harnesses are libraries the commands call."""
    graph = _graph()
    assert {f"cli.{name}" for name in PROCESS_SIDE | {"sdft", "continual", "offline"}} <= set(graph), sorted(graph)
    assert not PROCESS_SIDE & set(graph), PROCESS_SIDE & set(graph)  # no flat copy left beside the core
    users = {module for module, imported in graph.items() if "cli" in imported}
    assert not users, users


def test_the_parts_of_the_package_form_no_circle():
    """Between the package's top-level parts (modules and folders), imports go one way: no two parts import each
    other, directly or around a longer circle (a folder counts as one part)."""
    parts: dict[str, set[str]] = {}
    for module, imported in _graph().items():
        parts.setdefault(module.split(".")[0], set()).update(imported)
    state: dict[str, str] = {}

    def visit(part: str, path: list[str]) -> None:
        state[part] = "open"
        for target in sorted(parts.get(part, ())):
            assert state.get(target) != "open", " -> ".join([*path, part, target])
            if target not in state:
                visit(target, [*path, part])
        state[part] = "done"

    for part in sorted(parts):
        if part not in state:
            visit(part, [])
