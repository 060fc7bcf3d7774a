"""Input rows shared by every job: read (files and embedded sources), duplicate ids, the bad-row
policy and the seeded ``max_rows`` sample. Rows are keyed by origin (path, line), never by id
alone: a rejected duplicate shares its id with the row that won."""

from __future__ import annotations

import pandas as pd
import ray

from slap_ray.config import ConfigError, SlapConfig
from slap_ray.core.seeds import id_rank_key
from slap_ray.data.ingest import (
    BadRowError,
    SchemaOptions,
    detect_format,
    expand_paths,
    iter_raw_records,
)
from slap_ray.ray import stages
from slap_ray.reporting.manifest import Manifest

ORIGIN = ["path", "line"]
META_COLUMNS = ["id", "source", "task", "path", "line", "reject_reason"]


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
    if config.data.format == "auto":
        for path in files:
            try:
                detect_format(path)
            except ValueError as error:
                raise ConfigError(f"data.format: {error}") from None
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


def read_meta(rows: ray.data.Dataset, paths: list[str], setting: str) -> pd.DataFrame:
    """Per-row metadata (no token or text columns) of every row read; no rows is an error."""
    if rows.count() == 0:
        raise ConfigError(f"{setting}: no rows in {paths} (every input is empty)")
    meta = rows.select_columns(META_COLUMNS).to_pandas()
    for column in ("source", "task", "reject_reason"):
        meta[column] = _text_or_none(meta[column])
    return meta


def mark_rejects(meta: pd.DataFrame, config: SlapConfig) -> pd.DataFrame:
    """Duplicate ids (first by (path, line) wins), the bad-row policy, and the max_rows sample.

    Adds ``sampled``: accepted and inside the seeded ``data.max_rows`` sample.
    """
    meta = meta.sort_values(ORIGIN, kind="stable").reset_index(drop=True)
    accepted = meta["reject_reason"].isna()
    first_seen = meta[accepted].drop_duplicates("id")
    where = dict(
        zip(
            first_seen["id"], first_seen["path"] + ":" + first_seen["line"].astype(str), strict=True
        )
    )
    duplicate = accepted & meta.duplicated("id") & meta["id"].isin(where)
    meta.loc[duplicate, "reject_reason"] = [
        f"duplicate id {i!r} (first seen at {where[i]})" for i in meta.loc[duplicate, "id"]
    ]
    if config.data.on_bad_rows == "error":
        raise_first_reject(meta)
    meta["sampled"] = meta["reject_reason"].isna()
    if config.data.max_rows is not None and meta["sampled"].sum() > config.data.max_rows:
        keys = meta.loc[meta["sampled"], "id"].map(
            lambda i: id_rank_key(config.seed, "max-rows", i)
        )
        meta.loc[keys.sort_values(kind="stable").index[config.data.max_rows :], "sampled"] = False
    return meta


def raise_first_reject(frame: pd.DataFrame) -> None:
    """``on_bad_rows: error``: the first rejected row by origin stops the run."""
    bad = frame[frame["reject_reason"].notna()]
    if len(bad):
        first = bad.sort_values(ORIGIN, kind="stable").iloc[0]
        raise BadRowError(first["path"], int(first["line"]), first["reject_reason"])


def keys_of(frame: pd.DataFrame) -> set[tuple[str, int]]:
    return set(zip(frame["path"], frame["line"].astype(int), strict=True))


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


def frame_of(ds: ray.data.Dataset, columns: list[str]) -> pd.DataFrame:
    """Some columns of a dataset as pandas; an empty dataset still gives those columns."""
    if ds.count() == 0:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns}).astype(
            {"line": "int64"} if "line" in columns else {}
        )
    return ds.select_columns(columns).to_pandas()


def _text_or_none(values: pd.Series) -> pd.Series:
    """All-null columns come back from Arrow as float NaN; keep them as text or None."""
    return pd.Series([x if isinstance(x, str) else None for x in values], dtype=object)
