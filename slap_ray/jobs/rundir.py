"""A run's output directory: created with a clear error, locked against a second run, and
cleared of what the job owns before a fresh (not resumed) run writes into it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from slap_ray.config import ConfigError

LOCK_FILE = ".slap-run.lock"


def make_run_dir(path: str | Path, setting: str = "output_dir") -> Path:
    """Create the folder (parents too); a path that is a file or cannot be made is a ConfigError."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{setting}: {folder} exists and is not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{setting}: cannot create {folder}: {error.strerror or error}") from None
    return folder


@contextmanager
def locked_run_dir(path: str | Path, owned: Sequence[str], resume: bool) -> Iterator[Path]:
    """Hold the folder's lock for the run; a fresh run first removes the ``owned`` entries.

    A second run into the same folder stops at once instead of mixing its outputs with ours.
    """
    folder = make_run_dir(path)
    lock = FileLock(folder / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ConfigError(
            f"output_dir: {folder} is in use by another run (lock {folder / LOCK_FILE}); "
            "wait for it to finish or choose another output_dir"
        ) from None
    try:
        if not resume:
            clear(folder, owned)
        yield folder
    finally:
        lock.release()


def clear(folder: Path, names: Sequence[str]) -> None:
    """Remove files or folders by name (outputs a previous run left)."""
    for name in names:
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
