"""Ray-tier fixtures: the one baseline selection that several modules read."""

from __future__ import annotations

from pathlib import Path

import pytest
from selections import tiny_config


@pytest.fixture(scope="session")
def baseline_run(ray_cluster, pool_subset, tmp_path_factory) -> Path:
    """`slap select` on the 160-row real pool with ``tiny_config``: embedding strata,
    calibration, alphas 0.2/0.3/0.4. Tests compare other layouts, clusters and resumes to it."""
    from slap_ray.jobs.select import run_select

    out = tmp_path_factory.mktemp("baseline")
    run_select(tiny_config([str(pool_subset / "*.jsonl")], out))
    return out
