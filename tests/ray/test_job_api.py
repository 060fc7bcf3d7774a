"""The selection and fine-tuning jobs submitted through Ray's real job API to a
`ray start --head` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DASHBOARD = "http://127.0.0.1:8275"


def ray_cli(*args: str, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _wait_for_dashboard(env: dict, deadline_s: float = 90) -> None:
    deadline = time.time() + deadline_s
    while ray_cli("job", "list", "--address", DASHBOARD, env=env).returncode != 0:
        assert time.time() < deadline, "the head's job API never came up"
        time.sleep(1)


def submit(*entrypoint: str, env: dict) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's dashboard agent is still starting (the job
    API answers before the agent that runs jobs has registered, more so on a loaded machine)."""
    deadline = time.time() + 120
    while True:
        result = ray_cli(
            "job", "submit", "--address", DASHBOARD, "--working-dir", str(REPO), "--",
            *entrypoint, env=env, timeout=600,
        )  # fmt: skip
        if "No available agent" not in result.stderr or time.time() > deadline:
            return result
        time.sleep(2)


@pytest.fixture(scope="module")
def head_node():
    """A separate head (`ray start --head --block`) in its own process group.

    The suite's in-process instance is paused meanwhile (2 cores), and only this head's process
    group is killed afterwards: `ray stop` would kill every Ray process on the machine.
    """
    import ray

    from slap_ray.config import RayConfig
    from slap_ray.ray.runtime import ensure_ray

    had_local = ray.is_initialized()
    if had_local:
        ray.shutdown()
    # Loopback-only test cluster: opt out of token auth for the head and the job client alike.
    env = dict(
        os.environ,
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        HF_HUB_OFFLINE="1",
        RAY_AUTH_MODE="disabled",
    )
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--port=6390",
            "--dashboard-host=127.0.0.1",
            "--dashboard-port=8275",
            "--num-cpus=2",
            "--object-store-memory=200000000",
            "--disable-usage-stats",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_dashboard(env)
        yield env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        if had_local:  # the same settings as the suite's session fixture
            ensure_ray(RayConfig(num_cpus=2, object_store_memory=400 * 1024 * 1024))


def submit_and_succeed(script: str, config: dict, tmp_path: Path, env: dict) -> str:
    """Submit ``pipelines/<script>`` with ``config``; asserts the job SUCCEEDED (exit status and
    ``ray job status``) and returns its stdout."""
    config_path = tmp_path / f"{Path(script).stem}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    submitted = submit("python", f"pipelines/{script}", "--config", str(config_path), env=env)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    job_id = re.search(r"raysubmit_\w+", submitted.stdout + submitted.stderr).group(0)
    status = ray_cli("job", "status", "--address", DASHBOARD, job_id, env=env)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)
    assert f"Job '{job_id}' succeeded" in plain
    return submitted.stdout


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
    assert shutil.which("python", path=head_node["PATH"]).startswith(str(BIN))
    assert "report:" in submit_and_succeed("slap_select.py", config, tmp_path, head_node)
    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) == 40 and scores["id"].is_unique
    assert scores["keep_a0.3"].sum() == sum(
        round(0.7 * n) for n in scores.groupby("batch_id").size()
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["output"]["scored"] == 40


def test_finetune_job_through_ray_job_submit(head_node, pool_subset, shared_data, tmp_path):
    out = tmp_path / "finetune_job"
    config = {
        "output_dir": str(out),
        "progress": False,
        "data": {"paths": [str(pool_subset / "nq_open.jsonl")], "max_length": 96},
        "model": {"name": "tiny-random"},
        "select": {"mode": "online"},
        "train": {"alpha": 0.3, "batch_size": 10, "num_workers": 2, "checkpoint_every": 1},
        "eval": {"paths": [str(shared_data / "eval" / "nq_open.jsonl")], "max_rows": 8},
    }
    stdout = submit_and_succeed("finetune.py", config, tmp_path, head_node)
    assert "slap finetune: done" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["backward_examples"] for h in metrics["history"]] == [7, 7]
    assert (out / "model" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (out / "ray_train" / "finetune").glob("step-*")) == [
        "step-000001",
        "step-000002",
    ]


def test_sweep_job_through_ray_job_submit(head_node, pool_subset, shared_data, tmp_path):
    out = tmp_path / "sweep_job"
    config = {
        "output_dir": str(out),
        "progress": False,
        "data": {"paths": [str(pool_subset / "nq_open.jsonl")], "max_length": 96},
        "model": {"name": "tiny-random"},
        "embed": {"max_chars": 256},
        "strata": {"num_clusters": 2},
        "select": {"batch_size": 10, "alphas": [0.3], "calibration_batches": 1},
        "train": {"batch_size": 10, "num_workers": 1, "checkpoint_every": 2},
        "eval": {"paths": [str(shared_data / "eval" / "nq_open.jsonl")], "max_rows": 8},
        "sweep": {
            "arms": [{"method": "random"}],
            "alphas": [0.3],
            "seeds": [0],
            "full_data": False,
        },
    }
    submit_and_succeed("sweep.py", config, tmp_path, head_node)
    frame = pd.read_csv(out / "results.csv")
    assert frame[["arm", "alpha", "seed"]].values.tolist() == [["random", 0.3, 0]]
    assert (out / "trials" / "random-offline-a0.3-s0" / "train_ids.txt").read_text().count(
        "\n"
    ) == 14
