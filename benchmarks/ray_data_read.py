"""Wall time of one small Parquet read through Ray Data, with its first- and second-generation file datasources.

    python benchmarks/ray_data_read.py            # 5 reads each of a 2-file, 2,000-row data set after a warm-up

Why: every shard read and every converter pass of this project goes through `ray.data.read_parquet`;
`cliptime.runtime.configure_ray_data` picks the datasource by this measurement.
Results: benchmarks/results/ray-data-read-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from common import RESULTS, machine, today, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reads", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    import numpy as np
    import pandas as pd
    import ray.data

    from cliptime.runtime import start_local_ray

    start_local_ray(2)
    context = ray.data.DataContext.get_current()
    with tempfile.TemporaryDirectory() as data:
        frame = pd.DataFrame({"x": np.arange(2000), "caption": ["a photo"] * 2000})
        ray.data.from_pandas(frame).repartition(2).write_parquet(data)
        seconds = {}
        for v2 in (True, False):
            context.use_datasource_v2 = v2
            ray.data.read_parquet(data).to_pandas()  # warm-up: workers started, modules imported
            times = []
            for _ in range(args.reads):
                started = time.perf_counter()
                ray.data.read_parquet(data).to_pandas()
                times.append(time.perf_counter() - started)
            seconds["datasource_v2" if v2 else "datasource_v1"] = times
    payload = {
        "date": today(),
        "machine": machine(),
        "command": "python benchmarks/ray_data_read.py",
        "ray": ray.__version__,
        "seconds": seconds,
        "median_seconds": {k: statistics.median(v) for k, v in seconds.items()},
    }
    md = [
        f"# Ray Data Parquet read, {payload['date']}",
        "",
        f"Machine: {payload['machine']}; Ray {ray.__version__}; command: `{payload['command']}`",
        "",
        "| datasource | median s | all reads, s |",
        "|---|---|---|",
        *(
            f"| {k} | {payload['median_seconds'][k]:.2f} | {', '.join(f'{t:.2f}' for t in v)} |"
            for k, v in seconds.items()
        ),
        "",
    ]
    written = write_results(args.out, f"ray-data-read-{payload['date']}", payload, "\n".join(md))
    print(json.dumps({"written": str(written), **payload["median_seconds"]}))


if __name__ == "__main__":
    main()
