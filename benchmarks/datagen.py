"""Data generation and Parquet throughput, per core (one process, no Ray), at the default sizes.

    python benchmarks/datagen.py

- fungal-growth images per second (one 100-frame sequence at a time, 64 px, encoded as shards store them);
- mixed-up clips per second (blocks of the T-CLAP generator: 2-s 16-kHz clips, both orders plus singles);
- Parquet write and read throughput (MB/s and rows/s) of those rows with pyarrow.
Results: benchmarks/results/datagen-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import RESULTS, machine, today, write_results


def per_second(fn, repeats: int) -> tuple[float, dict]:
    """(rows per second, the last columns) of `fn()` called `repeats` times."""
    started, rows, columns = time.time(), 0, {}
    for i in range(repeats):
        columns = fn(i)
        rows += len(next(iter(columns.values())))
    return rows / (time.time() - started), columns


def parquet_throughput(columns: dict, schema, path: Path, copies: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pa.table(columns, schema=schema)] * copies)
    started = time.time()
    pq.write_table(table, path)
    write_s = time.time() - started
    started = time.time()
    pq.read_table(path)
    read_s = time.time() - started
    mb = path.stat().st_size / 1e6
    return {
        "rows": table.num_rows,
        "file_mb": round(mb, 1),
        "write_mb_per_s": mb / write_s,
        "write_rows_per_s": table.num_rows / write_s,
        "read_mb_per_s": mb / read_s,
        "read_rows_per_s": table.num_rows / read_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=3, help="generated fungal sequences to time")
    parser.add_argument("--blocks", type=int, default=2, help="generated T-CLAP blocks (25 pairs + 12 singles) to time")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    from cliptime.data.fungal_growth import generate_sequence
    from cliptime.data.sound_events import generate_block
    from cliptime.tasks import TASKS

    images_per_s, images = per_second(
        lambda i: generate_sequence(0, i, frames=100, size=64, hours=(0.0, 72.0), template_set="generic"),
        args.sequences,
    )
    clips_per_s, clips = per_second(
        lambda i: generate_block(
            0,
            "train",
            i,
            pairs=25,
            singles=12,
            sample_rate=16000,
            clip_seconds=2.0,
            gap_seconds=(0.0, 0.0),
            template_set="basic",
        ),
        args.blocks,
    )
    with tempfile.TemporaryDirectory() as tmp:
        fungal_io = parquet_throughput(images, TASKS["cliptime"].schema, Path(tmp) / "fungal.parquet", 20)
        audio_io = parquet_throughput(clips, TASKS["tclap"].schema, Path(tmp) / "clips.parquet", 10)

    when = today()
    command = f"python benchmarks/datagen.py --sequences {args.sequences} --blocks {args.blocks}"
    payload = {
        "date": when,
        "machine": machine(),
        "command": command,
        "fungal_images_per_second_per_core": images_per_s,
        "mixed_clips_per_second_per_core": clips_per_s,
        "parquet_fungal": fungal_io,
        "parquet_clips": audio_io,
    }
    report = "\n".join(
        [
            f"# Data generation benchmark, {when}",
            "",
            f"Command: `{command}`  ",
            f"Machine: {payload['machine']}",
            "",
            "| what | per second, one core |",
            "|---|---|",
            f"| fungal-growth images (64 px, encoded) | {images_per_s:.0f} |",
            f"| mixed-up clips (2 s, 16 kHz, PCM16) | {clips_per_s:.0f} |",
            "",
            "| Parquet (pyarrow) | rows | MB | write MB/s | write rows/s | read MB/s | read rows/s |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {name} | {r['rows']} | {r['file_mb']} | {r['write_mb_per_s']:.0f} | {r['write_rows_per_s']:.0f} "
                f"| {r['read_mb_per_s']:.0f} | {r['read_rows_per_s']:.0f} |"
                for name, r in (("fungal images", fungal_io), ("audio clips", audio_io))
            ),
            "",
        ]
    )
    written = write_results(args.out, f"datagen-{when}", payload, report)
    print(json.dumps({"written": str(written), **{k: v for k, v in payload.items() if k.endswith("per_core")}}))


if __name__ == "__main__":
    main()
