"""The README names a test or results file beside each claim: every one it names must exist."""

from __future__ import annotations

import re

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
