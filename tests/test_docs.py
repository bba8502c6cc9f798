"""The project's own account of its tree stays true to the tree: README's layout section names every
top-level module of m6_engine, docs/architecture.md's module table names every module of each
package it lists (and no module that is gone), and nothing cites a file outside the repository."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "m6_engine"
# Documents a user reads; anything they cite must be in the clone.
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _top_level_modules():
    """m6_engine's modules and packages, as README writes them (`config.py`, `ops/`)."""
    names = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    names |= {p.name + "/" for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return names


def _readme_layout() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Layout of the tree", 1)[1]
    return section.split("```", 2)[1]


def test_readme_layout_lists_every_top_level_module():
    layout = _readme_layout()
    listed = set(re.findall(r"m6_engine/([\w.]+/?)", layout))
    assert _top_level_modules() - listed == set(), "README's layout misses these m6_engine modules"
    gone = {name for name in listed if not (PACKAGE / name.rstrip("/")).exists()}
    assert not gone, f"README's layout lists modules that do not exist: {sorted(gone)}"


def _module_table_rows():
    """(package folder, the row's text) of each `m6_engine/<pkg>/` or `megatron_ext/` row."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for line in text.splitlines():
        match = re.match(r"\| `(m6_engine/\w+|megatron_ext)/`", line)
        if match:
            yield ROOT / match.group(1), line


@pytest.mark.parametrize("folder,row", [pytest.param(f, r, id=f.name) for f, r in _module_table_rows()])
def test_architecture_module_table_names_each_module_of_the_package(folder, row):
    modules = {p.stem for p in folder.glob("*.py") if p.name != "__init__.py"}
    modules |= {p.name for p in folder.iterdir()
                if p.is_dir() and (p / "__init__.py").exists()}
    named = set(re.findall(r"`(\w+)/?`", row.split("|")[2]))  # the job column
    missing = modules - named
    assert not missing, f"docs/architecture.md's row for {folder.name}/ does not name {sorted(missing)}"
    # A lowercase name in backticks that looks like a module of this package but is not one: a
    # module that was removed or renamed (names with capitals, dots or calls are other things).
    stale = {n for n in named if re.fullmatch(r"_?[a-z][a-z0-9_]*", n) and n not in modules
             and not (folder / n).exists()}
    assert not stale, f"docs/architecture.md's row for {folder.name}/ names modules that do not exist: {sorted(stale)}"


def test_module_table_covers_the_packages():
    folders = {f.name for f, _ in _module_table_rows()}
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages | {"megatron_ext"} <= folders


def test_nothing_cites_files_outside_the_repository():
    outside = re.compile(r"\.\./shared|DESIGN\.md|STYLE\.md")
    sources = [*DOCUMENTS, *ROOT.glob("*.py"), *ROOT.glob("Makefile"),
               *(p for d in ("m6_engine", "megatron_ext", "csrc", "examples", "tests")
                 for p in (ROOT / d).rglob("*") if p.is_file() and p.suffix in {".py", ".md", ".cpp", ".cu", ".h",
                                                                                ".cuh", ".yaml", ".sh"})]
    cited = [str(p.relative_to(ROOT)) for p in sources
             if p != pathlib.Path(__file__) and outside.search(p.read_text(encoding="utf-8", errors="replace"))]
    assert not cited, f"these files cite documents that are not in the repository: {cited}"
