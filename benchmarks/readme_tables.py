"""Write the tables of measured figures in README.md and docs/*.md from the results files they name, so that no
figure is copied by hand.

A generated table sits between two markers; the first names its results file (and, for a file that holds several
tasks, the task):

    <!-- table from benchmarks/results/jobs-cliptime-2026-11-25.json cliptime -->
    ...
    <!-- end of table -->

    python benchmarks/readme_tables.py           # rewrite every marked table from its file
    python benchmarks/readme_tables.py --check   # exit 1 if a table differs from its file (a test runs this)

Tables are drawn from `jobs`, `quality`, `pipeline`, `serve` and `sweeps` results (the benchmark that wrote a file
is its name up to the first `-`). Results files of the older format (one run per row: plain `seconds` and `metrics`
numbers, no seeds) give one-seed tables, with a `seeds` column of 1.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pipeline
import quality
import sweeps
from common import COLUMNS, ROOT, markdown_table, over_seeds

import jobs
import serve

README = ROOT / "README.md"
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(<!-- table from (\S+)(?: (\w+))? -->\n)(.*?)(<!-- end of table -->)", re.S)
# Column names of metrics that only older results files hold (the others are named in common.COLUMNS).
OLDER_COLUMNS = {"macro_f1": "macro-F1"}


def pages() -> list[Path]:
    """The files whose tables are generated: the README and the docs pages."""
    return [README, *sorted(DOCS.glob("*.md"))]


def one_run(row: dict) -> dict:
    """A jobs row of the older format (one run) as a summary over its one seed."""
    if "summary" in row:
        return row
    return {**row, "seeds": [None], "summary": over_seeds([{"seconds": row["seconds"], **row["metrics"]}])}


def one_run_quality_table(rows: list[dict]) -> str:
    """The table of older quality rows (one run each, plain numbers): the columns are the metrics the rows hold."""
    task = rows[0]["task"]
    names = dict(COLUMNS[task])
    keys = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    header = [
        "configuration",
        *(names.get(k) or names.get(f"{k}_image_only") or OLDER_COLUMNS.get(k, k) for k in keys),
        "job (s)",
        "seeds",
        "command",
    ]
    lines = [
        [
            r["config"],
            *(f"{r['metrics'][k]:.3f}" if k in r["metrics"] else "-" for k in keys),
            "(with the row above)" if r["seconds"] is None else f"{r['seconds']:.0f}",
            "1",
            f"`{r['command']}`",
        ]
        for r in rows
    ]
    return markdown_table(header, lines)


def table_lines(markdown: str) -> str:
    """The table rows of a benchmark's Markdown report (its title, machine and notes left out)."""
    return "\n".join(line for line in markdown.splitlines() if line.startswith("|"))


def table(results_file: str, task: str | None) -> str:
    """The Markdown table of one results file (the benchmark that wrote it is the file's name up to its first `-`)."""
    payload = json.loads((ROOT / results_file).read_text())
    kind = Path(results_file).name.split("-")[0]
    rows = [r for r in payload["results"] if task is None or r["task"] == task]
    if not rows:
        sys.exit(f"error: {results_file} has no results for task {task!r}")
    if kind == "jobs":
        return jobs.readme_table([one_run(r) for r in rows])
    if kind == "quality":
        if all(isinstance(v, dict) for r in rows for v in r["metrics"].values()):
            return quality.table(rows, rows[0]["task"])
        return one_run_quality_table(rows)
    if kind == "pipeline":
        return table_lines(pipeline.markdown(rows, payload["command"], payload["date"], payload["machine"]))
    if kind == "serve":
        return table_lines(serve.markdown(rows, payload["command"], payload["date"], payload["machine"], 0))
    if kind == "sweeps":
        return "\n\n".join(sweeps.comparison_table(r) for r in rows)
    sys.exit(f"error: {results_file}: no table is drawn from {kind} results")


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m[1] + table(m[2], m[3]) + "\n" + m[5], text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a table is out of date")
    args = parser.parse_args()
    stale = []
    for page in pages():
        text = page.read_text()
        rendered = render(text)
        if rendered == text:
            continue
        stale.append(str(page.relative_to(ROOT)))
        if not args.check:
            page.write_text(rendered)
    if args.check and stale:
        sys.exit(f"tables in {', '.join(stale)} differ from their results files: run {__file__}")


if __name__ == "__main__":
    main()
