"""Data ingestion: the public face of the readers and schemas, and reject records.

The contract that matters downstream is bookkeeping: `read == accepted + rejected`, always, per
file and in total. A bad row either stops the run with its location (`on_bad_rows="error"`, the
default, so a broken pool is noticed before hours of scoring) or is kept as a reject record with
its reason (`"skip"`) that `write_rejected` persists as `rejected.jsonl` next to the outputs.
Nothing is dropped without a trace.

Readers live in `readers.py`, schema handling in `schemas.py`; this module re-exports their API
so callers import from one place. Reading files into rows, and the duplicate-id rule, live in
`rows.py`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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
    "RawRecord",
    "RowRejected",
    "SchemaOptions",
    "canonical_json",
    "content_id",
    "detect_format",
    "expand_paths",
    "iter_raw_records",
    "make_reject",
    "normalize_record",
    "source_for_path",
    "validate_messages",
    "write_rejected",
]

REJECTED_FILENAME = "rejected.jsonl"


def source_for_path(path: str | os.PathLike[str]) -> str:
    """The fallback source of a file's rows: its stem (`pool/gsm8k.jsonl` -> `gsm8k`)."""
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
