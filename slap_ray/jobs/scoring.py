"""The scoring stage of `slap select`: calibrate the second moment once, broadcast it, score every
composed batch on scorer actors, persist each finished batch (``scored/``) for ``--resume``."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import ray
import torch
from ray.util import ActorPool

from slap_ray.assets import resolve_model_path
from slap_ray.config import ConfigError, SlapConfig
from slap_ray.core.scoring import Selection, selections_for
from slap_ray.core.seeds import derive_seed
from slap_ray.jobs.rows import ORIGIN
from slap_ray.ray.runtime import progress_bar
from slap_ray.ray.scorer import scorer_actor
from slap_ray.reporting.manifest import Manifest


def batches_of(prepared: pd.DataFrame) -> dict[int, pd.DataFrame]:
    """Composed batch id -> its rows, in id order (the order scorers see them)."""
    scored = prepared[prepared["batch_id"] >= 0].sort_values(["id", *ORIGIN], kind="stable")
    return {int(b): g for b, g in scored.groupby("batch_id", sort=True)}


def _payload(group: pd.DataFrame) -> tuple[list, list]:
    return [list(map(int, x)) for x in group["input_ids"]], [
        list(map(int, x)) for x in group["labels"]
    ]


def plain_selections(config: SlapConfig) -> list[Selection]:
    """`slap select`: ``select.method`` at every ``select.alphas``, seeded by ``seed``."""
    s = config.select
    return selections_for(
        s.method, s.alphas, config.seed, num_strata=s.num_strata, tau=s.tau, strata=s.strata,
        projection_dim=s.projection_dim, preconditioned=s.preconditioned,
    )  # fmt: skip


def _settings(config: SlapConfig, selections: list[Selection]) -> dict:
    s = config.select
    return {
        "selections": selections,
        "micro_batch_size": config.score.micro_batch_size,
        "num_strata": s.num_strata,
        "strata": s.strata,
        "eps": s.eps,
        "vocab_chunk": config.score.vocab_chunk,
        "projection_seed": derive_seed(config.seed, "projection"),
        "use_gpu": config.score.num_gpus_per_scorer > 0,
        "torch_threads": 1,  # each CPU scorer holds one CPU
    }


def _shown(key: str) -> str:
    """A plain selection key ``a0.3`` shows as its alpha; a sweep's key as itself."""
    return key[1:] if re.fullmatch(r"a[0-9.]+", key) else key


def finished_batches(scored_dir: Path, selections: list[Selection]) -> set[int]:
    """Batches a killed run already scored; they must carry every selection asked for now."""
    files = sorted(scored_dir.glob("batch-*.parquet"))
    if not files:
        return set()
    columns = set(pq.read_schema(files[0]).names)
    missing = [_shown(s.key) for s in selections if f"keep_{s.key}" not in columns]
    if missing:
        have = sorted(_shown(c.removeprefix("keep_")) for c in columns if c.startswith("keep_"))
        raise ConfigError(
            f"select.alphas: --resume asks for alphas {missing} that the {len(files)} "
            f"finished batches were not scored for (they have {have}); resume with those "
            "alphas or run without --resume"
        )
    return {int(p.stem.split("-")[1]) for p in files}


def _calibrate(config, actors, batches, run_dir: Path, manifest: Manifest) -> None:
    s = config.select
    moment_path = run_dir / "stages" / "second_moment.pt"
    with manifest.stage("calibrate"):
        if moment_path.exists():
            moment = torch.load(moment_path)
        else:
            order = sorted(batches, key=lambda b: derive_seed(config.seed, "calibrate", b))
            chosen = [_payload(batches[b]) for b in order[: s.calibration_batches]]
            moment = ray.get(actors[0].calibrate.remote(chosen, s.beta2))
            torch.save(moment, moment_path)
        moment_ref = ray.put(moment)
        ray.get([a.set_second_moment.remote(moment_ref) for a in actors])
    manifest.count("calibrate", batches=min(s.calibration_batches, len(batches)))


def _frame(group: pd.DataFrame, result: dict) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "path": group["path"].to_numpy(),
            "line": group["line"].to_numpy(),
            "id": group["id"].to_numpy(),
            "loss": result["loss"],
            "loss_stratum": result["loss_stratum"],
        }
    )
    for key, mask in result["keep"].items():
        frame[f"keep_{key}"] = mask
        frame[f"weight_{key}"] = result["weight"][key]
    return frame


def score(
    config: SlapConfig,
    prepared: pd.DataFrame,
    run_dir: Path,
    manifest: Manifest,
    selections: list[Selection] | None = None,
) -> pd.DataFrame:
    """Score every unscored batch on ``score.num_scorers`` actors (each batch once, whatever
    the number of selections); returns all scored rows."""
    selections = selections or plain_selections(config)
    batches = batches_of(prepared)
    scored_dir = run_dir / "scored"
    scored_dir.mkdir(exist_ok=True)
    done = finished_batches(scored_dir, selections)
    gpus = config.score.num_gpus_per_scorer
    actor_class = scorer_actor(num_cpus=1 if gpus == 0 else 0, num_gpus=gpus)
    model_name = resolve_model_path(config.model.name)
    actors = [
        actor_class.remote(model_name, config.model.dtype, _settings(config, selections))
        for _ in range(config.score.num_scorers)
    ]
    try:
        _calibrate(config, actors, batches, run_dir, manifest)
        todo = [b for b in batches if b not in done]
        with manifest.stage("score"):
            pool = ActorPool(actors)
            jobs = ((b, *_payload(batches[b])) for b in todo)
            with progress_bar(config, "score", total=len(batches), initial=len(done)) as bar:
                for result in pool.map_unordered(lambda a, job: a.score.remote(*job), jobs):
                    frame = _frame(batches[result["batch_id"]], result)
                    tmp = scored_dir / f".batch-{result['batch_id']:06d}.tmp"
                    frame.to_parquet(tmp)
                    tmp.rename(scored_dir / f"batch-{result['batch_id']:06d}.parquet")
                    bar.update(1)
    finally:
        for actor in actors:
            ray.kill(actor)
    seconds = manifest.data["timings_s"]["score"]
    rows_scored = int(sum(len(batches[b]) for b in todo))
    manifest.count(
        "score", batches=len(batches), resumed_batches=len(done), rows_scored_now=rows_scored
    )
    manifest.set(
        "scorer_throughput_rows_per_s", round(rows_scored / seconds, 3) if seconds else None
    )
    files = sorted(scored_dir.glob("batch-*.parquet"))
    if not files:
        return pd.DataFrame(columns=[*ORIGIN, "id", "loss", "loss_stratum"])
    return pd.concat([pd.read_parquet(p) for p in files], ignore_index=True)
