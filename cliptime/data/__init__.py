"""Data: procedural generators, Parquet shards (pyarrow) and the Ray Data pipelines that feed training."""
