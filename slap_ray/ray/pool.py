"""Ray Data steps over the whole pool: duplicate ids, the seeded ``max_rows`` sample, strata by
a column, batch composition, and small aggregates.

Rows stay in the cluster. What reaches the driver is bounded whatever the pool size: counts
per group, a 4096-bucket histogram, the rows of one histogram bucket, and object refs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import Dataset
from ray.data.aggregate import Count, Min
from ray.data.expressions import col

from slap_ray.core.seeds import id_rank_key
from slap_ray.core.strata import (
    bucket_bits,
    bucket_offsets,
    compose_keys,
    key_buckets,
    rank_within_clusters,
    stratified_positions,
)
from slap_ray.data.rows import origin_key, reject_duplicates

HISTOGRAM_BITS = 12  # rank keys are 63-bit; the top 12 bits pick a histogram bucket
# Python sha256 per row: keep the pandas work of these steps in plain tasks, one CPU each.
PANDAS = {"batch_format": "pandas"}
# Rows per Parquet row group in the tables select writes: large enough that footers stay small.
ROW_GROUP_ROWS = 8192
# Rows ranked in one compose task: larger strata are ranked in key buckets of about this size.
COMPOSE_GROUP_ROWS = 50_000


def accumulate(parts: Dataset, keys: list[str]) -> pd.DataFrame:
    """Sum small per-block tables by ``keys`` while they stream in: the driver holds one table
    of (distinct keys x columns), never the per-block parts all at once."""
    total: pd.DataFrame | None = None
    for part in parts.iter_batches(batch_size=None, batch_format="pandas"):
        merged = part if total is None else pd.concat([total, part], ignore_index=True)
        total = merged.groupby(keys, dropna=False, as_index=False).sum()
    return total if total is not None else pd.DataFrame(columns=keys)


def counts_by(ds: Dataset, keys: list[str], sums: tuple[str, ...] = ()) -> pd.DataFrame:
    """Rows (column ``rows``) and column sums per distinct value of low-cardinality ``keys``."""

    def count(batch: pd.DataFrame) -> pd.DataFrame:
        frame = batch[[*keys, *sums]].copy()
        for key in keys:
            frame[key] = frame[key].astype(object).where(frame[key].notna(), "<none>")
        frame["rows"] = 1
        return frame.groupby(keys, dropna=False, as_index=False).sum()

    total = accumulate(ds.map_batches(count, batch_size=None, **PANDAS), keys)
    for key in keys:
        total[key] = total[key].where(total[key] != "<none>", None)
    if "rows" not in total:
        total["rows"] = pd.Series(dtype="int64")
    return total


def mark_duplicates(rows: Dataset, partitions: int) -> Dataset:
    """Reject every accepted row whose id an earlier (path, line) already holds
    (``slap_ray.data.rows.reject_duplicates``).

    An exact distributed groupby finds ids held by more than one accepted row and the first
    origin of each; that table (duplicated ids only) travels to the workers by reference.
    """
    narrow = accepted(rows).select_columns(["id", "path", "line"])
    keyed = narrow.map_batches(
        lambda b: pd.DataFrame({"id": b["id"], "origin": origin_key(b["path"], b["line"])}),
        **PANDAS,
    )
    firsts = (
        keyed.groupby("id", num_partitions=partitions)
        .aggregate(Count(alias_name="copies"), Min("origin", alias_name="first"))
        .filter(expr=col("copies") > 1)
        .select_columns(["id", "first"])
        .materialize()
    )
    refs = firsts.to_arrow_refs()
    fetched: dict[str, dict] = {}  # per task: the table is fetched once, not once per batch

    def first_origins() -> dict:
        if "first" not in fetched:
            table = fetch_table(refs)
            ids = table["id"].to_pylist() if table is not None else []
            origins = table["first"].to_pylist() if table is not None else []
            fetched["first"] = dict(zip(ids, origins, strict=True))
        return fetched["first"]

    def reject(batch: pd.DataFrame) -> pd.DataFrame:
        return reject_duplicates(batch, first_origins())

    return rows.map_batches(reject, **PANDAS)


def with_rank_key(rows: Dataset, seed: int, stage: str) -> Dataset:
    """Add ``rank_key`` (int64, ``id_rank_key``) to accepted rows; -1 on rejected ones."""

    def add(batch: pd.DataFrame) -> pd.DataFrame:
        accepted = batch["reject_reason"].isna().to_numpy()
        batch["rank_key"] = [
            id_rank_key(seed, stage, i) if ok else -1
            for i, ok in zip(batch["id"], accepted, strict=True)
        ]
        return batch

    return rows.map_batches(add, **PANDAS)


# Row filters are Arrow expressions: a Python filter (``filter(fn)``) rebuilds each block
# from Python row objects, token lists included (at 1M rows strata took 40.9 s with them and
# 14.7 s with expressions).
def accepted(rows: Dataset) -> Dataset:
    """The rows no step rejected."""
    return rows.filter(expr=col("reject_reason").is_null())


def rejected(rows: Dataset) -> Dataset:
    """The rows some step rejected (``reject_reason`` set)."""
    return rows.filter(expr=col("reject_reason").is_not_null())


def truncated(rows: Dataset) -> tuple[int, int]:
    """(rows cut to fit max_length, tokens they lost) of tokenised rows."""
    cut = rows.filter(expr=col("truncated_tokens") > 0)
    count = cut.count()
    return count, int(cut.sum("truncated_tokens") or 0) if count else 0


def sampled(rows: Dataset, wanted: bool = True) -> Dataset:
    """The rows ``mark_sampled`` kept (or, with ``wanted=False``, left out)."""
    return rows.filter(expr=col("sampled") if wanted else ~col("sampled"))


def where_in(rows: Dataset, column: str, values: Iterable, inside: bool = True) -> Dataset:
    """The rows whose ``column`` holds one of ``values`` (or, with ``inside=False``, none)."""
    values = sorted(values)
    return rows.filter(expr=col(column).is_in(values) if inside else col(column).not_in(values))


def sample_threshold(rows: Dataset, keep: int) -> tuple[int, str] | None:
    """The exact ``keep``-th smallest (rank_key, id) of the accepted rows, or None when there
    are no more than ``keep`` of them. Two passes: a histogram of the keys' top bits, then
    the rows of the one bucket the threshold falls in."""
    shift = 63 - HISTOGRAM_BITS

    def histogram(batch: pd.DataFrame) -> pd.DataFrame:
        keys = batch["rank_key"].to_numpy(np.int64)
        counts = np.bincount(keys[keys >= 0] >> shift, minlength=2**HISTOGRAM_BITS)
        found = np.flatnonzero(counts)
        return pd.DataFrame({"bucket": found, "rows": counts[found]})

    hist = accumulate(
        rows.select_columns(["rank_key"]).map_batches(histogram, batch_size=None, **PANDAS),
        ["bucket"],
    )
    if hist.empty or int(hist["rows"].sum()) <= keep:
        return None
    hist = hist.sort_values("bucket")
    cumulative = hist["rows"].cumsum().to_numpy()
    index = int(np.searchsorted(cumulative, keep))  # first bucket reaching `keep` rows
    bucket = int(hist["bucket"].iat[index])
    before = int(cumulative[index - 1]) if index else 0
    last_key = ((bucket + 1) << shift) - 1  # the bucket's key range; fits in int64
    inside = (
        rows.select_columns(["rank_key", "id"])
        .filter(expr=(col("rank_key") >= bucket << shift) & (col("rank_key") <= last_key))
        .to_pandas()
        .sort_values(["rank_key", "id"], kind="stable")
    )
    last = inside.iloc[keep - before - 1]
    return int(last["rank_key"]), str(last["id"])


def mark_sampled(rows: Dataset, threshold: tuple[int, str] | None) -> Dataset:
    """``sampled``: accepted and at or below the sample threshold (all accepted rows if None)."""

    def mark(batch: pd.DataFrame) -> pd.DataFrame:
        accepted = batch["reject_reason"].isna().to_numpy()
        if threshold is None:
            batch["sampled"] = accepted
            return batch
        key, row_id = threshold
        keys = batch["rank_key"].to_numpy(np.int64)
        ids = batch["id"].astype(str).to_numpy()
        batch["sampled"] = accepted & ((keys < key) | ((keys == key) & (ids <= row_id)))
        return batch

    return rows.map_batches(mark, **PANDAS)


def first_by_origin(rows: Dataset) -> dict | None:
    """The row with the smallest (path, line), or None for an empty dataset."""
    keyed = rows.map_batches(lambda b: b.assign(origin=origin_key(b["path"], b["line"])), **PANDAS)
    if keyed.count() == 0:
        return None
    smallest = keyed.min("origin")
    return keyed.filter(expr=col("origin") == smallest).take(1)[0]


def column_clusters(ds: Dataset, column: str) -> tuple[Dataset, list]:
    """Strata from an existing column: one cluster per distinct value (sorted; None last)."""
    values = sorted(ds.unique(column), key=lambda v: (v is None, str(v)))
    index = {v: i for i, v in enumerate(values)}

    def assign(batch: pd.DataFrame) -> pd.DataFrame:
        batch["cluster"] = [index[v if isinstance(v, str) else None] for v in batch[column]]
        return batch

    return ds.map_batches(assign, **PANDAS), values


def compose(
    ds: Dataset, batch_size: int, seed: int, partitions: int, group_rows: int = COMPOSE_GROUP_ROWS
) -> tuple[Dataset, int]:
    """Add ``batch_id`` to every row (core.strata: rank inside the cluster, Webster interleave,
    cut into ``batch_size``). Only (id, path, line, cluster) are grouped, by (cluster, key
    bucket): a cluster of more than ``group_rows`` rows is ranked in buckets of about that size,
    offset by the bucket counts, so no task holds a whole stratum. The batch ids join back on
    (path, line). Returns the dataset and the number of batches."""
    counts = _cluster_counts(counts_by(ds, ["cluster"]))
    bits = bucket_bits(int(counts.max(initial=0)), group_rows)

    def bucket(batch: pd.DataFrame) -> pd.DataFrame:
        keys = compose_keys(batch["id"].tolist(), seed)
        return batch.assign(key=keys, bucket=key_buckets(keys, bits))

    keyed = ds.select_columns(["id", "path", "line", "cluster"]).map_batches(bucket, **PANDAS)
    offsets = {}
    if bits:  # counted, then grouped: materialised so that each id is hashed once
        keyed = keyed.materialize()
        offsets = _bucket_offsets(keyed)

    def place(group: pd.DataFrame) -> pd.DataFrame:
        clusters = group["cluster"].to_numpy(np.int64)
        start = offsets.get((int(clusters[0]), int(group["bucket"].iat[0])), 0)
        keys = group["key"].to_numpy(np.int64)
        ranks = start + rank_within_clusters(group["id"].tolist(), clusters, seed, keys)
        positions = stratified_positions(ranks, clusters, counts)
        return pd.DataFrame(
            {"path": group["path"], "line": group["line"], "batch_id": positions // batch_size}
        )

    placed = keyed.groupby(["cluster", "bucket"], num_partitions=partitions).map_groups(
        place, **PANDAS
    )
    joined = ds.join(placed, join_type="inner", num_partitions=partitions, on=("path", "line"))
    return joined, -(-int(counts.sum()) // batch_size)


def _cluster_counts(sizes: pd.DataFrame) -> np.ndarray:
    """Rows per cluster id, (C,) int64, from ``counts_by(ds, ["cluster"])``."""
    counts = np.zeros(int(sizes["cluster"].max()) + 1 if len(sizes) else 0, dtype=np.int64)
    counts[sizes["cluster"].astype(int).to_numpy()] = sizes["rows"].to_numpy()
    return counts


def _bucket_offsets(keyed: Dataset) -> dict[tuple[int, int], int]:
    """Rows of the same cluster in lower buckets, per (cluster, bucket): a small table."""
    table = counts_by(keyed, ["cluster", "bucket"])
    clusters = table["cluster"].astype(int).to_numpy()
    buckets = table["bucket"].astype(int).to_numpy()
    offsets = bucket_offsets(clusters, buckets, table["rows"].to_numpy())
    pairs = zip(clusters.tolist(), buckets.tolist(), strict=True)
    return dict(zip(pairs, offsets.tolist(), strict=True))


def pack_batches(ds: Dataset, columns: list[str], partitions: int) -> Dataset:
    """One row per composed batch, its rows' ``columns`` as lists in (id, path, line) order."""

    def pack(group: pd.DataFrame) -> pd.DataFrame:
        group = group.sort_values(["id", "path", "line"], kind="stable")
        row = {"batch_id": [int(group["batch_id"].iat[0])]}
        row.update({c: [group[c].tolist()] for c in columns})
        return pd.DataFrame(row)

    return ds.groupby("batch_id", num_partitions=partitions).map_groups(pack, **PANDAS)


def write_table(
    ds: Dataset,
    path: str,
    to_arrow: Callable[[pd.DataFrame], pa.Table],
    schema: pa.Schema,
    row_group_rows: int = ROW_GROUP_ROWS,
) -> None:
    """Workers write ``ds`` as Parquet files under ``path``, each block cast by ``to_arrow``
    to ``schema``, in row groups of up to ``row_group_rows`` rows; an empty dataset still
    leaves a readable (empty) table there.

    The row-group size is set because a groupby emits one block per group: left to the
    blocks, a table of packed batches had one row group per batch, and the footers that every
    later read plans from grew with the pool (6 MiB each at 200k rows, held by the driver)."""
    ds.map_batches(to_arrow, **PANDAS).write_parquet(path, row_group_size=row_group_rows)
    folder = Path(path)
    if not any(folder.glob("*.parquet")):
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(schema.empty_table(), folder / "empty.parquet")


def fetch_table(refs: list) -> pa.Table | None:
    """The rows behind ``to_arrow_refs()`` as one table; None where there are none. Blocks that
    a filter emptied may carry no schema at all, so they are dropped before concatenation."""
    tables = [table for table in ray.get(refs) if table.num_rows]
    return pa.concat_tables(tables) if tables else None


@ray.remote
def _apply(fn: Callable, refs: list, *args):
    return fn((ray.get(ref).to_pandas() for ref in refs), *args)


def on_cluster(fn: Callable, ds: Dataset, *args):
    """``fn(frames, *args)`` in one task on the cluster, ``frames`` iterating over the blocks of
    ``ds`` as pandas, one at a time: for outputs that are one file (kept-id lists,
    rejected.jsonl). The rows go from the workers that hold them to that task, not through the
    driver, and the task holds one block plus what ``fn`` keeps."""
    return ray.get(_apply.remote(fn, ds.to_arrow_refs(), *args))
