"""Raw readers: turn files on disk into a stream of records that remember where they came from.

Readers never raise for bad *content*: an undecodable line, malformed JSON or a corrupt file
becomes a `RawRecord` whose `error` says why, so the caller's bad-row policy (error or skip)
decides what happens and no row disappears silently. They do raise for bad *requests* (a path
that does not exist, an unknown format), because those are configuration mistakes, not data.

Line numbers are 1-based physical lines for JSONL and CSV (what an editor shows) and 0-based row
indices for JSON arrays, Parquet and `save_to_disk` folders (what `ds[i]` takes). A failure that
concerns a whole file (a corrupt Parquet footer, a JSON file that is not an array) is reported
once, at line 0.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from slap_ray.vocabulary import FORMATS, Format  # noqa: E402  (re-exported)

_EXTENSIONS: dict[str, str] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
}
_GZIP = ".gz"
_GZIP_READABLE = (".jsonl", ".ndjson", ".json", ".csv")  # text formats users ship compressed
_BOM = "\ufeff"
_RAW_LIMIT = 4000  # characters of a whole-file payload kept in a reject record
_CSV_FIELD_LIMIT = 2**31 - 1  # the csv module's 128 KiB default rejects long responses
_PARQUET_BATCH = 4096


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One record as read, before any schema is applied.

    `record` is None exactly when `error` is set (the text could not be decoded, parsed, or was
    not an object); `raw` always holds the original text so a reject can be inspected later.
    """

    path: str
    line: int
    record: dict[str, Any] | None
    raw: str
    error: str | None = None


def expand_paths(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[str]:
    """Expand globs and return the sorted, de-duplicated list of inputs.

    Sorting makes ids, duplicate resolution ("first occurrence wins") and row order independent
    of the order in which a user lists files or the file system lists a directory. A pattern
    that matches nothing is an error naming that pattern: a typo must not shrink the pool.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    found: set[str] = set()
    for item in paths:
        pattern = os.fspath(item)
        if glob.has_magic(pattern):
            matches = glob.glob(pattern, recursive=True)
            if not matches:
                raise FileNotFoundError(f"no input matches the pattern {pattern!r}")
            found.update(os.path.normpath(m) for m in matches)
        elif os.path.exists(pattern):
            found.add(os.path.normpath(pattern))
        else:
            raise FileNotFoundError(f"input {pattern!r} does not exist")
    return sorted(found)


def detect_format(path: str | os.PathLike[str]) -> str:
    """Pick a reader from the path: a directory is a `save_to_disk` dataset, else the extension.

    A `.json` file whose first non-blank character is not `[` is read as JSON Lines, because
    many tools write JSON Lines under a `.json` name.
    """
    p = Path(path)
    if p.is_dir():
        return "hf_disk"
    suffix = p.suffix.lower()
    if suffix == _GZIP:
        suffix = Path(p.stem).suffix.lower()
        fmt = _EXTENSIONS.get(suffix) if suffix in _GZIP_READABLE else None
    else:
        fmt = _EXTENSIONS.get(suffix)
    if fmt is None:
        raise ValueError(
            f"cannot tell the format of {os.fspath(path)!r} from its extension (known: "
            f"{', '.join(sorted(_EXTENSIONS))}, and {', '.join(sorted(_GZIP_READABLE))} + .gz); "
            f"set data.format to one of {', '.join(FORMATS[1:])}"
        )
    if fmt == "json" and _first_non_blank_byte(p) not in (b"[", b""):
        return "jsonl"
    return fmt


def iter_raw_records(path: str | os.PathLike[str], format: Format = "auto") -> Iterator[RawRecord]:
    """Yield every record of one input, in file order, with its origin."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"input {os.fspath(path)!r} does not exist")
    fmt = detect_format(path) if format == "auto" else format
    name = os.fspath(path)
    readers = {
        "jsonl": _read_jsonl,
        "json": _read_json_array,
        "parquet": _read_parquet,
        "csv": _read_csv,
        "hf_disk": _read_hf_disk,
    }
    return readers[fmt](name)


def _open_binary(path: str | os.PathLike[str]) -> IO[bytes]:
    """The file's bytes, decompressed when its name ends in .gz."""
    if os.fspath(path).lower().endswith(_GZIP):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _first_non_blank_byte(path: Path) -> bytes:
    with _open_binary(path) as handle:
        while chunk := handle.read(4096):
            stripped = chunk.lstrip()
            if stripped.startswith(_BOM.encode()):
                stripped = stripped[3:].lstrip()
            if stripped:
                return stripped[:1]
    return b""


def _json_default(value: Any) -> str:
    """Columnar readers can return dates, bytes or decimals; `raw` only needs to be readable."""
    return repr(value) if isinstance(value, bytes) else str(value)


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=_json_default)


def _parse_object(text: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"malformed JSON: {exc}"
    except RecursionError:
        return None, "malformed JSON: nested too deeply"
    if not isinstance(value, dict):
        return None, f"expected a JSON object, got {type(value).__name__}"
    return value, None


def _read_jsonl(path: str) -> Iterator[RawRecord]:
    """Decode each line on its own so one bad byte costs one row, not the file."""
    number = 0
    try:
        yield from _jsonl_records(path)
    except (OSError, EOFError, zlib.error) as exc:  # a truncated or corrupt .gz
        yield RawRecord(path, number, None, "", f"unreadable compressed file: {exc}")


def _jsonl_records(path: str) -> Iterator[RawRecord]:
    with _open_binary(path) as handle:
        for number, data in enumerate(handle, start=1):
            data = data.rstrip(b"\r\n")
            if number == 1 and data.startswith(_BOM.encode()):
                data = data[3:]
            try:
                text = data.decode("utf-8", errors="strict")
            except UnicodeDecodeError as exc:
                raw = data.decode("utf-8", errors="backslashreplace")
                yield RawRecord(
                    path, number, None, raw, f"invalid UTF-8: {exc.reason} at byte {exc.start}"
                )
                continue
            if not text.strip():
                continue  # blank lines separate nothing and hold no row
            record, error = _parse_object(text)
            yield RawRecord(path, number, record, text, error)


def _read_json_array(path: str) -> Iterator[RawRecord]:
    with _open_binary(path) as handle:
        data = handle.read()
    if data.startswith(_BOM.encode()):
        data = data[3:]
    try:
        text = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raw = data[:_RAW_LIMIT].decode("utf-8", errors="backslashreplace")
        yield RawRecord(
            path, 0, None, raw, f"invalid UTF-8 in JSON file: {exc.reason} at byte {exc.start}"
        )
        return
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        yield RawRecord(path, 0, None, text[:_RAW_LIMIT], f"malformed JSON file: {exc}")
        return
    if not isinstance(value, list):
        reason = f"a .json input must hold an array of objects, got {type(value).__name__}"
        yield RawRecord(path, 0, None, text[:_RAW_LIMIT], reason)
        return
    for index, item in enumerate(value):
        if isinstance(item, dict):
            yield RawRecord(path, index, item, _dump(item))
        else:
            reason = f"expected a JSON object, got {type(item).__name__}"
            yield RawRecord(path, index, None, _dump(item), reason)


def _read_parquet(path: str) -> Iterator[RawRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = 0
    try:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH):
            for row in batch.to_pylist():
                yield RawRecord(path, index, row, _dump(row))
                index += 1
    except (pa.ArrowException, OSError) as exc:
        yield RawRecord(path, index, None, "", f"unreadable Parquet file: {exc}")


def _read_csv(path: str) -> Iterator[RawRecord]:
    """Parse with the csv module (quoted fields may span lines), validating UTF-8 per row.

    Lines are decoded with `surrogateescape` so the parser sees every byte; a row whose fields
    then contain escaped bytes had invalid UTF-8 and is rejected on its own.
    """
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    with io.TextIOWrapper(
        _open_binary(path), encoding="utf-8", errors="surrogateescape", newline=""
    ) as handle:
        consumed: list[str] = []

        def lines() -> Iterator[str]:
            for physical in handle:
                consumed.append(physical)
                yield physical

        reader = csv.reader(lines())
        header: list[str] | None = None
        end = 0  # physical line on which the previous row ended
        while True:
            try:
                fields: list[str] = next(reader)
                error = None
            except StopIteration:
                return
            except csv.Error as exc:
                fields, error = [], f"malformed CSV: {exc}"
            start, end = end + 1, reader.line_num
            raw = _restore("".join(consumed)).rstrip("\r\n")
            consumed.clear()
            if error is None and not fields:
                continue  # a blank line
            if header is None:
                if fields and fields[0].startswith(_BOM):
                    fields[0] = fields[0][1:]
                error = error or _check_header(fields)
                if error is not None:  # without a header no later row can be read
                    yield RawRecord(path, start, None, raw, f"bad CSV header: {error}")
                    return
                header = fields
                continue
            if error is None and any(_has_escaped_bytes(f) for f in fields):
                error = "invalid UTF-8"
            if error is None and len(fields) != len(header):
                error = f"CSV row has {len(fields)} fields, the header has {len(header)}"
            if error is not None:
                yield RawRecord(path, start, None, raw, error)
                continue
            yield RawRecord(path, start, dict(zip(header, fields, strict=True)), raw)


def _check_header(fields: list[str]) -> str | None:
    if not fields or any(not name.strip() for name in fields):
        return "empty column name"
    if any(_has_escaped_bytes(name) for name in fields):
        return "invalid UTF-8"
    if len(set(fields)) != len(fields):
        return "repeated column name"
    return None


def _has_escaped_bytes(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _restore(text: str) -> str:
    """Turn surrogate-escaped bytes back into readable `\\xNN` text for the reject record."""
    return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")


def check_dataset_folder(path: str) -> None:
    """A folder input must be one dataset saved with ``save_to_disk``: a ``DatasetDict`` (its
    splits in subfolders) or any other folder is a path mistake, raised as ValueError."""
    folder = Path(path)
    splits_file = folder / "dataset_dict.json"
    if splits_file.is_file():
        splits = json.loads(splits_file.read_text(encoding="utf-8")).get("splits", [])
        example = folder / splits[0] if splits else folder / "train"
        raise ValueError(
            f"{path} is a DatasetDict with splits {splits}: give one split's folder, e.g. {example}"
        )
    if not (folder / "state.json").is_file():
        raise ValueError(f"{path} is a folder but not a dataset saved with save_to_disk")


def _read_hf_disk(path: str) -> Iterator[RawRecord]:
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError, OSError) as exc:
        yield RawRecord(path, 0, None, "", f"not a dataset saved with save_to_disk: {exc}")
        return
    if isinstance(loaded, datasets.DatasetDict):
        splits = ", ".join(sorted(loaded))
        reason = f"a DatasetDict with splits [{splits}]: point at one split's folder instead"
        yield RawRecord(path, 0, None, "", reason)
        return
    for index, row in enumerate(loaded):
        yield RawRecord(path, index, row, _dump(row))
