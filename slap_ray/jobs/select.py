"""`slap select`: offline SLAP over an instruction pool (SLAP_METHOD.md section 3).

Stages: read -> tokenise -> embed -> k-means strata -> compose batches -> calibrate second
moment -> score & select on scorer actors -> write outputs. Finished stages are persisted in the
run directory (``stages/``, ``scored/``) so ``--resume`` continues a killed run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from ray.util import ActorPool
from tqdm import tqdm

from slap_ray.assets import resolve_embedder_path, resolve_model_path
from slap_ray.config import SlapConfig, config_to_dict, write_resolved_config
from slap_ray.core.seeds import derive_seed, id_rank_key
from slap_ray.core.strata import compose_batches, kmeans_fit
from slap_ray.data.ingest import (
    BadRowError,
    SchemaOptions,
    expand_paths,
    make_reject,
    write_rejected,
)
from slap_ray.ray import stages
from slap_ray.ray.runtime import ensure_ray
from slap_ray.ray.scorer import scorer_actor
from slap_ray.reporting.manifest import Manifest
from slap_ray.reporting.selection import keep_column, write_selection_report

log = logging.getLogger("slap_ray.select")
PREPARED_COLUMNS = [
    "id",
    "source",
    "task",
    "path",
    "line",
    "reject_reason",
    "raw",
    "cluster",
    "input_ids",
    "labels",
    "num_tokens",
]


def _fingerprint(config: SlapConfig) -> str:
    """What the prepared/scored stages depend on: everything except where and how to run."""
    tree = config_to_dict(config)
    for key in ("output_dir", "resume", "progress", "ray", "score", "train", "eval"):
        tree.pop(key, None)
    tree["select"].pop("mode", None)
    tree["select"].pop("alphas", None)  # scored batches carry every alpha they were asked for
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def _schema_options(config: SlapConfig) -> SchemaOptions:
    d = config.data
    return SchemaOptions(
        schema=d.schema_,
        prompt_field=d.prompt_field,
        response_field=d.response_field,
        system_field=d.system_field,
        id_field=d.id_field,
        source=d.source,
        task=d.task,
    )


def read_rows(
    config: SlapConfig, paths: list[str], manifest: Manifest | None = None, stage: str = "read"
) -> ray.data.Dataset:
    """Globs/files of any ingestion format plus the embedded sources, as one Ray dataset."""
    embedded = [p for p in paths if p in stages.EMBEDDED]
    patterns = [p for p in paths if p not in stages.EMBEDDED]
    files = expand_paths(patterns) if patterns else []
    parts = [stages.read_stage(files, _schema_options(config), config.data.format)] if files else []
    for name in dict.fromkeys(embedded):
        parts.append(stages.chitchat_stage(config.data.chitchat_mode, stages.EMBEDDED[name]))
    if manifest is not None:
        manifest.count(stage, files=len(files), embedded=embedded)
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def _read(config: SlapConfig, manifest: Manifest) -> ray.data.Dataset:
    return read_rows(config, config.data.paths, manifest)


def _mark_rejects(meta: pd.DataFrame, config: SlapConfig) -> pd.DataFrame:
    """Duplicate ids (first by (path, line) wins), the bad-row policy, and the max_rows sample."""
    meta = meta.sort_values(["path", "line"], kind="stable").reset_index(drop=True)
    accepted = meta["reject_reason"].isna()
    first_seen = meta[accepted].drop_duplicates("id")
    first_where = dict(
        zip(
            first_seen["id"], first_seen["path"] + ":" + first_seen["line"].astype(str), strict=True
        )
    )
    duplicate = accepted & meta.duplicated("id") & meta["id"].isin(first_where)
    meta.loc[duplicate, "reject_reason"] = [
        f"duplicate id {i!r} (first seen at {first_where[i]})" for i in meta.loc[duplicate, "id"]
    ]
    if config.data.on_bad_rows == "error" and meta["reject_reason"].notna().any():
        bad = meta[meta["reject_reason"].notna()].iloc[0]
        raise BadRowError(bad["path"], int(bad["line"]), bad["reject_reason"])
    meta["sampled"] = meta["reject_reason"].isna()
    if config.data.max_rows is not None and meta["sampled"].sum() > config.data.max_rows:
        keys = meta.loc[meta["sampled"], "id"].map(
            lambda i: id_rank_key(config.seed, "max-rows", i)
        )
        meta.loc[keys.sort_values(kind="stable").index[config.data.max_rows :], "sampled"] = False
    return meta


def prepare(config: SlapConfig, manifest: Manifest) -> pd.DataFrame:
    """Read, tokenise, embed, cluster and compose: one row per input row, with its batch id."""
    with manifest.stage("read"):
        rows = _read(config, manifest).materialize()
        meta = _mark_rejects(
            rows.select_columns(["id", "path", "line", "reject_reason"]).to_pandas(), config
        )
    manifest.count(
        "read",
        rows=len(meta),
        rejected=int(meta["reject_reason"].notna().sum()),
        sampled=int(meta["sampled"].sum()),
    )
    rejected_keys = set(
        zip(
            meta.loc[meta["reject_reason"].notna(), "path"],
            meta.loc[meta["reject_reason"].notna(), "line"],
            strict=True,
        )
    )
    # Rows are keyed by origin: a duplicate shares its id with the row that won.
    sampled_keys = set(
        zip(meta.loc[meta["sampled"], "path"], meta.loc[meta["sampled"], "line"], strict=True)
    )
    rejected = rows.filter(lambda r: (r["path"], r["line"]) in rejected_keys).to_pandas()
    reasons = dict(
        zip(zip(meta["path"], meta["line"], strict=True), meta["reject_reason"], strict=True)
    )
    if len(rejected):
        rejected["reject_reason"] = [
            reasons[k] for k in zip(rejected["path"], rejected["line"], strict=True)
        ]
    with manifest.stage("tokenize"):
        accepted = rows.filter(lambda r: (r["path"], r["line"]) in sampled_keys)
        tokenized = stages.tokenize_stage(
            accepted, config.model.name, config.data.max_length, config.data.truncation
        ).materialize()
    with manifest.stage("embed"):
        embedded = stages.embed_stage(
            tokenized.filter(lambda r: r["reject_reason"] is None),
            resolve_embedder_path(config.embed.model),
            config.embed.batch_size,
            config.embed.max_chars,
            config.embed.num_actors,
            config.embed.num_gpus_per_actor,
        ).materialize()
    with manifest.stage("kmeans"):
        total = embedded.count()
        fraction = min(1.0, config.strata.fit_sample_size / max(total, 1))
        _, sample = stages.fit_sample(embedded, config.seed, fraction)
        clusters = min(config.strata.num_clusters, len(sample))
        centroids = kmeans_fit(
            sample, clusters, derive_seed(config.seed, "kmeans"), config.strata.max_iter
        )
        table = stages.assign_stage(embedded, centroids).drop_columns(["messages"]).to_pandas()
    manifest.count("kmeans", fit_rows=len(sample), clusters=clusters)
    with manifest.stage("compose"):
        table["batch_id"] = compose_batches(
            table["id"].tolist(),
            table["cluster"].to_numpy(),
            config.select.batch_size,
            derive_seed(config.seed, "compose"),
        )
    token_rejects = (
        tokenized.filter(lambda r: r["reject_reason"] is not None)
        .drop_columns(["messages"])
        .to_pandas()
    )
    dropped = meta.loc[meta["reject_reason"].isna() & ~meta["sampled"]]
    manifest.count("tokenize", rejected=len(token_rejects), not_sampled=len(dropped))
    out = pd.concat(
        [table, token_rejects, rejected.drop(columns=["messages"], errors="ignore")],
        ignore_index=True,
    )
    for column in ("source", "task", "reject_reason", "raw"):
        # All-null columns come back from Arrow as float NaN; keep them as text or None.
        out[column] = pd.Series(
            [x if isinstance(x, str) else None for x in out[column]], dtype=object
        )
    out["batch_id"] = out["batch_id"].fillna(-1).astype("int64")
    out["cluster"] = out["cluster"].fillna(-1).astype("int64")
    return out.sort_values("id", kind="stable").reset_index(drop=True)


def _batches(prepared: pd.DataFrame) -> dict[int, pd.DataFrame]:
    scored = prepared[prepared["batch_id"] >= 0].sort_values("id", kind="stable")
    return {int(b): g for b, g in scored.groupby("batch_id", sort=True)}


def _payload(group: pd.DataFrame) -> tuple[list, list]:
    return [list(map(int, x)) for x in group["input_ids"]], [
        list(map(int, x)) for x in group["labels"]
    ]


def score(
    config: SlapConfig, prepared: pd.DataFrame, run_dir: Path, manifest: Manifest
) -> pd.DataFrame:
    """Calibrate the second moment once, broadcast it, and score every unscored batch."""
    batches = _batches(prepared)
    scored_dir = run_dir / "scored"
    scored_dir.mkdir(exist_ok=True)
    done = {int(p.stem.split("-")[1]) for p in scored_dir.glob("batch-*.parquet")}
    s = config.select
    settings = {
        "seed": config.seed,
        "alphas": s.alphas,
        "method": s.method,
        "micro_batch_size": config.score.micro_batch_size,
        "num_strata": s.num_strata,
        "tau": s.tau,
        "strata": s.strata,
        "eps": s.eps,
        "projection_dim": s.projection_dim,
        "vocab_chunk": config.score.vocab_chunk,
        "use_gpu": config.score.num_gpus_per_scorer > 0,
    }
    actor_class = scorer_actor(
        num_cpus=1 if config.score.num_gpus_per_scorer == 0 else 0,
        num_gpus=config.score.num_gpus_per_scorer,
    )
    model_name = resolve_model_path(config.model.name)
    actors = [
        actor_class.remote(model_name, config.model.dtype, dict(settings))
        for _ in range(config.score.num_scorers)
    ]
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
    todo = [b for b in batches if b not in done]
    with manifest.stage("score"):
        pool = ActorPool(actors)
        jobs = ((b, *_payload(batches[b])) for b in todo)
        bar = tqdm(
            total=len(batches), initial=len(done), desc="score batches", disable=not config.progress
        )
        for result in pool.map_unordered(lambda actor, job: actor.score.remote(*job), jobs):
            group = batches[result["batch_id"]]
            frame = pd.DataFrame(
                {
                    "id": group["id"].to_numpy(),
                    "loss": result["loss"],
                    "loss_stratum": result["loss_stratum"],
                }
            )
            for alpha, mask in result["keep"].items():
                frame[keep_column(alpha)] = mask
            tmp = scored_dir / f".batch-{result['batch_id']:06d}.tmp"
            frame.to_parquet(tmp)
            tmp.rename(scored_dir / f"batch-{result['batch_id']:06d}.parquet")
            bar.update(1)
        bar.close()
    seconds = manifest.data["timings_s"]["score"]
    rows_scored = int(sum(len(batches[b]) for b in todo))
    manifest.count(
        "score", batches=len(batches), resumed_batches=len(done), rows_scored_now=rows_scored
    )
    manifest.set(
        "scorer_throughput_rows_per_s", round(rows_scored / seconds, 3) if seconds else None
    )
    for actor in actors:
        ray.kill(actor)
    return pd.concat(
        [pd.read_parquet(p) for p in sorted(scored_dir.glob("batch-*.parquet"))], ignore_index=True
    )


def write_outputs(
    config: SlapConfig,
    prepared: pd.DataFrame,
    scored: pd.DataFrame,
    run_dir: Path,
    manifest: Manifest,
) -> pd.DataFrame:
    """scores.parquet, kept ids per alpha and rejected.jsonl; returns the scores table."""
    scores = prepared.drop(columns=["input_ids", "labels", "raw"]).merge(
        scored, on="id", how="left"
    )
    for alpha in config.select.alphas:
        scores[keep_column(alpha)] = scores[keep_column(alpha)].fillna(False).astype(bool)
    scores.to_parquet(run_dir / "scores.parquet", index=False)
    kept_dir = run_dir / "kept"
    kept_dir.mkdir(exist_ok=True)
    summary = {}
    for alpha in config.select.alphas:
        ids = sorted(scores.loc[scores[keep_column(alpha)], "id"])
        (kept_dir / f"alpha-{alpha:g}.txt").write_text(
            "".join(i + "\n" for i in ids), encoding="utf-8"
        )
        summary[f"{alpha:g}"] = len(ids)
    rejects = prepared[prepared["reject_reason"].notna()]
    write_rejected(
        [
            make_reject(p, int(ln), r, raw if isinstance(raw, str) else "")
            for p, ln, r, raw in zip(
                rejects["path"],
                rejects["line"],
                rejects["reject_reason"],
                rejects["raw"],
                strict=True,
            )
        ],
        run_dir / "rejected.jsonl",
    )
    manifest.count(
        "output",
        rows=len(scores),
        scored=int(scores["loss"].notna().sum()),
        rejected=len(rejects),
        kept_per_alpha=summary,
    )
    manifest.set("method", config.select.method)
    return scores


def run_select(config: SlapConfig) -> Path:
    """Run the whole selection job; returns the path of report.md."""
    run_dir = Path(config.output_dir)
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    write_resolved_config(config, run_dir / "config.yaml")
    manifest = Manifest("select")
    fingerprint = _fingerprint(config)
    stamp = run_dir / "stages" / "fingerprint.txt"
    prepared_path = run_dir / "stages" / "prepared.parquet"
    if not config.resume or not stamp.exists() or stamp.read_text() != fingerprint:
        for stale in [
            prepared_path,
            run_dir / "stages" / "second_moment.pt",
            *(run_dir / "scored").glob("batch-*.parquet"),
        ]:
            stale.unlink(missing_ok=True)
    stamp.write_text(fingerprint)
    started = ensure_ray(config.ray)
    try:
        if prepared_path.exists():
            prepared = pd.read_parquet(prepared_path)
            manifest.count("resume", prepared_reused=True)
        else:
            prepared = prepare(config, manifest)
            pq.write_table(
                pa.Table.from_pandas(
                    prepared[PREPARED_COLUMNS + ["batch_id"]], preserve_index=False
                ),
                prepared_path,
            )
        scored = score(config, prepared, run_dir, manifest)
        with manifest.stage("write"):
            scores = write_outputs(config, prepared, scored, run_dir, manifest)
    finally:
        manifest.write(run_dir / "manifest.json")
        if started:
            ray.shutdown()
    # Written last, so its timings include every stage.
    return write_selection_report(scores, config.select.alphas, run_dir, manifest.data)


def main_select(config: SlapConfig) -> int:
    report = run_select(config)
    kept = json.loads((Path(config.output_dir) / "manifest.json").read_text())["counts"]["output"]
    print(f"slap select: done; kept per alpha {kept['kept_per_alpha']}; report: {report}")
    return 0
