"""Input rows in the shape the pipeline carries them, and the duplicate-id rule, without Ray.

Every record read becomes exactly one row: normalised, or marked rejected with its reason. Rows
carry ``messages`` as JSON text (one Arrow type for any conversation shape) and ``path``/``line``
so rejects point at their origin. The Ray stages map these functions over files and blocks
(``ray.stages.read_stage``, ``ray.pool.mark_duplicates``); ``rows_in_process`` applies them in
one process, for benches and tests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from slap_ray.data.ingest import (
    RowRejected,
    SchemaOptions,
    expand_paths,
    iter_raw_records,
    normalize_record,
    source_for_path,
)
from slap_ray.errors import BadRowError

DEFAULT_OPTIONS = SchemaOptions()
ROW_COLUMNS = (
    "id", "source", "task", "messages", "tools", "path", "line", "reject_reason", "raw",
)  # fmt: skip


def pipeline_row(
    path: str, line: int, normalised: dict | None, reason: str | None, raw: str | None
) -> dict[str, Any]:
    """One row in ``ROW_COLUMNS``: a normalised record, or (``normalised`` None) a rejected one."""
    return {
        "id": normalised["id"] if normalised else f"__rejected__:{path}:{line}",
        "source": normalised["source"] if normalised else None,
        "task": normalised["task"] if normalised else None,
        "messages": json.dumps(normalised["messages"], ensure_ascii=False) if normalised else None,
        # The row's tool definitions as JSON text; "" (never None: Arrow would type a block of
        # only None as null, and Ray Data hand it over as NaN) for the many rows without any.
        "tools": json.dumps(normalised["tools"], ensure_ascii=False)
        if normalised and normalised.get("tools") is not None
        else "",
        "path": path,
        "line": int(line),
        "reject_reason": reason,
        "raw": raw,
    }


def read_file_rows(item: dict[str, Any], options: SchemaOptions, fmt: str) -> list[dict]:
    """One input file (``item["path"]``) -> its rows, normalised or marked rejected (never
    raised)."""
    path = item["path"]
    stem = source_for_path(path)
    rows = []
    for raw in iter_raw_records(path, format=fmt):
        try:
            if raw.error is not None or raw.record is None:
                raise RowRejected(raw.error or "no record")
            rows.append(
                pipeline_row(
                    raw.path, raw.line, normalize_record(raw.record, options, stem), None, None
                )
            )
        except RowRejected as rejected:
            rows.append(pipeline_row(raw.path, raw.line, None, rejected.reason, raw.raw))
    return rows


def origin_key(paths: pd.Series, lines: pd.Series) -> pd.Series:
    """(path, line) as one string that sorts like the pair (lines zero-padded)."""
    padded = lines.astype("int64").map("{:012d}".format).astype(str)  # empty: map keeps int64
    return paths.astype(str) + "\x00" + padded


def _origin_text(key: str) -> str:
    path, line = key.rsplit("\x00", 1)
    return f"{path}:{int(line)}"


def reject_duplicates(batch: pd.DataFrame, first: Mapping[str, str]) -> pd.DataFrame:
    """The duplicate-id rule on one block: an accepted row whose id ``first`` maps to another
    origin (the smallest ``origin_key`` among the accepted rows with that id) is rejected,
    naming that origin."""
    if not first:
        return batch
    origin = origin_key(batch["path"], batch["line"])
    reasons = batch["reject_reason"].astype(object).where(batch["reject_reason"].notna(), None)
    for i in np.flatnonzero(batch["id"].isin(first).to_numpy()):
        row_id = batch["id"].iat[i]
        if reasons.iat[i] is None and origin.iat[i] != first[row_id]:
            reasons.iat[i] = (
                f"duplicate id {row_id!r} (first seen at {_origin_text(first[row_id])})"
            )
    batch["reject_reason"] = reasons
    return batch


def rows_in_process(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    options: SchemaOptions = DEFAULT_OPTIONS,
    fmt: str = "auto",
) -> list[dict]:
    """Every row of ``paths`` (globs, sorted) in (path, line) order, duplicates marked: what the
    selection job reads (``jobs.rows.marked_rows``), in one process."""
    rows = [
        row for path in expand_paths(paths) for row in read_file_rows({"path": path}, options, fmt)
    ]
    # object columns keep None as None (pandas would turn missing text into NaN)
    frame = pd.DataFrame(rows, columns=list(ROW_COLUMNS), dtype=object)
    accepted = frame[frame["reject_reason"].isna()]
    first = origin_key(accepted["path"], accepted["line"]).groupby(accepted["id"]).min()
    return reject_duplicates(frame, first.to_dict()).to_dict("records")


def bad_row_error(row: Mapping[str, Any]) -> BadRowError:
    """What ``on_bad_rows: error`` raises for a rejected row: ``path:line: reason``."""
    return BadRowError(row["path"], int(row["line"]), row["reject_reason"])
