"""The documentation site: the generated pages match the code and benchmarks/results/, and the site builds strictly."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docs, pytest.mark.processes]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "docs_pages.py"
HANG_GUARD_S = 1800  # a hang guard only: a loaded 2-core machine must not fail these


def load_script():
    spec = importlib.util.spec_from_file_location("docs_pages", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_pages_are_current():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert result.returncode == 0, f"{result.stderr}{result.stdout}"


def github_cells(line: str) -> int:
    """Cells GitHub sees in a table row: it splits on every `|` not escaped by a backslash, code spans included."""
    return len(re.findall(r"(?<!\\)\|", line.strip())) - 1


def test_generated_tables_keep_their_columns_on_github():
    """A `|` in a cell (`int | None` in the config reference) split the row on GitHub and shifted the defaults."""
    pages = load_script()
    assert pages.table_cell("`int | None`") == "<code>int &#124; None</code>"
    assert pages.table_cell("a | b, `x`") == "a \\| b, `x`"
    generated = {path: page() for path, page in pages.PAGES.items()}
    generated.update(pages.snippet_files())
    for path, content in generated.items():
        header = None
        for number, line in enumerate(content.splitlines(), 1):
            if not line.startswith("|"):
                header = None
                continue
            if header is None:
                header = github_cells(line)
            assert github_cells(line) == header, f"{path}:{number}: {line[:120]}"


def test_check_names_a_stale_page_and_the_fix(tmp_path, capsys):
    pages = load_script()
    pages.ROOT = tmp_path
    pages.PAGES = {}  # the changelog page reads CHANGELOG.md from ROOT
    pages.SNIPPETS = {
        "results/memory": ("loss_memory.json", pages.memory_snippets),
        "reference/config": ("trl_sdft/config.py", pages.config_snippets),
    }
    generated = tmp_path / "docs" / "generated"
    page, target = generated / "reference" / "config" / "inherited.md", generated / "results" / "memory" / "loss.md"
    assert pages.main(["--check"]) == 1
    assert "docs/generated/results/memory/loss.md (missing)" in capsys.readouterr().err
    assert pages.main([]) == 0 and target.exists() and page.exists()
    assert pages.main(["--check"]) == 0
    target.write_text(target.read_text().replace("| 8x256 |", "| 8x255 |", 1))
    assert pages.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "docs/generated/results/memory/loss.md (differs" in err and "python scripts/docs_pages.py" in err
    page.write_text(page.read_text().replace("`bf16_full_eval` | `False`", "`bf16_full_eval` | `True`", 1))
    orphan = target.parent / "old_table.md"  # a snippet nothing generates any more
    orphan.write_text("| stale |")
    assert pages.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "config/inherited.md (differs" in err and "old_table.md (nothing generates it" in err
    assert pages.main([]) == 0 and not orphan.exists() and pages.main(["--check"]) == 0


def test_site_builds_strict(tmp_path):
    missing = [name for name in ("mkdocs", "material", "mkdocstrings_handlers.python") if not _importable(name)]
    if missing:
        pytest.skip(f"the docs extra is not installed ({', '.join(missing)}): pip install -e '.[docs]'")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    assert (tmp_path / "site" / "reference" / "config" / "index.html").exists()


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_every_plot_is_shown_on_a_page():
    """The plots (`scripts/docs_plots.py`) are generated files like the tables (`--check` finds them stale), and
    each one is shown on a page: the results pages beside their tables, the step diagram on `concepts/step.md`."""
    pages = load_script()
    rendered = pages.render()
    plots = [path for path in rendered if path.endswith(".svg")]
    assert len(plots) >= 6
    texts = [content for name, content in rendered.items() if name.endswith(".md")]
    texts += [path.read_text() for path in (ROOT / "docs").rglob("*.md")]
    for path in plots:
        assert rendered[path].lstrip().startswith("<?xml") and "<svg" in rendered[path]
        assert any(f"(../assets/plots/{Path(path).name})" in text for text in texts), f"{path} is on no page"
    assert "```mermaid" not in "".join(texts), "a diagram that needs a script from a CDN shows as source offline"


def test_every_snippet_is_included_by_a_page_and_every_include_exists():
    """The pages written in Markdown and what the script generates for them agree: a snippet no page includes is
    a table nobody sees, an include of a snippet never generated breaks the build."""
    pages = load_script()
    generated = {path.removeprefix(pages.GENERATED + "/") for path in pages.snippet_files()}
    included = set()
    for page in (ROOT / "docs").rglob("*.md"):
        if pages.GENERATED in str(page.relative_to(ROOT)):
            continue
        included |= set(re.findall(r'^--8<-- "([^"]+)"$', page.read_text(), re.M))
    assert included and generated
    assert not generated - included, f"generated, included nowhere: {sorted(generated - included)}"
    assert not included - generated, f"included, never generated: {sorted(included - generated)}"
