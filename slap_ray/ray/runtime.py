"""Connecting to Ray and keeping its console quiet: a running cluster (job or address) or an
embedded local instance; resource checks before work starts; run logs in the run directory.

Everything here that touches Ray's logging internals lives in this one file.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray
from tqdm import tqdm

from slap_ray.config import ConfigError, RayConfig, SlapConfig
from slap_ray.resources import (
    SHUFFLE_INPUT_BATCH_BYTES,
    SHUFFLE_INPUT_BATCH_BYTES_ENV,
    check_fits,
    warm_workers,
    worker_env,
)

# Keep Ray's own traffic on the loopback address unless a cluster address is given.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Model loading bars and transformers' notices belong in the log file, not the console.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# Loggers whose detail goes to the run's log file; on the console only their errors show.
QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "py.warnings")
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
    if ray.is_initialized():
        return False
    # Only errors on the console while Ray starts (its notices, e.g. that token authentication
    # is on, would otherwise print); a job's run_log then sends the detail to its log file.
    kwargs: dict = {"log_to_driver": True, "configure_logging": True, "logging_level": "ERROR"}
    if config.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=config.address or os.environ["RAY_ADDRESS"], **kwargs)
    else:
        for key, value in worker_env().items():
            os.environ.setdefault(key, value)
        # "local" always starts a fresh instance, never a leftover cluster found on the machine.
        ray.init(
            address="local",
            num_cpus=config.num_cpus,
            object_store_memory=config.object_store_memory,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            _system_config=warm_workers(config.num_cpus),
            **kwargs,
        )
    return True


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


class _RunLogHandler(logging.FileHandler):
    """Ray worker output (the lines ``log_to_driver`` would print) and quiet loggers -> file."""

    def worker_lines(self, data: dict) -> None:
        where = data.get("actor_name") or data.get("task_name") or f"pid={data.get('pid')}"
        stream = "stderr" if data.get("is_err") else "stdout"
        for line in data.get("lines", []):
            record = {"name": f"worker {where}", "msg": line, "levelname": stream}
            self.emit(logging.makeLogRecord(record))


@contextmanager
def run_log(run_dir: Path, kind: str) -> Iterator[_RunLogHandler]:
    """Send Ray's detail (driver loggers, warnings) to ``<run_dir>/logs/<kind>.log`` while the
    block runs; the console keeps errors only. Enter after ``ray.init``, which resets the
    ``ray`` logger's handlers."""
    path = run_dir / "logs" / f"{kind}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _RunLogHandler(path, encoding="utf-8")
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


@contextmanager
def worker_output_to(handler: _RunLogHandler) -> Iterator[None]:
    """Ray workers' stdout/stderr (what ``log_to_driver`` prints) into the run log instead, and
    the raylet's pushed warnings too; the raylet's other messages (errors) stay on the console.

    The raylet warns when a node has 4x its CPU count in Python workers, which warm idle workers
    (``resources.warm_workers``) reach on a 2-CPU node; Ray prints its pushed messages from
    ``listen_error_messages`` through ``worker.print_to_stdstream``, not through the dispatcher.
    """
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    saved = list(dispatcher.handlers)
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("slap_run_log", handler.worker_lines)
    print_to_console = ray_worker.print_to_stdstream

    def print_or_log(data: dict, ignore_prefix: bool) -> None:
        if _is_raylet_warning(data):
            handler.worker_lines(data)
        else:
            print_to_console(data, ignore_prefix)

    ray_worker.print_to_stdstream = print_or_log
    try:
        yield
    finally:
        dispatcher.handlers = saved
        ray_worker.print_to_stdstream = print_to_console


def _is_raylet_warning(data: dict) -> bool:
    lines = data.get("lines") or []
    return data.get("pid") == "raylet" and all(line.startswith("WARNING") for line in lines)


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
        with run_log(run_dir, kind) as handler, worker_output_to(handler):
            yield
    finally:
        if started:
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
