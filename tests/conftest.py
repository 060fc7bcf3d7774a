"""Fixtures shared by every test tier."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from manifests import require

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
# Ray Train's controller polls its workers every 2 s by default, and a run waits on that poll at
# its start, at each report and at its end: 6-7 s of a 24-s tiny run (measured). The suite polls
# every 0.2 s; the processes it starts (kill jobs, the rehearsal cluster, the CLI run) inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def _require_shared(path: Path) -> Path:
    return require(path, "the real-data tests need ../shared/data beside the checkout")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real instruction pool (`pool/`, `eval/`): read in place, never copied."""
    return _require_shared(SHARED_DATA)


TEST_RAY = {"num_cpus": 2, "object_store_memory": 400 * 1024 * 1024}


def start_local_ray():
    """The suite's local Ray instance (loopback only, capped object store), via the product's
    own ``ensure_ray``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    from slap_ray.config import RayConfig
    from slap_ray.ray.runtime import ensure_ray

    ensure_ray(RayConfig(**TEST_RAY))
    return ray


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the whole session (Ray's own test style)."""
    ray = start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def pool_subset(tmp_path_factory, shared_data) -> Path:
    """The first 20 rows of every ../shared/data/pool file (160 real rows), in a temp folder."""
    folder = tmp_path_factory.mktemp("pool_subset")
    for source in sorted((shared_data / "pool").glob("*.jsonl")):
        with source.open(encoding="utf-8") as handle:
            lines = [next(handle) for _ in range(20)]
        (folder / source.name).write_text("".join(lines), encoding="utf-8")
    return folder


@pytest.fixture
def kill_job():
    """``kill_job(script, config, tmp_path, ready, what, timeout_s=600)``: see ``_kill_job``."""
    return _kill_job


def _kill_job(
    script: str, config, tmp_path: Path, ready, what: str, timeout_s: float = 600
) -> None:
    """Run ``pipelines/<script>`` on ``config`` in its own process group (its own 2-CPU Ray),
    and kill it with every process under it (SIGKILL) as soon as ``ready()`` holds: a
    deterministic point such as a marker file, never a sleep. ``what`` names the awaited event
    in failures."""
    import subprocess
    import sys
    import time

    import yaml

    from slap_ray.config import config_to_dict

    tree = config_to_dict(config)
    tree["ray"] = {"num_cpus": 2, "object_store_memory": 200 * 1024 * 1024}
    path = tmp_path / f"{Path(script).stem}-killed.yaml"
    path.write_text(yaml.safe_dump(tree))
    log = path.with_suffix(".log")
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "pipelines" / script), "--config", str(path)],
            start_new_session=True,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    deadline = time.time() + timeout_s
    try:
        while not ready():
            ended = process.poll() is not None
            assert not ended, f"the job ended before {what}:\n{_tail(log)}"
            assert time.time() < deadline, f"never saw {what}:\n{_tail(log)}"
            time.sleep(0.05)
    finally:
        _kill_tree(process)


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _kill_tree(process) -> None:
    """SIGKILL ``process``'s group and every process under it. Ray starts each worker in its
    own process group, so a group kill alone leaves actors running until they notice that their
    raylet died: long enough to finish work that the test expects the kill to cut short."""
    import signal

    import psutil

    def descendants() -> list:
        try:
            return psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    os.killpg(process.pid, signal.SIGSTOP)  # freeze first: nothing starts while we collect
    doomed = descendants()
    for child in doomed:
        with contextlib.suppress(psutil.Error):
            child.suspend()
    doomed += [p for p in descendants() if p not in doomed]
    os.killpg(process.pid, signal.SIGKILL)
    for child in doomed:
        with contextlib.suppress(psutil.Error):
            child.kill()
    process.wait()
    psutil.wait_procs(doomed, timeout=10)
