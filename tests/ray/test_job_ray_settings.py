"""Ray settings every job gets: the embedded instance's workers run with ``worker_env()``
(Arrow's freed memory goes back to the system at once, so an idle worker does not keep its last
task's peak), and a job's datasets shuffle in map tasks of bounded input."""

from __future__ import annotations

import pytest
import ray

from slap_ray.config import RayConfig
from slap_ray.ray.runtime import ray_session
from slap_ray.resources import (
    SHUFFLE_INPUT_BATCH_BYTES,
    SHUFFLE_INPUT_BATCH_BYTES_ENV,
    worker_env,
)

pytestmark = pytest.mark.ray

ALLOCATED = 400 * 2**20


@ray.remote(num_cpus=1)
def arrow_rss_after_free() -> tuple[dict, str, int, int]:
    """A worker's env and Arrow pool, and its resident growth at the peak and after freeing
    ``ALLOCATED`` bytes of Arrow buffers."""
    import os

    import numpy as np
    import psutil
    import pyarrow as pa

    process = psutil.Process()
    start = process.memory_info().rss
    chunk = pa.array(np.zeros(ALLOCATED // 8 // 8, np.int64))
    copies = [pa.concat_arrays([chunk]) for _ in range(8)]  # buffers from Arrow's own pool
    peak = process.memory_info().rss - start
    del copies, chunk
    kept = process.memory_info().rss - start
    env = {key: os.environ.get(key) for key in worker_env()}
    return env, pa.default_memory_pool().backend_name, peak, kept


def test_workers_give_freed_arrow_memory_back(ray_cluster):
    env, backend, peak, kept = ray.get(arrow_rss_after_free.remote())
    assert env == worker_env()
    assert peak >= 0.8 * ALLOCATED, (backend, peak)  # the buffers were really allocated
    assert kept <= 0.25 * ALLOCATED, f"{backend} kept {kept / 2**20:.0f} MiB of {peak / 2**20:.0f}"


# Stands in for what Ray made of its variable at import (Ray reads it once, then).
RAYS_OWN = 5 * 2**20


@pytest.mark.parametrize(
    ("env", "expected"),
    [(None, SHUFFLE_INPUT_BATCH_BYTES), (str(3 * 2**20), RAYS_OWN), ("abc", RAYS_OWN)],
)
def test_datasets_of_a_job_shuffle_in_map_tasks_of_bounded_input(
    ray_cluster, tmp_path, monkeypatch, env, expected
):
    """Ray's default coalesces up to 1 GiB of blocks into one shuffle map task; a dataset keeps
    the context it was made in, so the job's bound must be set before it makes any. When Ray's
    own variable is set, good or bad, its value is Ray's to parse and the job leaves it."""
    from ray.data import DataContext

    if env is None:
        monkeypatch.delenv(SHUFFLE_INPUT_BATCH_BYTES_ENV, raising=False)
    else:
        monkeypatch.setenv(SHUFFLE_INPUT_BATCH_BYTES_ENV, env)
    context = DataContext.get_current()
    before = context.shuffle_input_batch_bytes
    context.shuffle_input_batch_bytes = RAYS_OWN
    try:
        with ray_session(RayConfig(), tmp_path, "select"):
            made = ray.data.range(4)
        assert made.context.shuffle_input_batch_bytes == expected
        # actor pools start work once every replica is up (no replica takes every call)
        from slap_ray.ray.runtime import WAIT_FOR_ACTORS_S

        assert made.context.wait_for_min_actors_s == WAIT_FOR_ACTORS_S
    finally:
        context.shuffle_input_batch_bytes = before
        context.wait_for_min_actors_s = -1
