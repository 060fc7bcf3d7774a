"""Ray workers of the embedded instance run with ``worker_env()``: Arrow's freed memory goes
back to the system at once, so an idle worker does not keep its last task's peak."""

from __future__ import annotations

import pytest
import ray

from slap_ray.resources import worker_env

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
