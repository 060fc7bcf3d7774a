"""Ray Tune for `slap sweep`: a grid of trials, each a function trainable that builds and fits its
own Ray Train ``TorchTrainer`` (the Train V2 pattern; ``Tuner(trainer)`` is deprecated).

Tune's own config classes (``ray.tune.RunConfig``) are used here and only here; the trainer in a
trial uses Ray Train's. A killed sweep restores from ``<storage>/<name>`` and runs only the
trials that had not finished.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Tune's new console output prints an experiment table even at verbose=0; the classic output
# is silent there, and the sweep prints its own progress line per finished trial.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: E402

log = logging.getLogger("slap_ray.sweep")
# What Tune adds to every reported result; results.csv keeps the trial's own metrics.
TUNE_FIELDS = {
    "timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date",
    "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "config",
    "time_since_restore", "iterations_since_restore", "should_checkpoint", "trained_now",
}  # fmt: skip


@ray.remote(num_cpus=0)
def _call(fn: Callable, *args: Any) -> Any:
    return fn(*args)


def outside_trial_placement_group(fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` in a 0-CPU task that the trial's placement group does not capture.

    A trial holds only a token of memory; the Ray Data shuffles of its data preparation (and
    the TorchTrainer's workers) need CPUs that bundle cannot give, and Ray Data submits its
    shuffle tasks without a scheduling strategy, so inside the trial they would be captured.
    """
    escape = PlacementGroupSchedulingStrategy(placement_group=None)
    return ray.get(_call.options(scheduling_strategy=escape).remote(fn, *args))


class _Progress(tune.Callback):
    """One compact line per finished trial: done / running / left and an ETA from the trials
    that trained in this session (a resumed sweep reports finished trials at once)."""

    def __init__(
        self,
        total: int,
        name_of: Callable[[dict], str],
        on_done: Callable[[], None],
        untrained: Callable[[], int],
    ) -> None:
        self.total, self.name_of, self.on_done, self.untrained = total, name_of, on_done, untrained
        self.setup()

    def setup(self, **info: Any) -> None:
        # Also called when a restored experiment starts: times from a past session are void.
        self.started: dict[str, float] = {}
        self.durations: list[float] = []

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.started[trial.trial_id] = time.monotonic()

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        result = trial.last_result or {}
        began = self.started.pop(trial.trial_id, None)
        if result.get("trained_now") and began is not None:
            self.durations.append(time.monotonic() - began)
        others = [t for t in trials if t is not trial]
        done = 1 + sum(t.status == "TERMINATED" for t in others)
        running = sum(t.status == "RUNNING" for t in others)
        left = self.total - done - running
        eta = "n/a"
        if self.durations:
            per_trial = sum(self.durations) / len(self.durations)
            eta = f"{per_trial * self.untrained() / max(running, 1) / 60:.0f} min"
        loss = result.get("eval_loss")
        log.info(
            "trial %s done (eval loss %s); %d done, %d running, %d left, ETA %s",
            self.name_of(trial.config["trial"]),
            "n/a" if loss is None else f"{loss:.4f}",
            done,
            running,
            left,
            eta,
        )
        self.on_done()


@dataclass(frozen=True)
class TuneRun:
    """Where a grid of trials keeps its Tune state (``storage``/``name``, restored on
    ``resume``) and how it runs: trials at once, and CPUs each trial's driver holds."""

    storage: str | Path
    name: str
    max_concurrent_trials: int
    trial_cpus: float
    resume: bool


def run_trials(
    trainable: Callable[[dict], None],
    specs: list[dict],
    shared: dict,
    run: TuneRun,
    trial_name: Callable[[dict], str],
    on_trial_done: Callable[[], None] = lambda: None,
    untrained: Callable[[], int] | None = None,
) -> list[dict]:
    """Run every trial spec (``config["trial"]``; ``config["shared"]`` is common to all) and
    return each trial's last reported metrics, with ``error`` set where a trial failed.
    ``on_trial_done`` runs on the driver after each finished trial (partial results);
    ``untrained`` counts the trials that still have to train (for the ETA)."""
    storage, name, trial_cpus = run.storage, run.name, run.trial_cpus
    # A trial driver only waits on its TorchTrainer: with trial_cpus=0 it holds a token of
    # memory instead (Tune refuses an empty bundle), so the trainer's workers get every CPU.
    resources = {"cpu": trial_cpus} if trial_cpus > 0 else {"memory": float(2**20)}
    trainable = tune.with_resources(trainable, resources)
    # pyarrow takes absolute paths or URIs only (a relative output_dir must still restore)
    storage = str(storage) if "://" in str(storage) else str(Path(storage).resolve())
    path = f"{storage.rstrip('/')}/{name}"
    progress = _Progress(len(specs), trial_name, on_trial_done, untrained or (lambda: len(specs)))
    if run.resume and tune.Tuner.can_restore(str(path)):
        # The restored run keeps the callbacks it was started with; Tune calls their setup()
        # again, which clears timings from the past session.
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(specs), "shared": shared},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=run.max_concurrent_trials,
                trial_name_creator=lambda t: trial_name(t.config["trial"]),
                trial_dirname_creator=lambda t: trial_name(t.config["trial"]),
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage,
                verbose=0,
                callbacks=[progress],
            ),
        )
    grid = tuner.fit()
    out = []
    for result in grid:
        metrics = {k: v for k, v in (result.metrics or {}).items() if k not in TUNE_FIELDS}
        metrics["trial"] = result.config["trial"]
        metrics["error"] = None if result.error is None else str(result.error).splitlines()[0]
        out.append(metrics)
    return out
