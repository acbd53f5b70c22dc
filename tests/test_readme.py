"""The README and the docs/ pages name a test or results file beside each claim: every one they name must exist,
and so must every docs/ page the README links to."""

from __future__ import annotations

import importlib
import re
import sys

import pytest

from tests.conftest import ROOT


def pages() -> list:
    """The README and the docs pages: where claims name their tests and results files."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_test_and_results_file_the_readme_names_exists():
    missing = []
    for page in pages():
        text = page.read_text()
        where = page.relative_to(ROOT)
        for path, name in re.findall(r"(tests/\w+\.py)(?:::(\w+))?", text):
            source = ROOT / path
            if not source.is_file() or (name and not re.search(rf"^def {name}\(", source.read_text(), re.M)):
                missing.append(f"{where}: {path}::{name}" if name else f"{where}: {path}")
        for path in re.findall(r"(benchmarks/results/[\w.-]+\.(?:md|json))", text):
            if not (ROOT / path).is_file():
                missing.append(f"{where}: {path}")
    assert not missing, missing


def anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_docs_page_and_section_the_readme_links_to_exists():
    readme = (ROOT / "README.md").read_text()
    links = set(re.findall(r"\]\((docs/[\w.-]+\.md)(?:#([\w-]+))?\)", readme))
    assert links, "the README links to no docs page"
    broken = []
    for path, section in links:
        page = ROOT / path
        headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M) if page.is_file() else None
        if headings is None or (section and section not in {anchor(h) for h in headings}):
            broken.append(f"{path}#{section}" if section else path)
    assert not broken, broken


def benchmark_module(name: str):
    """A module of benchmarks/ imported as its scripts import each other (their folder first on the path)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_readme_tables_are_those_their_results_files_give():
    """Every generated table (between `<!-- table from FILE -->` markers) in the README and the docs pages is what
    benchmarks/readme_tables.py draws from the results file it names: no figure in them is copied or edited by
    hand."""
    readme_tables = benchmark_module("readme_tables")
    assert readme_tables.pages() == pages()
    assert readme_tables.BLOCK.search((ROOT / "README.md").read_text()), "the README has no generated table"
    stale = [str(p.relative_to(ROOT)) for p in pages() if readme_tables.render(p.read_text()) != p.read_text()]
    assert not stale, f"run python benchmarks/readme_tables.py ({', '.join(stale)})"


def test_a_metric_over_seeds_has_its_mean_and_sample_spread():
    common = benchmark_module("common")
    mean_std, over_seeds = common.mean_std, common.over_seeds
    summary = over_seeds([{"acc": 0.90, "mae": 2.0}, {"acc": 0.95}, {"acc": 1.00}])
    assert summary["acc"]["mean"] == pytest.approx(0.95) and summary["acc"]["std"] == pytest.approx(0.05)
    assert summary["mae"] == {"mean": 2.0, "std": 0.0, "values": [2.0]}  # only the runs that have it
    assert mean_std(summary["acc"]) == "0.950 ± 0.050" and mean_std(summary["mae"]) == "2.000"
