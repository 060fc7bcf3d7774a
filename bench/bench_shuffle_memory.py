"""Peak private memory of Ray's shuffle map and reduce tasks while ``pool.pack_batches`` (the
``HashShuffleMap(batch_id)`` step of select) runs on real rows: the packed batches of an
earlier ``slap select`` run, read back and flattened to one row per example.

    python bench/bench_select_scale.py --sizes 1000000 ...   # leaves stages/batches behind
    python bench/bench_shuffle_memory.py --files 20 [--batch-mib 128]

``--files`` picks how many of the packed files to use (20 hold the 1M pool); ``--batch-mib``
sets ``DataContext.shuffle_input_batch_bytes`` (Ray's default 1 GiB when left out, the job's
bound otherwise). Nothing else should run on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("MIMALLOC_PURGE_DELAY", "0")

import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import ray  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench_select_scale import private_bytes  # noqa: E402  (this script's own folder)

from slap_ray.jobs.prepare import BATCH_COLUMNS  # noqa: E402
from slap_ray.ray import pool  # noqa: E402

DEFAULT_BATCHES = REPO / "bench" / "work" / "size1000000" / "run1000000" / "stages" / "batches"


def unpack(batch: pa.Table) -> pa.Table:
    """Packed batches (one row per batch, lists of its rows' values) -> one row per example."""
    parents = pc.list_parent_indices(batch["id"])
    columns = {"batch_id": pc.take(batch["batch_id"], parents)}
    columns.update({c: pc.list_flatten(batch[c]) for c in BATCH_COLUMNS})
    return pa.table(columns)


class Peaks:
    """The largest private memory of each kind of this run's Ray processes (by task or actor
    name)."""

    def __init__(self) -> None:
        self.by_name: dict[str, float] = defaultdict(float)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            for process in psutil.Process().children(recursive=True):  # this run's Ray only
                with contextlib.suppress(psutil.Error, OSError):
                    command = " ".join(process.cmdline())
                    if command.startswith("ray::"):
                        name = command.split(" ")[0][:60]
                        private = private_bytes(process) / 2**30
                        self.by_name[name] = max(self.by_name[name], private)
            time.sleep(0.2)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return dict(self.by_name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=Path, default=DEFAULT_BATCHES)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--block-rows", type=int, default=50_000)
    parser.add_argument("--partitions", type=int, default=20)
    parser.add_argument("--batch-mib", type=int)
    parser.add_argument("--store-gib", type=int, default=3)
    args = parser.parse_args()
    files = sorted(str(p) for p in args.batches.glob("*.parquet"))[: args.files]
    if not files:
        raise SystemExit(f"--batches: no packed batches in {args.batches}")
    ray.init(num_cpus=2, object_store_memory=args.store_gib << 30, include_dashboard=False)
    from ray.data import DataContext

    if args.batch_mib:  # before any dataset is made: each keeps the context it was made in
        DataContext.get_current().shuffle_input_batch_bytes = args.batch_mib << 20
    rows = ray.data.read_parquet(files).map_batches(unpack, batch_format="pyarrow", batch_size=None)
    rows = rows.repartition(target_num_rows_per_block=args.block_rows).materialize()
    peaks = Peaks()
    start = time.perf_counter()
    pool.pack_batches(rows, BATCH_COLUMNS, args.partitions).materialize()
    wall = time.perf_counter() - start
    found = peaks.stop()
    batch = DataContext.get_current().shuffle_input_batch_bytes >> 20
    print(
        f"rows={rows.count()} input={rows.size_bytes() / 2**20:.0f} MiB "
        f"shuffle_input_batch={batch} MiB wall={wall:.1f} s"
    )
    for name, gib in sorted(found.items(), key=lambda item: -item[1])[:5]:
        print(f"  {gib:5.2f} GiB  {name}")


if __name__ == "__main__":
    main()
