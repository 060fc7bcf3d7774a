"""Writing files that a killed job may leave behind and a resumed one reads."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A hidden temporary path beside ``path`` that replaces ``path`` when the block succeeds.

    A writer killed mid-write leaves the previous file (or none) and a hidden ``.<name>.*.tmp``,
    never a truncated ``path``: resume logic and readers of partial results (``results.csv``
    during a sweep) only ever see whole files. Unique per call, so concurrent writers of
    different files in one folder never share a temporary file.
    """
    path = Path(path)
    # Not mkstemp: its files are private (0600) and the rename would keep that mode.
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
