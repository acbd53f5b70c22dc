"""Procedurally generated data as a Ray Dataset: one generator call per item, in parallel Ray tasks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa
import ray.data


def _columns_to_table(batch: dict, *, make_columns: Callable[..., dict], key: str, schema: pa.Schema, **kwargs):
    tables = [pa.table(make_columns(**{key: int(i)}, **kwargs), schema=schema) for i in batch[key]]
    return pa.concat_tables(tables)


def from_generator(
    make_columns: Callable[..., dict[str, list]], key: str, items: list[int], schema: pa.Schema, **kwargs: Any
) -> ray.data.Dataset:
    """A lazy dataset of `schema` rows: `make_columns(key=item, **kwargs)` for each item, one Ray task each."""
    seeds = ray.data.from_items([{key: i} for i in items], override_num_blocks=max(1, len(items)))
    return seeds.map_batches(
        _columns_to_table,
        batch_size=1,
        fn_kwargs=dict(make_columns=make_columns, key=key, schema=schema, **kwargs),
    )
