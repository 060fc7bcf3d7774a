"""Local rehearsal of the KubeRay deployment: the cpu-small overlay's cluster, started on
127.0.0.1 with the manifests' own `rayStartParams` and container `env` (a head with no CPUs,
one worker node joined with `ray start --address`) and token authentication on, as `authOptions`
sets it; then every RayJob's `entrypoint`, read from the rendered YAML, is submitted with
`ray job submit` and must reach SUCCEEDED. A manifest whose command does not run fails here.

What differs from a pod, and why: loopback addresses and test ports (the machine may run other
Ray instances), an object store cap (tests cap memory), the ConfigMap's files written to a temp
folder instead of /etc/slap-ray, and overrides appended to each entrypoint that point it at a
160-row pool subset, the tiny model and temp folders instead of the volume.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from manifests import CONFIG_MOUNT, job_command, of_kind, only, rendered, write_configs

pytestmark = pytest.mark.ray

BIN = Path(sys.executable).parent
GCS_PORT, DASHBOARD_PORT = 6390, 8275
DASHBOARD = f"http://127.0.0.1:{DASHBOARD_PORT}"
# Flags the test sets itself: where the nodes listen (loopback, test ports; two nodes on one
# machine need distinct dashboard-agent ports, which pods get for free).
PINNED = {
    "dashboard-host", "dashboard-port", "port", "node-ip-address", "dashboard-agent-listen-port",
}  # fmt: skip


def ray_cli(*args: str, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def start_flags(params: dict) -> list[str]:
    """`ray start` flags from a group's rayStartParams, as KubeRay passes them."""
    return [f"--{key}={value}" for key, value in params.items() if key not in PINNED]


def container_env(group: dict) -> dict:
    """The `env` of a group's Ray container, as the pod would have it."""
    (container,) = group["template"]["spec"]["containers"]
    return {item["name"]: item["value"] for item in container.get("env", [])}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop(processes: list[subprocess.Popen]) -> None:
    """Stop every node at once, as Ctrl-C would, and SIGKILL what is left after 5 s. An idle
    `ray start --block` ends its node within 2 s on SIGINT (it sat out SIGTERM); after the
    jobs ran, a node still outlived a 30-s grace, and SIGKILL has always ended it (measured)."""
    for process in processes:
        os.killpg(process.pid, signal.SIGINT)
    deadline = time.time() + 5
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_for(check, what: str, deadline_s: float = 120) -> None:
    deadline = time.time() + deadline_s
    while not check():
        assert time.time() < deadline, f"{what} never happened"
        time.sleep(1)


def _worker_joined(env: dict) -> bool:
    status = ray_cli("status", f"--address=127.0.0.1:{GCS_PORT}", env=env)
    return status.returncode == 0 and re.search(r"\b2\.0 CPU\b|/2\.0 CPU", status.stdout)


@pytest.fixture(scope="module")
def rehearsal_cluster():
    """The cpu-small overlay's head and one worker, token auth on; yields (env, cluster spec).

    The suite's in-process Ray instance is paused meanwhile (2 cores); only these nodes' process
    groups are killed afterwards (`ray stop` would kill every Ray process on the machine).
    """
    import ray

    from slap_ray.config import RayConfig
    from slap_ray.ray.runtime import ensure_ray

    spec = only(rendered("overlays/cpu-small"), "RayCluster")["spec"]
    assert spec["authOptions"]["mode"] == "token"
    (group,) = spec["workerGroupSpecs"]
    had_local = ray.is_initialized()
    if had_local:
        ray.shutdown()
    # A second node may only join with multi-node mode on (the suite turns it off elsewhere);
    # the nodes still advertise the loopback address they are given, and the token guards them.
    env = dict(
        os.environ,
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",
        HF_HUB_OFFLINE="1",
        RAY_AUTH_MODE="token",  # what KubeRay sets on every Ray container from authOptions
        RAY_AUTH_TOKEN=secrets.token_hex(16),
    )
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env.pop("RAY_ADDRESS", None)
    head = _start(
        [
            "--head", "--node-ip-address=127.0.0.1", f"--port={GCS_PORT}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}",
            "--object-store-memory=200000000", f"--dashboard-agent-listen-port={free_port()}",
            *start_flags(spec["headGroupSpec"]["rayStartParams"]),
        ],
        env | container_env(spec["headGroupSpec"]),
    )  # fmt: skip
    worker = None
    try:
        _wait_for(
            lambda: ray_cli("job", "list", "--address", DASHBOARD, env=env).returncode == 0,
            "the head's job API answering",
        )
        worker = _start(
            [
                f"--address=127.0.0.1:{GCS_PORT}", "--node-ip-address=127.0.0.1",
                "--object-store-memory=200000000", f"--dashboard-agent-listen-port={free_port()}",
                *start_flags(group["rayStartParams"]),
            ],
            env | container_env(group),
        )  # fmt: skip
        _wait_for(lambda: _worker_joined(env), "the worker joining with 2 CPUs")
        yield env, spec
    finally:
        _stop([p for p in (worker, head) if p is not None])
        if had_local:  # the same settings as the suite's session fixture
            ensure_ray(RayConfig(num_cpus=2, object_store_memory=400 * 1024 * 1024))


def submit(entrypoint: str, env: dict) -> subprocess.CompletedProcess:
    """`ray job submit` (what KubeRay's submitter runs), retried while the head's agent that runs
    jobs is still registering (the job API answers first, more so on a loaded machine)."""
    deadline = time.time() + 120
    while True:
        result = ray_cli(
            "job", "submit", "--address", DASHBOARD, "--", *shlex.split(entrypoint),
            env=env, timeout=900,
        )  # fmt: skip
        if "No available agent" not in result.stderr or time.time() > deadline:
            return result
        time.sleep(2)


def submit_and_succeed(entrypoint: str, env: dict) -> str:
    submitted = submit(entrypoint, env)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    job_id = re.search(r"raysubmit_\w+", submitted.stdout + submitted.stderr).group(0)
    status = ray_cli("job", "status", "--address", DASHBOARD, job_id, env=env)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)
    assert f"Job '{job_id}' succeeded" in plain, plain
    return submitted.stdout


def _tiny(tmp_path: Path, pool_subset: Path, shared_data: Path, job: str) -> list[str]:
    """Overrides appended to a job's entrypoint: small real data, the tiny model, temp folders."""
    return [
        f"output_dir={tmp_path / 'out' / job}",
        f"ray.storage_path={tmp_path / 'storage'}",
        f"data.paths=[{pool_subset / 'nq_open.jsonl'},{pool_subset / 'mbpp.jsonl'}]",
        "data.max_rows=null", "data.max_length=96",
        f"eval.paths=[{shared_data / 'eval' / 'nq_open.jsonl'}]", "eval.max_rows=8",
        "model.name=tiny-bpe", "strata.by=source",
        "select.batch_size=10", "select.alphas=[0.3]", "select.calibration_batches=0",
        "train.batch_size=10", "train.max_steps=2", "train.checkpoint_every=1",
        f"train.selection_dir={tmp_path / 'out' / 'select'}",
        "sweep.arms=[{method: random}]", "sweep.alphas=[0.3]", "sweep.seeds=[0]",
        "sweep.full_data=false",
    ]  # fmt: skip


def test_token_auth_is_on(rehearsal_cluster):
    env, _ = rehearsal_cluster
    anonymous = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    anonymous["RAY_AUTH_TOKEN"] = "not-the-token"
    refused = ray_cli("job", "list", "--address", DASHBOARD, env=anonymous)
    assert refused.returncode != 0
    assert "auth" in (refused.stdout + refused.stderr).lower()


def test_every_rayjob_entrypoint_runs_on_the_rehearsed_cluster(
    rehearsal_cluster, pool_subset, shared_data, tmp_path
):
    env, _ = rehearsal_cluster
    docs = rendered("overlays/cpu-small")
    config_dir = write_configs(docs, tmp_path / "configs")
    jobs = {job_command(j)[0]: j["spec"]["entrypoint"] for j in of_kind(docs, "RayJob")}
    ran, out = {}, tmp_path / "out"
    for command in ("select", "finetune", "run", "sweep"):  # finetune reads select's output
        entrypoint = jobs[command].replace(CONFIG_MOUNT + "/", f"{config_dir}/")
        if command == "run":  # every entrypoint resumes: run's selection continues select's
            shutil.copytree(out / "select", out / "run" / "select")
        tiny = _tiny(tmp_path, pool_subset, shared_data, command)
        ran[command] = submit_and_succeed(f"{entrypoint} {shlex.join(tiny)}", env)
    scores = pd.read_parquet(out / "select" / "scores.parquet")
    assert len(scores) == 40 and scores["id"].is_unique
    assert scores["keep_a0.3"].sum() == sum(
        round(0.7 * n) for n in scores.groupby("batch_id").size()
    )
    kept = (out / "select" / "kept" / "alpha-0.3.txt").read_text().split()
    trained = (out / "finetune" / "train_ids.txt").read_text().split()
    assert sorted(trained) == sorted(kept)  # finetune trained on the select job's kept rows
    resumed = json.loads((out / "run" / "select" / "manifest.json").read_text())["counts"]
    assert resumed["resume"]["prepared_reused"] is True  # the selection was not made again
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert len(metrics["history"]) == 2
    assert (out / "run" / "report.md").is_file()
    results = pd.read_csv(out / "sweep" / "results.csv")
    assert results[["arm", "alpha", "seed"]].values.tolist() == [["random", 0.3, 0]]
    # Ray Train checkpoints and Tune state went to ray.storage_path, one folder per run
    storage = tmp_path / "storage"
    runs = {p.name.rsplit("-", 1)[0] for p in storage.iterdir()}
    assert runs == {"finetune", "run", "sweep", "random-offline-a0.3-s0"}  # the sweep's trial
    (finetune,) = storage.glob("finetune-*")
    steps = sorted(p.name for p in (finetune / "ray_train" / "finetune").glob("step-*"))
    assert steps == ["step-000001", "step-000002"]
    assert not (out / "finetune" / "ray_train").exists()
