"""A first `slap run` as a newcomer sees it: clean console, the detail in the run's log file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.ray


def test_slap_run_console_is_clean_and_the_detail_goes_to_the_log(
    pool_subset, shared_data, tmp_path
):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "slap_ray.cli", "run",
        "--config", str(REPO / "pipelines" / "configs" / "pool_tiny.yaml"),
        f"data.paths=[{pool_subset}/gsm8k.jsonl,{pool_subset}/dolly.jsonl]",
        f"eval.paths=[{shared_data}/eval/gsm8k.jsonl]",
        "eval.max_rows=8", "train.max_steps=2", "train.checkpoint_every=1",
        f"output_dir={out}", "ray.num_cpus=2", "ray.object_store_memory=200000000",
    ]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    console = (done.stdout + done.stderr).splitlines()
    assert done.stdout.strip().startswith("slap run: 2 steps") and "report:" in done.stdout
    for noise in ("Traceback", "RpcError", " INFO ", "FutureWarning", "Loading weights",
                  "Checkpoint", "Token authentication"):  # fmt: skip
        assert not [line for line in console if noise in line], noise
    # stage lines, the summary, and at most Ray's one known actor-argument notice (ray#57733)
    assert len(console) <= 16, console
    select_log = (out / "select" / "logs" / "select.log").read_text()
    finetune_log = (out / "logs" / "finetune.log").read_text()
    assert "MapBatches(Embedder)" in select_log or "Embedder" in select_log
    assert "worker" in finetune_log and "RpcError" not in finetune_log


def test_raylet_warnings_go_to_the_run_log_and_its_errors_stay_on_the_console(tmp_path, capsys):
    """The worker-pool size warning (CI stop 21) reaches the driver through Ray's error channel,
    which prints with ``ray._private.worker.print_to_stdstream``, the name patched here."""
    import ray._private.worker as ray_worker

    from slap_ray.ray.runtime import run_log, worker_output_to

    warning = "WARNING: 8 PYTHON worker processes have been started on node: abc"
    error = "A worker died or was killed while executing a task"
    with run_log(tmp_path, "select") as handler, worker_output_to(handler):
        for line in (warning, error):
            data = {"lines": [line], "pid": "raylet", "is_err": False}
            ray_worker.print_to_stdstream(data, ignore_prefix=False)
    after = {"lines": [warning + " (after)"], "pid": "raylet", "is_err": False}
    ray_worker.print_to_stdstream(after, ignore_prefix=False)
    console = capsys.readouterr().out
    log = (tmp_path / "logs" / "select.log").read_text()
    assert warning in log
    printed = [line for line in console.splitlines() if "PYTHON worker" in line]
    assert len(printed) == 1 and printed[0].endswith(f"{warning} (after)")
    assert error in console and error not in log
