"""The README names a test or results file beside each claim: every one it names must exist."""

from __future__ import annotations

import importlib
import re
import sys

import pytest

from tests.conftest import ROOT


def test_every_test_and_results_file_the_readme_names_exists():
    readme = (ROOT / "README.md").read_text()
    missing = []
    for path, name in re.findall(r"(tests/\w+\.py)(?:::(\w+))?", readme):
        source = ROOT / path
        if not source.is_file() or (name and not re.search(rf"^def {name}\(", source.read_text(), re.M)):
            missing.append(f"{path}::{name}" if name else path)
    for path in re.findall(r"(benchmarks/results/[\w.-]+\.(?:md|json))", readme):
        if not (ROOT / path).is_file():
            missing.append(path)
    assert not missing, missing


def benchmark_module(name: str):
    """A module of benchmarks/ imported as its scripts import each other (their folder first on the path)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_readme_tables_are_those_their_results_files_give():
    """Every generated table (between `<!-- table from FILE -->` markers) is what benchmarks/readme_tables.py draws
    from the results file it names: no figure in them is copied or edited by hand."""
    readme_tables = benchmark_module("readme_tables")
    readme = (ROOT / "README.md").read_text()
    assert readme_tables.BLOCK.search(readme), "the README has no generated table"
    assert readme_tables.render(readme) == readme, "run python benchmarks/readme_tables.py"


def test_a_metric_over_seeds_has_its_mean_and_sample_spread():
    common = benchmark_module("common")
    mean_std, over_seeds = common.mean_std, common.over_seeds
    summary = over_seeds([{"acc": 0.90, "mae": 2.0}, {"acc": 0.95}, {"acc": 1.00}])
    assert summary["acc"]["mean"] == pytest.approx(0.95) and summary["acc"]["std"] == pytest.approx(0.05)
    assert summary["mae"] == {"mean": 2.0, "std": 0.0, "values": [2.0]}  # only the runs that have it
    assert mean_std(summary["acc"]) == "0.950 ± 0.050" and mean_std(summary["mae"]) == "2.000"
