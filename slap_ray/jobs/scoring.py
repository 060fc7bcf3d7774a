"""The scoring stage of `slap select`: calibrate the second moment once (a task on the cluster),
then score every composed batch on scorer actors fed by Ray Data from ``stages/batches``; each
actor call scores a group of batches and writes them as one file to ``scored/``, whose batches
``--resume`` skips."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy

from slap_ray.config import ConfigError, SlapConfig
from slap_ray.core.scoring import Selection, selections_for
from slap_ray.core.seeds import derive_seed
from slap_ray.names import keep_column, keys_of, shown
from slap_ray.ray import pool
from slap_ray.ray.runtime import progress_bar
from slap_ray.ray.scorer import (
    SCORED_BATCHES_KEY,
    SCORED_GLOB,
    BatchScorer,
    ScorerSettings,
    calibrate_task,
)
from slap_ray.reporting.manifest import Manifest

# Rows per scorer call, and so per file in scored/. One file per 32-row batch made 6,250 files
# at 200k rows, and reading them back in the write stage took longer than scoring them.
SCORED_FILE_ROWS = 2048


def plain_selections(config: SlapConfig) -> list[Selection]:
    """`slap select`: ``select.method`` at every ``select.alphas``, seeded by ``seed``."""
    return selections_for(config.select.spec(), config.select.alphas, config.seed)


def _resources(config: SlapConfig) -> dict:
    gpus = config.score.num_gpus_per_scorer
    return (
        {"num_cpus": 0, "num_gpus": gpus}
        if gpus
        else {"num_cpus": config.score.num_cpus_per_scorer}
    )


def batches_per_call(todo: int, batch_size: int, num_scorers: int) -> int:
    """Batches per scorer call (and per scored file): up to ``SCORED_FILE_ROWS`` rows, and few
    enough that every scorer gets several calls, so none waits idle at the end."""
    return max(1, min(SCORED_FILE_ROWS // batch_size, todo // (4 * num_scorers)))


def scored_files(scored_dir: Path) -> list[Path]:
    """The files scorer calls finished, in name order; not a killed call's temporary file nor
    another layout's leftovers, which would otherwise be read twice."""
    return sorted(scored_dir.glob(SCORED_GLOB))


def finished_batches(scored_dir: Path, selections: list[Selection]) -> set[int]:
    """Batches a killed run already scored (named in each file's footer); they must carry
    every selection asked for now."""
    files = scored_files(scored_dir)
    if not files:
        return set()
    schemas = [pq.read_schema(path) for path in files]
    columns = set(schemas[0].names)
    missing = [shown(s.key) for s in selections if keep_column(s.key) not in columns]
    if missing:
        have = sorted(map(shown, keys_of(list(columns))))
        raise ConfigError(
            f"select.alphas: --resume asks for alphas {missing} that the {len(files)} "
            f"files of finished batches were not scored for (they have {have}); resume with "
            "those alphas or run without --resume"
        )
    return {
        batch for schema in schemas for batch in json.loads(schema.metadata[SCORED_BATCHES_KEY])
    }


def _unfinished(done: set[int]) -> Callable[[pa.Table], pa.Table]:
    """A filter of packed batches that drops the ``done`` batch ids, in Arrow, so that no
    token list becomes a Python object (as it did through pandas)."""
    finished = pa.array(sorted(done), pa.int64())

    def keep(batch: pa.Table) -> pa.Table:
        ids = batch["batch_id"]
        return batch.filter(pc.invert(pc.is_in(ids, value_set=finished.cast(ids.type))))

    return keep


def _packed(run_dir: Path) -> ray.data.Dataset:
    return ray.data.read_parquet(str(run_dir / "stages" / "batches"))


def _calibrate(
    config: SlapConfig,
    settings: ScorerSettings,
    run_dir: Path,
    num_batches: int,
    manifest: Manifest,
) -> str:
    """The second moment over ``select.calibration_batches`` seeded batches, computed once
    on the cluster and saved beside the stages; returns its path."""
    s = config.select
    path = run_dir / "stages" / "second_moment.pt"
    chosen = sorted(range(num_batches), key=lambda b: derive_seed(config.seed, "calibrate", b))
    chosen = set(chosen[: s.calibration_batches])
    with manifest.stage("calibrate"):
        if chosen and not path.exists():
            picked = pool.where_in(_packed(run_dir), "batch_id", chosen)
            refs = picked.select_columns(["batch_id", "input_ids", "labels"]).to_arrow_refs()
            task = calibrate_task.options(**_resources(config))
            ray.get(task.remote(settings, refs, s.beta2, str(path)))
    manifest.count("calibrate", batches=len(chosen))
    return str(path)


def score(
    config: SlapConfig,
    run_dir: Path,
    num_batches: int,
    manifest: Manifest,
    selections: list[Selection] | None = None,
) -> None:
    """Score every unscored batch on ``score.num_scorers`` actors (each batch once, whatever
    the number of selections); each call writes its group of batches to ``scored/``."""
    selections = selections or plain_selections(config)
    scored_dir = run_dir / "scored"
    scored_dir.mkdir(exist_ok=True)
    done = finished_batches(scored_dir, selections)
    settings = ScorerSettings.from_config(config, selections)
    moment = _calibrate(config, settings, run_dir, num_batches, manifest)
    todo = num_batches - len(done)
    rows_now = passes = 0
    with manifest.stage("score"):
        if todo:
            # Read before the scorers start: they may hold every CPU a read task would need.
            # One block per call, so every scorer gets work and is kept busy.
            per_call = batches_per_call(todo, config.select.batch_size, config.score.num_scorers)
            pending = _packed(run_dir)
            if done:
                pending = pending.map_batches(_unfinished(done), batch_format="pyarrow")
            pending = pending.repartition(target_num_rows_per_block=per_call).materialize()
            results = pending.map_batches(
                BatchScorer,
                fn_constructor_args=(settings, moment, str(scored_dir)),
                compute=ActorPoolStrategy(size=config.score.num_scorers),
                batch_size=per_call,
                batch_format="pandas",
                **_resources(config),
            )
            with progress_bar(config, "score", total=num_batches, initial=len(done)) as bar:
                for part in results.iter_batches(batch_size=None, batch_format="pandas"):
                    rows_now += int(part["rows"].sum())
                    passes += int(part["forward_passes"].sum())
                    bar.update(len(part))
    seconds = manifest.data["timings_s"]["score"]
    manifest.count(
        "score", batches=num_batches, resumed_batches=len(done), rows_scored_now=rows_now,
        forward_passes_now=passes,
    )  # fmt: skip
    manifest.set("scorer_throughput_rows_per_s", round(rows_now / seconds, 3) if seconds else None)
