"""Connecting to Ray and keeping its console quiet: a running cluster (job or address) or an
embedded local instance; resource checks before work starts; run logs in the run directory.

Ray's worker output never reaches the console: ``log_to_driver`` is off, and at the end of each
job the session's worker logs (Ray's own files) are copied into the run's ``logs/ray-workers/``.
Only public Ray API is used here (a unit test checks that no module uses a private Ray module).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray
from tqdm import tqdm

from slap_ray.config import ConfigError, RayConfig, SlapConfig
from slap_ray.names import LOGS_DIR
from slap_ray.resources import (
    SHUFFLE_INPUT_BATCH_BYTES,
    SHUFFLE_INPUT_BATCH_BYTES_ENV,
    check_fits,
    quiet_worker_pool,
    warm_workers,
    worker_env,
)

# How long an actor pool may take to start all its actors (model replicas load for seconds;
# an autoscaling cluster may add nodes for minutes) before the job fails saying so.
WAIT_FOR_ACTORS_S, WAIT_FOR_ACTORS_ENV = 900, "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S"
# Keep Ray's own traffic on the loopback address unless a cluster address is given.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Model loading bars and transformers' notices belong in the log file, not the console.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# Loggers whose detail goes to the run's log file; on the console only their errors show.
QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "py.warnings", "tensorboardX")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def ensure_ray(config: RayConfig) -> bool:
    """Initialise Ray if needed; returns True when this call started it (so it should stop it).

    Inside ``ray job submit`` RAY_ADDRESS is set and ``ray.init()`` joins that cluster, whose
    nodes set ``worker_env()`` themselves (the cluster image does). The embedded instance's
    raylet and workers inherit it from this process's environment (a job runtime env would do
    the same through Ray's runtime-env agent, which made worker starts slower). It runs
    the dashboard too: Ray Train's placement-group cleaner polls the state API it serves, and
    fails with a traceback without it.
    """
    global _SESSION_DIR
    if ray.is_initialized():
        return False
    # Only errors on the console while Ray starts (its notices, e.g. that token authentication
    # is on, would otherwise print); a job's run_log then sends the detail to its log file.
    # Workers' output stays in Ray's log files (copied into the run at the end of each job).
    kwargs: dict = {"log_to_driver": False, "configure_logging": True, "logging_level": "ERROR"}
    if config.address or os.environ.get("RAY_ADDRESS"):
        context = ray.init(address=config.address or os.environ["RAY_ADDRESS"], **kwargs)
    else:
        for key, value in worker_env().items():
            os.environ.setdefault(key, value)
        # "local" always starts a fresh instance, never a leftover cluster found on the machine.
        context = ray.init(
            address="local",
            num_cpus=config.num_cpus,
            object_store_memory=config.object_store_memory,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            _system_config={**warm_workers(config.num_cpus), **quiet_worker_pool(config.num_cpus)},
            **kwargs,
        )
    _SESSION_DIR = context.address_info.get("session_dir")
    return True


# Ray's session folder of the instance this process started or joined (its worker logs).
_SESSION_DIR: str | None = None
WORKER_LOGS = "ray-workers"


def copy_worker_logs(run_dir: Path) -> int:
    """Copy this node's non-empty Ray worker logs (``worker-*.out|err`` of the session) into
    ``<run_dir>/logs/ray-workers/``; returns how many. Workers on other nodes keep theirs
    (``ray logs`` or the dashboard reads them)."""
    if not _SESSION_DIR:
        return 0
    target = run_dir / LOGS_DIR / WORKER_LOGS
    copied = 0
    for path in sorted((Path(_SESSION_DIR) / "logs").glob("worker-*")):
        if path.suffix in (".out", ".err") and path.is_file() and path.stat().st_size:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / path.name)
            copied += 1
    return copied


@contextmanager
def ray_started(config: RayConfig) -> Iterator[None]:
    """Ray for a run of several jobs (``slap run``: select, then fine-tune): started once here
    and stopped at the end, so each job's ``ray_session`` joins it instead of paying a start."""
    started = ensure_ray(config)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def check_resources(config: SlapConfig, command: str) -> None:
    """Fail before any work when the job's actors can never be placed on this cluster."""
    if not config.ray.check_resources:
        return
    total = {k: float(v) for k, v in ray.cluster_resources().items()}
    check_fits(config, command, total)


@contextmanager
def run_log(run_dir: Path, kind: str) -> Iterator[logging.Handler]:
    """Send Ray's detail (driver loggers, warnings) to ``<run_dir>/logs/<kind>.log`` while the
    block runs; the console keeps errors only. Enter after ``ray.init``, which resets the
    ``ray`` logger's handlers."""
    path = run_dir / LOGS_DIR / f"{kind}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO)
    saved = _quiet_console(handler)
    logging.captureWarnings(True)
    try:
        yield handler
    finally:
        logging.captureWarnings(False)
        _restore_console(saved, handler)
        handler.close()


def _quiet_console(handler: logging.Handler) -> list:
    import ray.data  # noqa: F401  (configures its loggers, which we then adjust)

    saved = []
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        for console in logger.handlers:
            if isinstance(console, logging.StreamHandler) and not isinstance(
                console, logging.FileHandler
            ):
                saved.append((console, console.level))
                console.setLevel(logging.ERROR)
        saved.append((logger, logger.level))
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
    slap = logging.getLogger("slap_ray")
    slap.addHandler(handler)
    return saved


def _restore_console(saved: list, handler: logging.Handler) -> None:
    for item, level in saved:
        item.setLevel(level)
    for name in (*QUIET_LOGGERS, "slap_ray"):
        logging.getLogger(name).removeHandler(handler)


@contextmanager
def ray_session(config: RayConfig, run_dir: Path, kind: str) -> Iterator[None]:
    """Ray for one job: joined or started (and then stopped), its detail in the run's log file,
    Ray Data showing one progress bar per dataset (no per-operator bars) and shuffle map tasks
    of bounded input. A dataset keeps the context it was created in, so this is set before the
    job makes any."""
    started = ensure_ray(config)
    try:
        from ray.data import DataContext

        context = DataContext.get_current()
        context.enable_operator_progress_bars = False
        context.enable_progress_bars = sys.stderr.isatty()
        if SHUFFLE_INPUT_BATCH_BYTES_ENV not in os.environ:  # else Ray's own value stands
            context.shuffle_input_batch_bytes = SHUFFLE_INPUT_BATCH_BYTES
        if WAIT_FOR_ACTORS_ENV not in os.environ:
            # An actor pool (scorers, embedders) starts work once all its actors are up: else
            # the first replica to load takes every queued call and the others idle.
            context.wait_for_min_actors_s = WAIT_FOR_ACTORS_S
        with run_log(run_dir, kind):
            try:
                yield
            finally:
                if started:
                    ray.shutdown()  # first: the workers' files are then complete
                copied = copy_worker_logs(run_dir)
                logging.getLogger("ray").info(  # the run log only, never the console
                    "Ray worker output: %d log file(s) in %s",
                    copied,
                    run_dir / LOGS_DIR / WORKER_LOGS,
                )
    finally:
        if started and ray.is_initialized():
            ray.shutdown()


@contextmanager
def progress_bar(config: SlapConfig, desc: str, total: int, initial: int = 0) -> Iterator[tqdm]:
    """A driver-side progress bar (stage, count, ETA); silent unless ``progress`` is on and the
    console is a terminal."""
    bar = tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not (config.progress and sys.stderr.isatty()),
        dynamic_ncols=True,
    )
    try:
        yield bar
    finally:
        bar.close()


__all__ = [
    "ConfigError",
    "check_resources",
    "ensure_ray",
    "progress_bar",
    "ray_session",
    "ray_started",
]
