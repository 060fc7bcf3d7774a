"""`slap select`: offline SLAP over an instruction pool (SLAP_METHOD.md section 3).

Stages: read -> tokenise -> embed -> k-means strata -> compose batches -> calibrate second
moment -> score & select on scorer actors -> write outputs. Finished stages are persisted in the
run directory (``stages/``, ``scored/``) so ``--resume`` continues a killed run. Every table is
keyed by the row's origin (path, line): one output row per input row, whatever its id.
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

from slap_ray.assets import resolve_embedder_path
from slap_ray.config import ConfigError, SlapConfig, config_to_dict, write_resolved_config
from slap_ray.core.scoring import Selection
from slap_ray.core.seeds import derive_seed
from slap_ray.core.selection import n_keep_for
from slap_ray.core.strata import compose_batches, kmeans_fit
from slap_ray.data.ingest import BadRowError, make_reject, write_rejected
from slap_ray.jobs.rows import (
    ORIGIN,
    frame_of,
    input_files,
    keys_of,
    mark_rejects,
    raise_first_reject,
    raw_text,
    read_meta,
    read_rows,
)
from slap_ray.jobs.rundir import locked_run_dir
from slap_ray.jobs.scoring import plain_selections, score
from slap_ray.ray import stages
from slap_ray.ray.runtime import check_resources, ray_session
from slap_ray.reporting.manifest import Manifest
from slap_ray.reporting.selection import keep_column, weight_column, write_selection_report

log = logging.getLogger("slap_ray.select")
TOKEN_COLUMNS = ["path", "line", "cluster", "input_ids", "labels", "num_tokens"]
PREPARED_COLUMNS = [
    "id", "source", "task", "path", "line", "reject_reason", "raw", "sampled",
    "cluster", "batch_id", "input_ids", "labels", "num_tokens",
]  # fmt: skip
# What a fresh run clears in its output_dir (a resumed run keeps stages/ and scored/).
OWNED = (
    "scores.parquet", "kept", "rejected.jsonl", "report.md", "plots", "manifest.json",
    "config.yaml", "stages", "scored", "logs",
)  # fmt: skip


def _fingerprint(config: SlapConfig) -> str:
    """What the prepared/scored stages depend on: everything except where and how to run."""
    tree = config_to_dict(config)
    for key in ("output_dir", "resume", "progress", "ray", "score", "train", "eval", "sweep"):
        tree.pop(key, None)
    tree["select"].pop("mode", None)
    tree["select"].pop("alphas", None)  # checked against the scored batches on resume
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def budget_warnings(config: SlapConfig) -> list[str]:
    """Alphas whose per-batch budget rounds to nothing or to everything."""
    size, out = config.select.batch_size, []
    for alpha in config.select.alphas:
        n = n_keep_for(size, alpha)
        if n == 0:
            out.append(f"select.alphas: alpha {alpha:g} keeps 0 of every {size}-row batch")
        elif n == size and alpha > 0:
            out.append(
                f"select.alphas: alpha {alpha:g} prunes nothing from a {size}-row batch "
                f"(select.batch_size={size} is too small for this alpha)"
            )
    return out


def _tokenize(config: SlapConfig, rows: ray.data.Dataset, sampled: set) -> pd.DataFrame:
    """Tokenise the sampled rows; returns their origin, reject reason and token columns."""
    tokenized = stages.tokenize_stage(
        rows.filter(lambda r: (r["path"], r["line"]) in sampled),
        config.model.name,
        config.data.max_length,
        config.data.truncation,
    )
    return tokenized.drop_columns(["raw"]).materialize()


def _strata(config: SlapConfig, tokenized: ray.data.Dataset, manifest: Manifest) -> pd.DataFrame:
    """Embed the usable rows, fit k-means on a seeded sample, assign every row its cluster."""
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
        table = stages.assign_stage(embedded, centroids)
        table = table.select_columns(["id", *TOKEN_COLUMNS]).to_pandas()
    manifest.count("kmeans", fit_rows=len(sample), clusters=clusters)
    return table


def prepare(config: SlapConfig, manifest: Manifest) -> pd.DataFrame:
    """Read, tokenise, embed, cluster and compose: one row per input row, with its batch id."""
    with manifest.stage("read"):
        rows = read_rows(config, config.data.paths, "data.paths", manifest).materialize()
        meta = mark_rejects(read_meta(rows, config.data.paths, "data.paths"), config)
    rejected = meta[meta["reject_reason"].notna()]
    raws = rows.filter(lambda r: r["reject_reason"] is not None)
    meta = meta.merge(frame_of(raws, [*ORIGIN, "raw"]), on=ORIGIN, how="left")
    manifest.count(
        "read",
        rows=len(meta),
        rejected=len(rejected),
        sampled=int(meta["sampled"].sum()),
        not_sampled=int((meta["reject_reason"].isna() & ~meta["sampled"]).sum()),
    )
    with manifest.stage("tokenize"):
        tokenized = _tokenize(config, rows, keys_of(meta[meta["sampled"]]))
        token_rejects = frame_of(
            tokenized.filter(lambda r: r["reject_reason"] is not None),
            [*ORIGIN, "reject_reason"],
        )
    if config.data.on_bad_rows == "error":
        raise_first_reject(token_rejects)  # e.g. truncation removed every response token
    manifest.count("tokenize", rejected=len(token_rejects))
    if int(meta["sampled"].sum()) == len(token_rejects):
        raise ConfigError(
            f"data.paths: no usable rows: all {len(meta)} rows read were rejected "
            "(data.on_bad_rows=skip writes them to rejected.jsonl)"
        )
    table = _strata(config, tokenized, manifest)
    with manifest.stage("compose"):
        table["batch_id"] = compose_batches(
            table["id"].tolist(),
            table["cluster"].to_numpy(),
            config.select.batch_size,
            derive_seed(config.seed, "compose"),
        )
    return _one_row_per_input(meta, token_rejects, table.drop(columns=["id"]))


def _one_row_per_input(
    meta: pd.DataFrame, token_rejects: pd.DataFrame, table: pd.DataFrame
) -> pd.DataFrame:
    reasons = token_rejects.set_index(ORIGIN)["reject_reason"]
    origin = pd.MultiIndex.from_frame(meta[ORIGIN])
    late = origin.isin(reasons.index)
    meta.loc[late, "reject_reason"] = reasons.reindex(origin[late]).to_numpy()
    out = meta.merge(table, on=ORIGIN, how="left")
    out["batch_id"] = out["batch_id"].fillna(-1).astype("int64")
    out["cluster"] = out["cluster"].fillna(-1).astype("int64")
    out["num_tokens"] = out["num_tokens"].fillna(0).astype("int64")
    out["raw"] = [x if isinstance(x, str) else None for x in out["raw"]]
    return out.sort_values(["id", *ORIGIN], kind="stable").reset_index(drop=True)[PREPARED_COLUMNS]


def write_outputs(
    config: SlapConfig,
    prepared: pd.DataFrame,
    scored: pd.DataFrame,
    run_dir: Path,
    manifest: Manifest,
    selections: list[Selection],
) -> pd.DataFrame:
    """scores.parquet (a keep and a weight column per selection), kept ids (+ training weights)
    per alpha of ``select.alphas`` and rejected.jsonl."""
    scores = prepared.drop(columns=["input_ids", "labels", "raw"]).merge(
        scored.drop(columns=["id"]), on=ORIGIN, how="left"
    )
    ours = set()
    for key in (s.key for s in selections):
        keep, weight = f"keep_{key}", f"weight_{key}"
        scores[keep] = scores[keep].fillna(False).astype(bool)
        scores[weight] = scores[weight].fillna(0.0).astype(float)
        ours |= {keep, weight}
    stale = [c for c in scores.columns if c.startswith(("keep_", "weight_")) and c not in ours]
    scores = scores.drop(columns=stale)
    scores.to_parquet(run_dir / "scores.parquet", index=False)
    summary = write_kept(scores, config.select.alphas, run_dir / "kept")
    rejects = prepared[prepared["reject_reason"].notna()]
    texts = raw_text(rejects, config.data.format)
    write_rejected(
        [
            make_reject(p, int(ln), r, raw)
            for p, ln, r, raw in zip(
                rejects["path"], rejects["line"], rejects["reject_reason"], texts, strict=True
            )
        ],
        run_dir / "rejected.jsonl",
    )
    manifest.count(
        "output",
        rows=len(scores),
        scored=int(scores["loss"].notna().sum()),
        rejected=len(rejects),
        not_sampled=int((scores["reject_reason"].isna() & ~scores["sampled"]).sum()),
        kept_per_alpha=summary,
    )
    manifest.set("method", config.select.method)
    manifest.set("alphas", list(config.select.alphas))
    return scores


def write_kept(scores: pd.DataFrame, alphas: list[float], folder: Path) -> dict[str, int]:
    """``alpha-<a>.txt`` (one id per line) and ``alpha-<a>.parquet`` (id, training weight)."""
    folder.mkdir(exist_ok=True)
    for stale in folder.glob("alpha-*"):
        stale.unlink()
    summary = {}
    for alpha in alphas:
        kept = scores.loc[scores[keep_column(alpha)], ["id", weight_column(alpha)]]
        kept = kept.rename(columns={weight_column(alpha): "weight"}).sort_values("id")
        (folder / f"alpha-{alpha:g}.txt").write_text(
            "".join(i + "\n" for i in kept["id"]), encoding="utf-8"
        )
        kept.to_parquet(folder / f"alpha-{alpha:g}.parquet", index=False)
        summary[f"{alpha:g}"] = len(kept)
    return summary


def _load_or_prepare(config: SlapConfig, run_dir: Path, manifest: Manifest) -> pd.DataFrame:
    fingerprint = _fingerprint(config)
    stamp = run_dir / "stages" / "fingerprint.txt"
    prepared_path = run_dir / "stages" / "prepared.parquet"
    if not stamp.exists() or stamp.read_text() != fingerprint:
        for stale in [
            prepared_path,
            run_dir / "stages" / "second_moment.pt",
            *(run_dir / "scored").glob("batch-*.parquet"),
        ]:
            stale.unlink(missing_ok=True)
    stamp.write_text(fingerprint)
    if prepared_path.exists():
        manifest.count("resume", prepared_reused=True)
        return pd.read_parquet(prepared_path)
    prepared = prepare(config, manifest)
    table = pa.Table.from_pandas(prepared, preserve_index=False)
    pq.write_table(table, prepared_path)
    return prepared


def select_into(
    config: SlapConfig, run_dir: Path, extra_selections: list[Selection] | None = None
) -> Path:
    """The selection job in a locked, prepared run directory; returns the path of report.md.

    ``extra_selections`` (a sweep's grid) are made from the same scoring pass as the plain
    ``select.method`` x ``select.alphas`` ones; they land as columns of scores.parquet.
    """
    selections = plain_selections(config) + list(extra_selections or [])
    input_files(config, config.data.paths, "data.paths")  # bad paths fail before Ray starts
    (run_dir / "stages").mkdir(exist_ok=True)
    write_resolved_config(config, run_dir / "config.yaml")
    manifest = Manifest("select")
    warnings = budget_warnings(config)
    for warning in warnings:
        log.warning(warning)
    manifest.set("warnings", warnings)
    try:
        with ray_session(config.ray, run_dir, "select"):
            check_resources(config, "select")
            prepared = _load_or_prepare(config, run_dir, manifest)
            scored = score(config, prepared, run_dir, manifest, selections)
            with manifest.stage("write"):
                scores = write_outputs(config, prepared, scored, run_dir, manifest, selections)
    finally:
        manifest.write(run_dir / "manifest.json")
    # Written last, so its timings include every stage.
    return write_selection_report(scores, config.select.alphas, run_dir, manifest.data)


def run_select(config: SlapConfig) -> Path:
    """Run the whole selection job into ``config.output_dir``; returns the path of report.md."""
    with locked_run_dir(config.output_dir, OWNED, config.resume) as run_dir:
        return select_into(config, run_dir)


def main_select(config: SlapConfig) -> int:
    report = run_select(config)
    counts = json.loads((Path(config.output_dir) / "manifest.json").read_text())["counts"]
    out = counts["output"]
    print(
        f"slap select: {out['rows']} rows read, {out['scored']} scored, {out['rejected']} "
        f"rejected, {out['not_sampled']} not sampled; kept per alpha {out['kept_per_alpha']}; "
        f"report: {report}"
    )
    return 0


__all__ = ["BadRowError", "ConfigError", "main_select", "run_select", "select_into"]
