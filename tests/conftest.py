"""Fixtures shared by every test tier."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def _require_shared(path: Path) -> Path:
    if path.is_dir():
        return path
    message = f"{path} is absent: the real-data tests need ../shared/data beside the checkout"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real instruction pool (`pool/`, `eval/`): read in place, never copied."""
    return _require_shared(SHARED_DATA)
