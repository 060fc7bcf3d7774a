"""Input rows shared by every job: read (files and embedded sources), duplicate ids, the bad-row
policy and the seeded ``max_rows`` sample. Rows are keyed by origin (path, line), never by id
alone: a rejected duplicate shares its id with the row that won."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import ray

from slap_ray.config import ConfigError, SlapConfig
from slap_ray.data.ingest import SchemaOptions, detect_format, expand_paths, iter_raw_records
from slap_ray.data.readers import check_dataset_folder
from slap_ray.data.rows import bad_row_error
from slap_ray.ray import pool, stages
from slap_ray.reporting.manifest import Manifest

ORIGIN = ["path", "line"]

# Rows per shuffle partition past which a shuffle gets more partitions than CPUs.
ROWS_PER_SHUFFLE_PARTITION = 50_000


def schema_options(config: SlapConfig) -> SchemaOptions:
    d = config.data
    return SchemaOptions(
        schema=d.schema_,
        prompt_field=d.prompt_field,
        response_field=d.response_field,
        system_field=d.system_field,
        id_field=d.id_field,
        source=d.source,
        task=d.task,
    )


def input_files(config: SlapConfig, paths: list[str], setting: str) -> list[str]:
    """Expand globs and check every file's format before any work starts."""
    patterns = [p for p in paths if p not in stages.EMBEDDED]
    try:
        files = expand_paths(patterns) if patterns else []
    except FileNotFoundError as error:
        raise ConfigError(f"{setting}: {error.args[0] if error.args else error}") from None
    for path in files:
        if config.data.format == "auto":
            try:
                detect_format(path)
            except ValueError as error:
                raise ConfigError(f"data.format: {error}") from None
        if Path(path).is_dir():
            try:
                check_dataset_folder(path)
            except ValueError as error:
                raise ConfigError(f"{setting}: {error}") from None
    return files


def read_rows(
    config: SlapConfig,
    paths: list[str],
    setting: str = "data.paths",
    manifest: Manifest | None = None,
    stage: str = "read",
) -> ray.data.Dataset:
    """Globs/files of any ingestion format plus the embedded sources, as one Ray dataset."""
    files = input_files(config, paths, setting)
    embedded = [p for p in paths if p in stages.EMBEDDED]
    parts = [stages.read_stage(files, schema_options(config), config.data.format)] if files else []
    for name in dict.fromkeys(embedded):
        parts.append(stages.chitchat_stage(config.data.chitchat_mode, stages.EMBEDDED[name]))
    if manifest is not None:
        manifest.count(stage, files=len(files), embedded=embedded)
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def marked_rows(
    config: SlapConfig,
    manifest: Manifest | None = None,
    stage: str = "read",
) -> ray.data.Dataset:
    """Every row of ``data.paths`` once, as Ray Data, with ``reject_reason`` (bad row,
    duplicate id: first by (path, line) wins) and ``sampled`` (accepted and inside the seeded
    ``data.max_rows`` sample). ``on_bad_rows: error`` stops at the first rejected row; no rows
    at all is an error."""
    rows = read_rows(config, config.data.paths, "data.paths", manifest, stage)
    if config.ray.rows_per_block:
        rows = rows.repartition(target_num_rows_per_block=config.ray.rows_per_block)
    rows = rows.materialize()
    rows = pool.mark_duplicates(rows, shuffle_partitions(config, rows.count()))
    rows = pool.with_rank_key(rows, config.seed, "max-rows").materialize()
    if rows.count() == 0:
        raise ConfigError(f"data.paths: no rows in {config.data.paths} (every input is empty)")
    if config.data.on_bad_rows == "error":
        raise_first_reject(pool.rejected(rows))
    threshold = None
    if config.data.max_rows is not None:
        threshold = pool.sample_threshold(rows, config.data.max_rows)
    return pool.mark_sampled(rows, threshold).drop_columns(["rank_key"]).materialize()


def shuffle_partitions(config: SlapConfig, rows: int) -> int:
    """Partitions of each shuffle over ``rows`` rows: ``ray.shuffle_partitions``, else
    ``partitions_for`` the cluster's CPUs."""
    if config.ray.shuffle_partitions:
        return config.ray.shuffle_partitions
    return partitions_for(rows, stages.cluster_cpus())


def partitions_for(rows: int, cpus: int) -> int:
    """One partition per CPU, and more where the pool is large: a reduce task holds its whole
    partition, so with partitions fixed at the CPU count each task's memory would grow with the
    pool (at 1M rows on 2 CPUs, Ray workers held up to 1.9 GiB each with 2 partitions)."""
    return max(1, cpus, -(-rows // ROWS_PER_SHUFFLE_PARTITION))


def raise_first_reject(rejects: ray.data.Dataset) -> None:
    """``on_bad_rows: error``: the first rejected row by origin stops the run."""
    first = pool.first_by_origin(rejects)
    if first is not None:
        raise bad_row_error(first)


def raw_text(rejected: pd.DataFrame, fmt: str) -> list[str]:
    """Each rejected row's own text as read; rows rejected after parsing (duplicate ids) carry
    none, so their lines are read again from their files."""
    texts = [r if isinstance(r, str) else None for r in rejected.get("raw", [None] * len(rejected))]
    missing: dict[str, set[int]] = {}
    for text, path, line in zip(texts, rejected["path"], rejected["line"], strict=True):
        if text is None and path not in stages.EMBEDDED:
            missing.setdefault(path, set()).add(int(line))
    found = {}
    for path, lines in missing.items():
        for record in iter_raw_records(path, format=fmt):
            if record.line in lines:
                found[(path, record.line)] = record.raw
    return [
        text if text is not None else found.get((path, int(line)), "")
        for text, path, line in zip(texts, rejected["path"], rejected["line"], strict=True)
    ]
