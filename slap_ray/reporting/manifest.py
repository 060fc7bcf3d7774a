"""Run manifest: versions, git commit, row counts, per-stage wall time and the driver's peak
memory after each stage, as manifest.json."""

from __future__ import annotations

import json
import logging
import platform
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from slap_ray.files import write_text_atomic

log = logging.getLogger("slap_ray.stages")
PACKAGES = (
    "slap-ray",
    "torch",
    "ray",
    "transformers",
    "peft",
    "sentence-transformers",
    "numpy",
    "pyarrow",
)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def driver_peak_rss_gib() -> float:
    """This process's peak resident memory so far. Linux: ``VmHWM``, the peak of this
    program only (``ru_maxrss`` keeps the peak of whatever process exec'd it, e.g. a large
    parent's); elsewhere ``ru_maxrss`` (bytes on macOS, KiB otherwise)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2**20, 3)
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**30 if sys.platform == "darwin" else 2**20), 3)


def git_commit(directory: Path | None = None) -> str | None:
    """The checkout's commit (with '-dirty' if modified), or None outside git."""
    here = directory or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


class Manifest:
    """Collects counts and timings during a run; ``write`` puts them next to the outputs."""

    def __init__(self, kind: str) -> None:
        self.data: dict[str, Any] = {
            "kind": kind,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": sys.argv,
            "versions": package_versions(),
            "git_commit": git_commit(),
            "counts": {},
            "timings_s": {},
            # Peak so far at the end of each stage: where the driver grew, stage by stage.
            "driver_peak_rss_gib": {},
        }

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = self.data["timings_s"][name] = round(time.perf_counter() - start, 3)
            self.data["driver_peak_rss_gib"][name] = driver_peak_rss_gib()
        log.info("%s done (%.1f s)", name, seconds)

    def count(self, stage: str, **counts: Any) -> None:
        self.data["counts"].setdefault(stage, {}).update(counts)

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value

    def warn(self, message: str) -> None:
        """A warning the run's report lists (the job also logs it to the console)."""
        self.data.setdefault("warnings", []).append(message)

    def write(self, path: Path) -> Path:
        self.data["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return write_text_atomic(path, json.dumps(self.data, indent=2, default=str))
