"""Data ingestion: read inputs, normalise every record, and account for every row.

The contract that matters downstream is bookkeeping: `read == accepted + rejected`, always, per
file and in total. A bad row either stops the run with its location (`on_bad_rows="error"`, the
default, so a broken pool is noticed before hours of scoring) or is kept as a reject record with
its reason (`"skip"`) that `write_rejected` persists as `rejected.jsonl` next to the outputs.
Nothing is dropped without a trace.

Readers live in `readers.py`, schema handling in `schemas.py`; this module is the public face
and re-exports their API so callers import from one place.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from slap_ray.data.readers import (
    FORMATS,
    Format,
    RawRecord,
    detect_format,
    expand_paths,
    iter_raw_records,
)
from slap_ray.data.schemas import (
    SCHEMAS,
    RowRejected,
    SchemaOptions,
    canonical_json,
    content_id,
    normalize_record,
    validate_messages,
)
from slap_ray.errors import BadRowError

__all__ = [
    "FORMATS",
    "SCHEMAS",
    "BadRowError",
    "Format",
    "IngestResult",
    "RawRecord",
    "RowRejected",
    "SchemaOptions",
    "canonical_json",
    "content_id",
    "detect_format",
    "expand_paths",
    "ingest",
    "iter_raw_records",
    "make_reject",
    "normalize_record",
    "source_for_path",
    "validate_messages",
    "write_rejected",
]

logger = logging.getLogger(__name__)

BadRowPolicy = Literal["error", "skip"]
REJECTED_FILENAME = "rejected.jsonl"
DEFAULT_OPTIONS = SchemaOptions()


@dataclass
class IngestResult:
    """Accepted rows in (sorted path, line) order, reject records, and the counts that tie them.

    `counts` holds `read`, `accepted`, `rejected`, `files` (the same three per input path) and
    `sources` (accepted rows per source).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)


def source_for_path(path: str | os.PathLike[str]) -> str:
    """The fallback source of a file's rows: its stem (`pool/gsm8k.jsonl` -> `gsm8k`).

    One definition, so the in-process and the Ray read paths give unsourced rows the same
    source and therefore the same content-hash ids.
    """
    return Path(path).stem


def make_reject(
    origin_path: str | os.PathLike[str], line: int, reason: str, raw: Any
) -> dict[str, Any]:
    """The one reject-record shape, shared with later stages (e.g. rows the tokenizer empties).

    `raw` is stored as text so `rejected.jsonl` shows exactly what was read; a non-string (an
    already-parsed record) is serialised as JSON.
    """
    if not isinstance(raw, str):
        raw = json.dumps(raw, ensure_ascii=False, default=str)
    return {"path": os.fspath(origin_path), "line": int(line), "reason": str(reason), "raw": raw}


def write_rejected(rejects: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write reject records as JSON Lines; a directory gets `rejected.jsonl` inside it.

    The file is written even when empty, so "no rejects" is visible rather than ambiguous.
    Unencodable text (lone surrogates) is escaped instead of failing the whole write.
    """
    target = Path(path)
    if target.is_dir():
        target = target / REJECTED_FILENAME
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8", errors="backslashreplace") as handle:
        for reject in rejects:
            handle.write(json.dumps(reject, ensure_ascii=False) + "\n")
    return target


def ingest(
    paths: list[str] | str,
    options: SchemaOptions = DEFAULT_OPTIONS,
    on_bad_rows: BadRowPolicy = "error",
    format: Format = "auto",
) -> IngestResult:
    """Read, normalise and de-duplicate every record of every input.

    Inputs are globbed and sorted first, so duplicate resolution is deterministic: the first
    occurrence by (sorted path, line) keeps its id and later ones are rejected, naming it.
    """
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    result = IngestResult()
    seen: dict[str, tuple[str, int]] = {}
    files: dict[str, dict[str, int]] = {}
    sources: Counter[str] = Counter()
    for path in expand_paths(paths):
        per_file = files.setdefault(path, {"read": 0, "accepted": 0, "rejected": 0})
        default_source = source_for_path(path)
        for raw in iter_raw_records(path, format=format):
            per_file["read"] += 1
            try:
                row = _normalise(raw, options, default_source)
                first = seen.get(row["id"])
                if first is not None:
                    where = f"{first[0]}:{first[1]}"
                    raise RowRejected(f"duplicate id {row['id']!r} (first seen at {where})")
            except RowRejected as exc:
                if on_bad_rows == "error":
                    raise BadRowError(raw.path, raw.line, exc.reason) from None
                result.rejected.append(make_reject(raw.path, raw.line, exc.reason, raw.raw))
                per_file["rejected"] += 1
                continue
            seen[row["id"]] = (raw.path, raw.line)
            result.rows.append(row)
            sources[row["source"]] += 1
            per_file["accepted"] += 1
    result.counts = {
        "read": sum(f["read"] for f in files.values()),
        "accepted": len(result.rows),
        "rejected": len(result.rejected),
        "files": files,
        "sources": dict(sorted(sources.items())),
    }
    if result.rejected:
        logger.warning(
            "ingest rejected %d of %d rows (first: %s:%s: %s)",
            len(result.rejected),
            result.counts["read"],
            result.rejected[0]["path"],
            result.rejected[0]["line"],
            result.rejected[0]["reason"],
        )
    return result


def _normalise(raw: RawRecord, options: SchemaOptions, default_source: str) -> dict[str, Any]:
    if raw.error is not None or raw.record is None:
        raise RowRejected(raw.error or "no record")
    return normalize_record(raw.record, options, default_source)
