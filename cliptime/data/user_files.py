"""A user's own files -> checked rows: the shared first pass of `jobs/make_shards.py timelapse|esc50`.

Every input file is read in parallel Ray Data tasks by a task-specific reader (decode, check, resize or resample)
that returns the compact, model-sized version of the file plus an `error` column instead of raising. The result
streams to Parquet in a scratch directory, so a collection larger than memory works and the expensive decode
happens once. Then the problems found while listing and reading are settled in one place: by default the first
one stops the command with a message naming the file (and manifest line); with `--skip-bad` they are skipped and
reported. The converters then build the task's shards from the good rows (`cliptime.data.shards.write_shards`,
which writes atomically).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import ray.data
from ray.data.expressions import col

from cliptime.errors import CliptimeError

ROWS_PER_READ_TASK = 16


@dataclass(frozen=True)
class BadInput:
    input: str  # the file, or "manifest.csv line N"
    reason: str

    def __str__(self) -> str:
        return f"{self.input}: {self.reason}"


def visible_files(root: Path, suffixes: set[str]) -> list[Path]:
    """The files under `root` whose suffix (lower-cased, with its dot) is in `suffixes`, sorted. Hidden files and
    folders (a name starting with "."), such as the `._*` files macOS writes beside photos copied to another disk,
    or `.Trashes`, are neither data nor errors: they are left out."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in suffixes
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


class BadInputsError(CliptimeError):
    """Bad inputs that stop a conversion without --skip-bad."""


def read_csv_table(path: Path) -> pd.DataFrame:
    """A user's CSV file, every cell as text (an empty cell stays ""). A file that is no CSV table (a line with more
    fields than the header, bytes that are not UTF-8 text, nothing at all) stops the command in one line naming it:
    no row of such a file can be trusted to be what its columns say."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise CliptimeError(f"{path} is not a CSV table ({str(e).strip()})") from None


def settle(problems: list[BadInput], skip_bad: bool) -> list[str]:
    """Stop on the first problem, or (with --skip-bad) return them all as lines for the report."""
    if problems and not skip_bad:
        more = f" (and {len(problems) - 1} more bad inputs)" if len(problems) > 1 else ""
        raise BadInputsError(f"{problems[0]}{more}; fix it, or pass --skip-bad to skip bad inputs")
    return [str(p) for p in problems]


def read_checked(
    items: pd.DataFrame, reader: Callable[[pd.DataFrame], pd.DataFrame], scratch: Path
) -> tuple[ray.data.Dataset, list[BadInput]]:
    """Run `reader` over `items` (one row per file, with an `input` column naming it) in parallel.

    `reader` maps a pandas batch to the same batch plus an `error` column ("" when the file is fine) and its own.
    Returns the good rows (a lazy dataset over the scratch Parquet) and the files that could not be read.
    """
    records = items.to_dict("records")
    ds = ray.data.from_items(records, override_num_blocks=max(1, -(-len(records) // ROWS_PER_READ_TASK)))
    return checked(ds.map_batches(reader, batch_format="pandas", batch_size=ROWS_PER_READ_TASK), scratch)


def checked(rows: ray.data.Dataset, scratch: Path) -> tuple[ray.data.Dataset, list[BadInput]]:
    """Stream `rows` (each naming its `input`, with an `error` that is "" for a good one) to Parquet in `scratch`,
    once; return the good rows (a lazy dataset over that Parquet) and the bad inputs (none at all: an empty
    dataset)."""
    rows.write_parquet(str(scratch))
    if not any(Path(scratch).glob("*.parquet")):
        return ray.data.from_items([]), []
    status = ray.data.read_parquet(str(scratch)).select_columns(["input", "error"]).to_pandas()
    bad = [BadInput(r.input, r.error) for r in status.itertuples() if r.error]
    good = ray.data.read_parquet(str(scratch)).filter(expr=col("error") == "")
    return good, bad


def _split_as_table(batch: pd.DataFrame, split: str, schema: pa.Schema) -> pa.Table:
    # typed by the task's schema: an empty batch would otherwise infer null-typed columns
    return pa.Table.from_pandas(batch[batch["split"] == split][schema.names], schema=schema, preserve_index=False)


def by_split(rows: ray.data.Dataset, schema: pa.Schema) -> dict[str, ray.data.Dataset]:
    """Lazy datasets of `schema` rows per split, from rows carrying a `split` column."""
    return {
        split: rows.map_batches(_split_as_table, batch_format="pandas", fn_kwargs={"split": split, "schema": schema})
        for split in ("train", "val", "test")
    }
