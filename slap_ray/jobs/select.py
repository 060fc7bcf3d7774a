"""`slap select`: offline SLAP over an instruction pool (SLAP_METHOD.md section 3).

Stages: prepare (jobs.prepare: read -> tokenise -> strata -> compose, all Ray Data) ->
calibrate the second moment -> score on scorer actors -> write outputs. The driver holds
aggregates and object refs only; workers write every per-row table. Finished stages persist in
the run directory (``stages/``, ``scored/``) so ``--resume`` continues a killed run. Every
table is keyed by the row's origin (path, line): one output row per input row, whatever its id.

The run directory must be one every node can write (one machine, or a shared filesystem).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
from ray.data import Dataset

from slap_ray.config import ConfigError, SlapConfig, write_resolved_config
from slap_ray.core.scoring import Selection
from slap_ray.core.selection import n_keep_for
from slap_ray.data.ingest import make_reject, write_rejected
from slap_ray.errors import BadRowError
from slap_ray.jobs.prepare import ROW_FIELDS, load_or_prepare
from slap_ray.jobs.rows import ORIGIN, input_files, raw_text
from slap_ray.jobs.rundir import locked_run_dir
from slap_ray.jobs.scoring import plain_selections, score, scored_files
from slap_ray.names import (
    ALPHA_PREFIX,
    KEEP_PREFIX,
    MANIFEST,
    PLOTS_DIR,
    REPORT,
    RESOLVED_CONFIG,
    RUN_RECORDS,
    WEIGHT_PREFIX,
    keep_column,
    kept_list,
    kept_table,
    selected_rows,
    weight_column,
)
from slap_ray.ray import pool
from slap_ray.ray.runtime import check_resources, ray_session
from slap_ray.reporting.manifest import Manifest
from slap_ray.reporting.selection import SelectionSummary, scoring_cost, write_selection_report

log = logging.getLogger("slap_ray.select")
# What a fresh run clears in its output_dir (a resumed run keeps stages/ and scored/).
OWNED = (
    "scores.parquet", "kept", "selected", "rejected.jsonl", REPORT, PLOTS_DIR, "stages",
    "scored", *RUN_RECORDS,
)  # fmt: skip
META = [
    *ROW_FIELDS,
    ("sampled", pa.bool_()),
    ("cluster", pa.int64()),
    ("batch_id", pa.int64()),
    ("num_tokens", pa.int64()),
    ("loss", pa.float64()),
    ("loss_stratum", pa.int64()),
]
HISTOGRAM_BINS = 40
# A message as trainers read it; tool calls and tool definitions are JSON text (their shape is
# free-form), which `slap export` turns back into JSON for JSONL.
MESSAGE = pa.struct(
    [("role", pa.string()), ("content", pa.string()), ("tool_calls", pa.string()),
     ("tool_call_id", pa.string()), ("name", pa.string())]
)  # fmt: skip
SELECTED_SCHEMA = pa.schema(
    [("id", pa.string()), ("source", pa.string()), ("task", pa.string()),
     ("messages", pa.list_(MESSAGE)), ("tools", pa.string())]
)  # fmt: skip


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


def scores_schema(keys: list[str]) -> pa.Schema:
    """scores.parquet: one row per input row; a keep and a weight column per selection."""
    fields = list(META)
    for key in keys:
        fields += [(keep_column(key), pa.bool_()), (weight_column(key), pa.float64())]
    return pa.schema(fields)


def _as_scores(frame: pd.DataFrame, schema: pa.Schema, scored: bool) -> pa.Table:
    frame = frame.copy()
    if scored:
        frame["reject_reason"], frame["sampled"] = None, True
    defaults = {"cluster": -1, "batch_id": -1, "num_tokens": 0, "loss": np.nan, "loss_stratum": -1}
    for name in schema.names:
        if name not in frame:
            frame[name] = (
                False if name.startswith(KEEP_PREFIX) else 0.0 if name.startswith(WEIGHT_PREFIX)
                else defaults.get(name)
            )  # fmt: skip
    for name in ("source", "task", "reject_reason"):
        frame[name] = frame[name].astype(object).where(frame[name].notna(), None)
    return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)


def _stored(message: dict) -> dict:
    """A normalised message in ``MESSAGE``'s shape (tool calls as JSON text)."""
    calls = message.get("tool_calls")
    return {
        **message,
        "tool_calls": None if calls is None else json.dumps(calls, ensure_ascii=False),
    }


def _normalised(frame: pd.DataFrame, keep: str) -> pa.Table:
    """Kept rows in the normalised schema (id, source, task, messages as role/content lists)."""
    frame = frame[frame[keep].astype(bool)]
    columns = {
        c: frame[c].astype(object).where(frame[c].notna(), None) for c in ("id", "source", "task")
    }
    columns["messages"] = [[_stored(m) for m in json.loads(text)] for text in frame["messages"]]
    tools = frame["tools"] if "tools" in frame else pd.Series([""] * len(frame))
    columns["tools"] = [t if isinstance(t, str) and t else None for t in tools]
    return pa.Table.from_pydict({k: list(v) for k, v in columns.items()}, schema=SELECTED_SCHEMA)


def _write_rejected(frames: Iterable[pd.DataFrame], fmt: str, path: str) -> int:
    parts = list(frames)
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if len(frame):
        frame = frame.sort_values(ORIGIN, kind="stable")
        texts = raw_text(frame, fmt)
        rows = zip(frame["path"], frame["line"], frame["reject_reason"], texts, strict=True)
        records = [make_reject(p, int(ln), r, raw) for p, ln, r, raw in rows]
    else:
        records = []
    write_rejected(records, Path(path))
    return len(records)


def _loss_histogram(scored: Dataset, alpha: float) -> tuple[np.ndarray, ...]:
    low, high = scored.min("loss"), scored.max("loss")
    edges = np.linspace(low, high if high > low else low + 1.0, HISTOGRAM_BINS + 1)
    keep = keep_column(alpha)

    def histogram(batch: pd.DataFrame) -> pd.DataFrame:
        kept = batch[keep].to_numpy(bool)
        loss = batch["loss"].to_numpy(np.float64)
        return pd.DataFrame(
            {
                "bin": np.arange(HISTOGRAM_BINS),
                "kept": np.histogram(loss[kept], edges)[0],
                "pruned": np.histogram(loss[~kept], edges)[0],
            }
        )

    parts = scored.select_columns(["loss", keep]).map_batches(
        histogram, batch_size=None, batch_format="pandas"
    )
    total = pool.accumulate(parts, ["bin"]).sort_values("bin")
    return edges, total["kept"].to_numpy(), total["pruned"].to_numpy()


def write_outputs(
    config: SlapConfig, run_dir: Path, manifest: Manifest, selections: list[Selection]
) -> SelectionSummary:
    """Workers write scores.parquet/ (every input row), selected/alpha-<a>/ (kept rows,
    normalised); one task each writes kept/alpha-<a>.txt|.parquet and rejected.jsonl."""
    alphas = config.select.alphas
    schema = scores_schema([s.key for s in selections])
    # Read once into the object store: every output below is one more pass over them.
    scored_paths = [str(path) for path in scored_files(run_dir / "scored")]
    scored = ray.data.read_parquet(scored_paths).materialize()
    unscored = ray.data.read_parquet(str(run_dir / "stages" / "unscored")).materialize()
    target = run_dir / "scores.parquet"
    shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(True)
    scored.map_batches(
        partial(_as_scores, schema=schema, scored=True), batch_format="pandas"
    ).union(
        unscored.map_batches(
            partial(_as_scores, schema=schema, scored=False), batch_format="pandas"
        )
    ).write_parquet(str(target))
    keeps = [c for a in alphas for c in (keep_column(a), weight_column(a))]
    kept = pool.on_cluster(
        write_kept, scored.select_columns(["id", *keeps]), alphas, run_dir / "kept"
    )
    shutil.rmtree(run_dir / "selected", ignore_errors=True)
    for alpha in alphas:
        folder = str(selected_rows(run_dir, alpha))
        normalised = partial(_normalised, keep=keep_column(alpha))
        pool.write_table(scored, folder, normalised, SELECTED_SCHEMA)
    rejects = pool.rejected(unscored)
    rejected = pool.on_cluster(
        _write_rejected, rejects, config.data.format, str(run_dir / "rejected.jsonl")
    )
    groups = pool.counts_by(
        scored.select_columns(["cluster", "source", "task", *map(keep_column, alphas)]),
        ["cluster", "source", "task"],
        tuple(map(keep_column, alphas)),
    )
    edges, loss_kept, loss_pruned = _loss_histogram(scored, alphas[len(alphas) // 2])
    read = manifest.data["counts"]["read"]
    manifest.count(
        "output",
        rows=read["rows"],
        scored=int(groups["rows"].sum()),
        rejected=rejected,
        not_sampled=read["not_sampled"],
        kept_per_alpha=kept,
    )
    manifest.set("method", config.select.method)
    manifest.set("scoring_model", config.scoring_model)
    cost = scoring_cost(config.scoring_model, config.model.name, config.select.alphas)
    manifest.set("scoring_cost", cost)
    manifest.set("alphas", list(alphas))
    return SelectionSummary(groups, edges, loss_kept, loss_pruned)


def write_kept(frames: Iterable[pd.DataFrame], alphas: list[float], folder: Path) -> dict[str, int]:
    """``alpha-<a>.txt`` (one id per line) and ``alpha-<a>.parquet`` (id, training weight)
    from blocks with ``id`` and the keep/weight columns; holds only the kept ids."""
    kept_parts: dict[float, list[pd.DataFrame]] = {alpha: [] for alpha in alphas}
    for frame in frames:
        for alpha in alphas:
            part = frame.loc[frame[keep_column(alpha)].astype(bool), ["id", weight_column(alpha)]]
            kept_parts[alpha].append(part.rename(columns={weight_column(alpha): "weight"}))
    folder.mkdir(exist_ok=True)
    for stale in folder.glob(f"{ALPHA_PREFIX}*"):
        stale.unlink()
    summary = {}
    for alpha, parts in kept_parts.items():
        empty = pd.DataFrame({"id": pd.Series(dtype=object), "weight": pd.Series(dtype=float)})
        kept = pd.concat([empty, *parts], ignore_index=True).sort_values("id")
        kept_list(folder, alpha).write_text("".join(i + "\n" for i in kept["id"]), encoding="utf-8")
        kept.to_parquet(kept_table(folder, alpha), index=False)
        summary[f"{alpha:g}"] = len(kept)
    return summary


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
    write_resolved_config(config, run_dir / RESOLVED_CONFIG)
    manifest = Manifest("select")
    warnings = budget_warnings(config)
    for warning in warnings:
        log.warning(warning)
    manifest.set("warnings", warnings)
    try:
        with ray_session(config.ray, run_dir, "select"):
            check_resources(config, "select")
            num_batches = load_or_prepare(config, run_dir, manifest)
            score(config, run_dir, num_batches, manifest, selections)
            with manifest.stage("write"):
                summary = write_outputs(config, run_dir, manifest, selections)
    finally:
        manifest.write(run_dir / MANIFEST)
    # Written last, so its timings include every stage.
    return write_selection_report(summary, config.select.alphas, run_dir, manifest.data)


def run_select(config: SlapConfig) -> Path:
    """Run the whole selection job into ``config.output_dir``; returns the path of report.md."""
    with locked_run_dir(config.output_dir, OWNED, config.resume) as run_dir:
        return select_into(config, run_dir)


def main_select(config: SlapConfig) -> int:
    report = run_select(config)
    counts = json.loads((Path(config.output_dir) / MANIFEST).read_text())["counts"]
    out = counts["output"]
    print(
        f"slap select: {out['rows']} rows read, {out['scored']} scored, {out['rejected']} "
        f"rejected, {out['not_sampled']} not sampled; kept per alpha {out['kept_per_alpha']}; "
        f"report: {report}"
    )
    return 0


__all__ = ["BadRowError", "ConfigError", "main_select", "run_select", "select_into"]
