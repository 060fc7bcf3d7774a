"""What a job's actors ask of the cluster, checked before any work starts.

Ray queues an actor or a Train worker group that no node can hold and waits for it forever; a
GPU asked of a CPU-only cluster is the common case. ``check_fits`` turns that into a one-line
error naming the setting. Pure Python: the caller passes ``ray.cluster_resources()``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from slap_ray.config import ConfigError, SlapConfig


@dataclass(frozen=True)
class Demand:
    """``count`` actors, each asking ``per_actor`` resources, configured by ``settings``."""

    settings: str
    count: int
    per_actor: dict[str, float]


def _pool(setting: str, count: int, section: str, unit: str, values) -> Demand:
    """An actor pool whose actors each hold ``num_gpus_per_<unit>`` GPUs, else
    ``num_cpus_per_<unit>`` CPUs."""
    gpus = getattr(values, f"num_gpus_per_{unit}")
    cpus = getattr(values, f"num_cpus_per_{unit}")
    label = (
        f"{setting}={count}, {section}.num_gpus_per_{unit}={gpus:g}, "
        f"{section}.num_cpus_per_{unit}={cpus:g}"
    )
    return Demand(label, count, {"GPU": gpus} if gpus else {"CPU": cpus})


def demands(config: SlapConfig, command: str) -> list[Demand]:
    """The actor groups a command runs (each group runs on its own, one after another)."""
    out: list[Demand] = []
    tokenizers = config.data.num_tokenizers
    if command in ("select", "finetune") and tokenizers is not None:
        out.append(Demand(f"data.num_tokenizers={tokenizers}", tokenizers, {"CPU": 1.0}))
    if command == "select":
        e, s = config.embed, config.score
        if config.strata.by == "embedding":
            out.append(_pool("embed.num_actors", e.num_actors, "embed", "actor", e))
        out.append(_pool("score.num_scorers", s.num_scorers, "score", "scorer", s))
    if command == "finetune":
        t = config.train
        per_worker = {k: float(v) for k, v in t.resources_per_worker.items() if v}
        if t.use_gpu:
            per_worker.setdefault("GPU", 1.0)
        out.append(
            Demand(
                f"train.num_workers={t.num_workers}, train.use_gpu={str(t.use_gpu).lower()}, "
                f"train.resources_per_worker={dict(t.resources_per_worker)}",
                t.num_workers,
                per_worker,
            )
        )
    return out


def _describe(total: dict[str, float]) -> str:
    shown = {k: v for k, v in total.items() if k in ("CPU", "GPU") or not k.startswith("node:")}
    shown = {
        k: v for k, v in shown.items() if "memory" not in k and not k.startswith("accelerator")
    }
    return ", ".join(f"{k} {v:g}" for k, v in sorted(shown.items())) or "nothing"


def check_fits(config: SlapConfig, command: str, total: dict[str, float]) -> None:
    """Raise ConfigError when a group of the command's actors cannot all be placed at once."""
    for demand in demands(config, command):
        for resource, amount in demand.per_actor.items():
            needed = amount * demand.count
            have = float(total.get(resource, 0.0))
            if needed <= have + 1e-9:
                continue
            hint = (
                "set it to 0 or connect to a cluster with GPUs (ray.address)"
                if resource == "GPU" and have == 0
                else "lower it or add nodes"
            )
            raise ConfigError(
                f"{demand.settings}: needs {resource} {needed:g} but the Ray cluster offers "
                f"{_describe(total)}; {hint} (ray.check_resources=false skips this check on "
                "an autoscaling cluster)"
            )


# A job is many short Ray Data executions; Ray's default kills a worker idle for 1 s beyond one
# per CPU, so each execution paid fresh worker start-up and imports (measured: a 40-row select
# took 116 s with the defaults, 77 s with warm workers). Idle workers cost memory only.
IDLE_WORKER_KEEP_MS = 600_000


# Arrow's default pool (mimalloc in pyarrow's wheels) gives freed pages back only on a later
# allocation, so an idle Ray worker kept the peak of its last Arrow-heavy task: at 200k rows one
# held 1.32 GiB idle after a Parquet read and a shuffle; purged at once, 0.67 GiB at most
# (docs/performance.md). glibc's own knobs (MALLOC_TRIM_/MMAP_THRESHOLD_) also gave memory back
# but slowed a SmolLM2 training step by 25%, so torch's allocator is left as it is.
# Ray Data 2.60 plans every ``read_parquet`` with a pool of footer-reading actors, 32 by default,
# each a fresh worker process that is killed once the listing is done. The jobs read Parquet
# only for their own outputs (tens of files, each footer a few KiB), which one actor with its
# 128 concurrent reads lists at once; the 32 only cost process starts: in the selection tests
# they were 18 of 151 processes, and with footer actors capped, those tests took 16% fewer
# CPU-seconds (docs/performance.md). Ray's own variable, when set, wins.
PARQUET_FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
WORKER_ENV = {"MIMALLOC_PURGE_DELAY": "0", PARQUET_FOOTER_ACTORS_ENV: "1"}


# Ray Data's hash shuffle (2.60) coalesces a node's input blocks up to this many bytes into one
# map task, which holds them, their partitions and the encoded shards at once. Ray's default,
# 1 GiB, made one worker peak at 1.40 GiB packing 1M rows (0.51 GiB at 200k: the whole input
# was below it); at 128 MiB it peaked at 0.35 GiB, and the shuffle was no slower
# (docs/performance.md). Ray's own variable, when set, wins: Ray parses it (a bad value gets
# Ray's one-line warning and its default, not a traceback from us).
SHUFFLE_INPUT_BATCH_BYTES = 128 * 2**20
SHUFFLE_INPUT_BATCH_BYTES_ENV = "RAY_DATA_SHUFFLE_INPUT_BATCH_BYTES"


def worker_env() -> dict[str, str]:
    """Environment for every Ray worker process: the embedded instance's workers inherit it from
    the driver's environment (``runtime.ensure_ray``), the cluster image (cluster/Dockerfile)
    sets it as ENV (checked by a test)."""
    return dict(WORKER_ENV)


def quiet_worker_pool(num_cpus: int | None) -> dict:
    """Ray system config of an embedded instance: workers start as many at a time as warm ones
    are kept (``warm_workers``). The raylet warns on the driver's console (through its error
    channel, which ``log_to_driver`` does not silence) once 4x this many Python workers exist,
    which the warm pool alone reaches on a 2-CPU machine at Ray's default (the CPU count)."""
    return {
        "worker_maximum_startup_concurrency": warm_workers(num_cpus)["num_workers_soft_limit"],
        # An embedded instance serves one short job: the workers Ray starts in advance for its
        # first driver went unused (counted among the selection tests' never-used workers).
        "prestart_worker_first_driver": False,
    }


def warm_workers(num_cpus: int | None) -> dict:
    """Ray system config that keeps idle workers for reuse (``num_cpus`` per node); a KubeRay
    worker container sets the same keys as ``RAY_<key>`` env (checked by the manifest tests)."""
    cpus = num_cpus or os.cpu_count() or 1
    return {
        "num_workers_soft_limit": 2 * cpus + 2,
        "idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS,
    }
