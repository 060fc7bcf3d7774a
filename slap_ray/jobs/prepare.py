"""The prepare half of `slap select`, as Ray Data steps over the whole pool: read -> duplicate
ids and bad rows -> seeded ``max_rows`` sample -> tokenise -> strata (k-means on embeddings, or
an existing column) -> compose batches -> pack one row per batch.

Workers write two tables under ``stages/``: ``batches/`` (one row per composed batch: what the
scorers read) and ``unscored/`` (rejected and not-sampled rows). ``prepare.json`` (counts,
number of batches, fingerprint) marks the stage finished, so ``--resume`` skips it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import ray
from ray.data import Dataset

from slap_ray.config import ConfigError, SlapConfig, selection_inputs
from slap_ray.core.seeds import derive_seed
from slap_ray.core.strata import kmeans_fit
from slap_ray.files import write_text_atomic
from slap_ray.jobs.rows import ORIGIN, marked_rows, raise_first_reject, shuffle_partitions
from slap_ray.ray import pool, stages
from slap_ray.reporting.manifest import Manifest

log = logging.getLogger("slap_ray.prepare")
_LIST, _STRINGS = pa.list_(pa.int64()), pa.list_(pa.string())
# A composed batch as one Parquet row: its id, then one list per row column (in row order).
BATCH_SCHEMA = pa.schema(
    [
        ("batch_id", pa.int64()),
        *((c, _STRINGS) for c in ("id", "source", "task", "path")),
        *((c, _LIST) for c in ("line", "cluster", "num_tokens")),
        *((c, _STRINGS) for c in ("messages", "tools")),
        *((c, pa.list_(_LIST)) for c in ("input_ids", "labels")),
    ]
)
BATCH_COLUMNS = BATCH_SCHEMA.names[1:]  # the row columns packed into each batch
# Every row's identity and fate, first in each per-row table.
ROW_FIELDS = [
    ("id", pa.string()),
    ("source", pa.string()),
    ("task", pa.string()),
    ("path", pa.string()),
    ("line", pa.int64()),
    ("reject_reason", pa.string()),
]
UNSCORED_SCHEMA = pa.schema([*ROW_FIELDS, ("raw", pa.string()), ("sampled", pa.bool_())])


def fingerprint(config: SlapConfig) -> str:
    """What the prepared and scored stages depend on: not where or how the job runs."""
    tree = selection_inputs(config)  # alphas are checked against the scored batches on resume
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def _unscored_table(frame: pd.DataFrame) -> pa.Table:
    frame = frame.copy()
    for name in UNSCORED_SCHEMA.names:
        if name not in frame:
            frame[name] = None
    frame["sampled"] = frame["sampled"].fillna(False).astype(bool)
    for column in ("source", "task", "reject_reason", "raw"):
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    return pa.Table.from_pandas(
        frame[UNSCORED_SCHEMA.names], schema=UNSCORED_SCHEMA, preserve_index=False
    )


def _batches_table(frame: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(
        frame[["batch_id", *BATCH_COLUMNS]], schema=BATCH_SCHEMA, preserve_index=False
    )


def _partitions(config: SlapConfig, manifest: Manifest) -> int:
    """Shuffle partitions for the rows this run read (counted by ``_read``)."""
    return shuffle_partitions(config, manifest.data["counts"]["read"]["rows"])


def _read(config: SlapConfig, manifest: Manifest) -> Dataset:
    """``rows.marked_rows`` plus its counts in the manifest."""
    rows = marked_rows(config, manifest)
    flags = rows.map_batches(
        lambda b: pd.DataFrame(
            {"rejected": b["reject_reason"].notna(), "sampled": b["sampled"].astype(bool)}
        ),
        batch_format="pandas",
    )
    counts = pool.counts_by(flags, ["rejected", "sampled"])
    total = int(counts["rows"].sum())
    rejected = int(counts.loc[counts["rejected"].astype(bool), "rows"].sum())
    sampled = int(counts.loc[counts["sampled"].astype(bool), "rows"].sum())
    manifest.count(
        "read",
        rows=total,
        rejected=rejected,
        sampled=sampled,
        not_sampled=total - rejected - sampled,
    )
    return rows


def _embed(config: SlapConfig, tokens: Dataset, stages_dir: Path, manifest: Manifest) -> Dataset:
    """Embeddings of every row; batches a killed run finished (``stages/embedded/``) are read
    back, only the other rows are embedded."""
    e, folder = config.embed, stages_dir / "embedded"
    folder.mkdir(exist_ok=True)
    partitions = _partitions(config, manifest)
    finished, todo = None, tokens
    if any(folder.glob("*.parquet")):
        finished = ray.data.read_parquet(str(folder)).materialize()
        keys = finished.select_columns(ORIGIN)
        todo = tokens.join(keys, join_type="left_anti", num_partitions=partitions, on=ORIGIN)
    # Materialised first: embedders may hold every CPU of a node, and a lazy upstream step
    # (a filter, the join) would then wait for a CPU forever.
    todo = todo.materialize()
    fresh = stages.embed_stage(
        todo, e.model, e.batch_size, e.max_chars, e.num_actors, e.num_gpus_per_actor,
        e.num_cpus_per_actor, str(folder),
    ).materialize()  # fmt: skip
    manifest.count(
        "embed", rows_now=fresh.count(), resumed_rows=finished.count() if finished else 0
    )
    if finished is None:
        return fresh
    reused = tokens.join(finished, join_type="inner", num_partitions=partitions, on=ORIGIN)
    return fresh.union(reused).materialize()


def _strata(config: SlapConfig, tokens: Dataset, stages_dir: Path, manifest: Manifest) -> Dataset:
    """Add ``cluster``: k-means on sentence embeddings, or the values of ``strata.by``."""
    if config.strata.by != "embedding":
        with manifest.stage("strata"):
            clustered, values = pool.column_clusters(tokens, config.strata.by)
            clustered = clustered.materialize()
        manifest.count("strata", by=config.strata.by, clusters=len(values))
        return clustered
    with manifest.stage("embed"):
        embedded = _embed(config, tokens, stages_dir, manifest)
    with manifest.stage("kmeans"):
        total = embedded.count()
        fraction = min(1.0, config.strata.fit_sample_size / max(total, 1))
        _, sample = stages.fit_sample(embedded, config.seed, fraction)
        clusters = min(config.strata.num_clusters, len(sample))
        centroids = kmeans_fit(
            sample, clusters, derive_seed(config.seed, "kmeans"), config.strata.max_iter
        )
        clustered = stages.assign_stage(embedded, centroids).materialize()
    manifest.count("kmeans", fit_rows=len(sample), clusters=clusters)
    manifest.count("strata", by="embedding", clusters=clusters)
    return clustered


# Above this share of cut rows a run warns: max_length is then shaping what is scored.
TRUNCATION_WARN_SHARE = 0.05


def _count_truncation(config: SlapConfig, tokenized: Dataset, rejected: int, manifest) -> None:
    """Count (and above a few percent, warn about) the rows cut to ``data.max_length``."""
    rows, dropped = pool.truncated(tokenized)
    manifest.count("tokenize", rejected=rejected, truncated_rows=rows, truncated_tokens=dropped)
    usable = tokenized.count() - rejected
    if usable and rows / usable > TRUNCATION_WARN_SHARE:
        message = (
            f"data.max_length={config.data.max_length}: {rows} of {usable} rows "
            f"({100 * rows / usable:.0f}%) were cut to fit, {dropped} tokens dropped "
            f"(data.truncation={config.data.truncation})"
        )
        log.warning(message)
        manifest.warn(message)


def prepare(config: SlapConfig, stages_dir: Path, manifest: Manifest) -> dict:
    """Run every prepare step; workers write ``batches/`` and ``unscored/``; returns counts."""
    with manifest.stage("read"):
        rows = _read(config, manifest)
    partitions = _partitions(config, manifest)
    with manifest.stage("tokenize"):
        usable = pool.sampled(rows).drop_columns(["raw"])
        tokenized = stages.tokenize_stage(
            usable, config.scoring_model, config.data.max_length, config.data.truncation,
            config.data.num_tokenizers,
        ).materialize()  # fmt: skip
        token_rejects = pool.rejected(tokenized)
        rejected_now = token_rejects.count()
    if config.data.on_bad_rows == "error":
        raise_first_reject(token_rejects)  # e.g. truncation removed every response token
    _count_truncation(config, tokenized, rejected_now, manifest)
    if tokenized.count() == rejected_now:
        read = manifest.data["counts"]["read"]["rows"]
        raise ConfigError(
            f"data.paths: no usable rows: all {read} rows read were rejected "
            "(data.on_bad_rows=skip writes them to rejected.jsonl)"
        )
    tokens = pool.accepted(tokenized)
    clustered = _strata(config, tokens, stages_dir, manifest)
    with manifest.stage("compose"):
        seed = derive_seed(config.seed, "compose")
        composed, num_batches = pool.compose(clustered, config.select.batch_size, seed, partitions)
        for name in ("batches", "unscored"):
            shutil.rmtree(stages_dir / name, ignore_errors=True)
        packed = pool.pack_batches(composed, BATCH_COLUMNS, partitions)
        batches_per_group = max(1, pool.ROW_GROUP_ROWS // config.select.batch_size)
        pool.write_table(
            packed, str(stages_dir / "batches"), _batches_table, BATCH_SCHEMA, batches_per_group
        )
        unscored = pool.sampled(rows, False).union(
            token_rejects.select_columns(
                ["id", "source", "task", "path", "line", "reject_reason"]
            ).map_batches(lambda b: b.assign(sampled=True), batch_format="pandas")
        )
        pool.write_table(unscored, str(stages_dir / "unscored"), _unscored_table, UNSCORED_SCHEMA)
    manifest.count("compose", batches=num_batches)
    return {"batches": num_batches, "counts": manifest.data["counts"]}


def load_or_prepare(config: SlapConfig, run_dir: Path, manifest: Manifest) -> int:
    """The prepared stage of this config (reused on ``--resume``); returns the batch count.

    ``stages/fingerprint.txt`` names the config that the partial work (embedded and scored
    batches) belongs to; a different config discards it. ``prepare.json`` marks the prepare
    stage finished.
    """
    stages_dir = run_dir / "stages"
    stamp, done_path = stages_dir / "fingerprint.txt", stages_dir / "prepare.json"
    wanted = fingerprint(config)
    if not stamp.exists() or stamp.read_text() != wanted:
        done_path.unlink(missing_ok=True)
        (stages_dir / "second_moment.pt").unlink(missing_ok=True)
        # Whole folder: files of any older layout, and killed calls' temp files.
        shutil.rmtree(run_dir / "scored", ignore_errors=True)
        shutil.rmtree(stages_dir / "embedded", ignore_errors=True)
        write_text_atomic(stamp, wanted)
    if done_path.exists():
        done = json.loads(done_path.read_text())
        manifest.count("resume", prepared_reused=True)
        for stage, counts in done["counts"].items():
            manifest.count(stage, **counts)
        return int(done["batches"])
    result = prepare(config, stages_dir, manifest)
    write_text_atomic(done_path, json.dumps(result, default=str))
    return int(result["batches"])
