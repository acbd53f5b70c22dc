"""Write the README's tables of measured figures from the results files they name, so that no figure is copied by
hand.

A generated table sits between two markers in README.md; the first names its results file (and, for a file that
holds several tasks, the task):

    <!-- table from benchmarks/results/jobs-cliptime-2026-11-25.json cliptime -->
    ...
    <!-- end of table -->

    python benchmarks/readme_tables.py           # rewrite every marked table from its file
    python benchmarks/readme_tables.py --check   # exit 1 if a table differs from its file (a test runs this)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import quality
from common import ROOT

import jobs

README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- table from (\S+)(?: (\w+))? -->\n)(.*?)(<!-- end of table -->)", re.S)


def table(results_file: str, task: str | None) -> str:
    """The Markdown table of one results file (the benchmark that wrote it is the file's name up to its first `-`)."""
    payload = json.loads((ROOT / results_file).read_text())
    kind = Path(results_file).name.split("-")[0]
    rows = [r for r in payload["results"] if task is None or r["task"] == task]
    if not rows:
        sys.exit(f"error: {results_file} has no results for task {task!r}")
    if kind == "jobs":
        return jobs.readme_table(rows)
    if kind == "quality":
        return quality.table(rows, rows[0]["task"])
    sys.exit(f"error: {results_file}: no README table is drawn from {kind} results")


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m[1] + table(m[2], m[3]) + "\n" + m[5], text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a table is out of date")
    args = parser.parse_args()
    text = README.read_text()
    rendered = render(text)
    if args.check:
        sys.exit(0 if rendered == text else "README tables differ from their results files: run " + __file__)
    README.write_text(rendered)


if __name__ == "__main__":
    main()
