"""The selection job submitted through Ray's real job API to a `ray start --head` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DASHBOARD = "http://127.0.0.1:8275"


def ray_cli(*args: str, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def head_node():
    # Loopback-only test cluster: opt out of token auth for the head and the job client alike.
    env = dict(
        os.environ,
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        HF_HUB_OFFLINE="1",
        RAY_AUTH_MODE="disabled",
    )
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env.pop("RAY_ADDRESS", None)
    started = ray_cli(
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        "--port=6390",
        "--dashboard-host=127.0.0.1",
        "--dashboard-port=8275",
        "--num-cpus=2",
        "--object-store-memory=200000000",
        "--disable-usage-stats",
        env=env,
    )
    assert started.returncode == 0, started.stderr
    try:
        yield env
    finally:
        ray_cli("stop", "--force", env=env)


def test_select_job_through_ray_job_submit(head_node, pool_subset, tmp_path):
    out = tmp_path / "job_run"
    config = {
        "output_dir": str(out),
        "progress": False,
        "data": {
            "paths": [str(pool_subset / "nq_open.jsonl"), str(pool_subset / "mbpp.jsonl")],
            "max_length": 96,
        },
        "model": {"name": "tiny-random"},
        "embed": {"max_chars": 256},
        "strata": {"num_clusters": 2},
        "select": {"batch_size": 8, "alphas": [0.3], "calibration_batches": 1},
    }
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(config))
    assert shutil.which("python", path=head_node["PATH"]).startswith(str(BIN))
    submitted = ray_cli(
        "job",
        "submit",
        "--address",
        DASHBOARD,
        "--working-dir",
        str(REPO),
        "--",
        "python",
        "pipelines/select.py",
        "--config",
        str(config_path),
        env=head_node,
        timeout=600,
    )
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "report:" in submitted.stdout
    job_id = re.search(r"raysubmit_\w+", submitted.stdout + submitted.stderr).group(0)
    status = ray_cli("job", "status", "--address", DASHBOARD, job_id, env=head_node)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)
    assert f"Job '{job_id}' succeeded" in plain
    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) == 40 and scores["id"].is_unique
    assert scores["keep_a0.3"].sum() == sum(
        round(0.7 * n) for n in scores.groupby("batch_id").size()
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["output"]["scored"] == 40
