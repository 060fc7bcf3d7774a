"""`slap finetune`: Ray Train fine-tuning on a selection (offline) or with on-policy SLAP.

Driver side: read and tokenise the training rows (joined to the selection by id) and the eval
rows, run the ``TorchTrainer``, then write the final model, ``metrics.json``, ``manifest.json``
and ``report.md`` into the run directory. ``--resume`` keeps Ray Train's storage, so the trainer
restarts from its latest checkpoint instead of step 0.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import ray
import yaml

from slap_ray.config import ConfigError, SlapConfig, write_resolved_config
from slap_ray.core.seeds import id_rank_key
from slap_ray.core.training import MODEL_DIR, STATE_FILE, flops_estimate, total_steps
from slap_ray.files import write_text_atomic
from slap_ray.jobs.rows import input_files, marked_rows, read_rows
from slap_ray.jobs.rundir import locked_run_dir
from slap_ray.jobs.storage import storage_for
from slap_ray.names import (
    MANIFEST,
    METRICS,
    PLOTS_DIR,
    REPORT,
    RESOLVED_CONFIG,
    RUN_RECORDS,
    TRAIN_IDS,
    alpha_name,
    kept_list,
    kept_table,
)
from slap_ray.ray import pool, stages
from slap_ray.ray.runtime import check_resources, ray_session
from slap_ray.reporting.manifest import Manifest
from slap_ray.reporting.training import write_train_report

TABLE_COLUMNS = ("id", "source", "task", "input_ids", "labels", "num_tokens")
RAY_TRAIN_DIR = "ray_train"
RUN_NAME = "finetune"
# What a fresh run clears in its output_dir (a resumed run keeps Ray Train's checkpoints).
OWNED = (
    METRICS, REPORT, MODEL_DIR, PLOTS_DIR, *RUN_RECORDS,
    TRAIN_IDS,
    RAY_TRAIN_DIR,
)  # fmt: skip


def selection_alphas(folder: Path) -> list[float]:
    """The alphas a finished `slap select` run produced (its manifest, else its config)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise ConfigError(
            f"train.selection_dir: {folder} has no manifest.json; it is not a finished "
            "`slap select` run"
        )
    alphas = json.loads(manifest.read_text(encoding="utf-8")).get("alphas")
    if alphas is None:
        alphas = yaml.safe_load((folder / RESOLVED_CONFIG).read_text())["select"]["alphas"]
    return [float(a) for a in alphas]


def read_kept(folder: Path, alpha: float) -> dict[str, float]:
    """Kept id -> training weight at ``alpha`` (the Parquet companion; the .txt read by lines)."""
    table = kept_table(folder / "kept", alpha)
    if table.is_file():
        kept = pd.read_parquet(table)
        return dict(zip(kept["id"], kept["weight"].astype(float), strict=True))
    lines = kept_list(folder / "kept", alpha).read_text(encoding="utf-8").splitlines()
    return dict.fromkeys(lines, 1.0)


def selected_ids(config: SlapConfig, sampled: list[str]) -> tuple[dict[str, float], str]:
    """Training id -> weight, and where they came from (offline: the selection's kept ids)."""
    alpha, folder = config.train.alpha, config.train.selection_dir
    if config.select.mode == "online":
        return dict.fromkeys(sampled, 1.0), "all sampled rows (selection happens on-policy)"
    if folder is None:
        if alpha == 0:
            return dict.fromkeys(sampled, 1.0), "all sampled rows (alpha = 0, no selection)"
        raise ConfigError(
            "train.selection_dir: offline fine-tuning at alpha > 0 needs a `slap select` run "
            "directory (or use `slap run`, or select.mode=online)"
        )
    folder = Path(folder)
    alphas = selection_alphas(folder)
    if alpha == 0:
        scores = pd.read_parquet(folder / "scores.parquet", columns=["id", "loss"])
        ids = sorted(scores.loc[scores["loss"].notna(), "id"])
        return dict.fromkeys(ids, 1.0), f"{folder}: all scored rows"
    if alpha not in alphas:
        raise ConfigError(
            f"train.alpha: {alpha:g} is not one of the selection's alphas "
            f"{[f'{a:g}' for a in alphas]} ({folder / 'manifest.json'})"
        )
    return read_kept(folder, alpha), f"{folder / 'kept' / alpha_name(alpha)}"


def _tokenized_table(config: SlapConfig, rows: ray.data.Dataset) -> tuple[dict, int]:
    """Tokenise with the training model's tokenizer; returns columns sorted by id, rejects."""
    tokenized = stages.tokenize_stage(
        rows, config.model.name, config.data.max_length, config.data.truncation,
        config.data.num_tokenizers,
    ).materialize()  # fmt: skip
    frame = tokenized.drop_columns(["messages", "raw"]).to_pandas()
    rejected = int(frame["reject_reason"].notna().sum())
    frame = frame[frame["reject_reason"].isna()].sort_values("id", kind="stable")
    table = {c: frame[c].tolist() for c in TABLE_COLUMNS}
    table["input_ids"] = [list(map(int, x)) for x in table["input_ids"]]
    table["labels"] = [list(map(int, x)) for x in table["labels"]]
    table["source"] = [x if isinstance(x, str) else "unknown" for x in table["source"]]
    table["task"] = [x if isinstance(x, str) else "unknown" for x in table["task"]]
    return table, rejected


def _eval_sample(config: SlapConfig, meta: pd.DataFrame) -> set[str]:
    """The held-out ids evaluated: a seeded order of every id (the same on any cluster), at
    most ``max_rows_per_source`` of each source, then at most ``max_rows``."""
    meta = meta.drop_duplicates("id").copy()
    meta["rank"] = [(id_rank_key(config.seed, "eval-rows", i), i) for i in meta["id"]]
    meta = meta.sort_values("rank")
    per_source = config.eval.max_rows_per_source
    if per_source is not None:
        meta = meta.groupby(meta["source"].fillna("unknown"), sort=False).head(per_source)
    return set(meta["id"].iloc[: config.eval.max_rows])


def prepare_tables(config: SlapConfig, manifest: Manifest) -> tuple[dict, dict]:
    """Training rows (the selection's kept ids, or all sampled rows) and eval rows, tokenised."""
    with manifest.stage("prepare"):
        rows = pool.sampled(marked_rows(config, manifest, "train_read"))
        sampled = sorted(rows.select_columns(["id"]).to_pandas()["id"])  # unique once sampled
        weights, origin = selected_ids(config, sampled)
        wanted = set(weights)
        train, train_rejected = _tokenized_table(config, pool.where_in(rows, "id", wanted))
        if any(weights[i] != 1.0 for i in train["id"]):
            train["weight"] = [weights[i] for i in train["id"]]  # offline InfoBatch
        missing = len(wanted - set(train["id"])) - train_rejected
        evaluation = prepare_eval(config, manifest, exclude=wanted)
    if not train["id"]:
        raise ConfigError(f"no training rows: {origin} selects none of data.paths")
    manifest.count(
        "prepare",
        train_origin=origin,
        train_ids_requested=len(wanted),
        train_rows=len(train["id"]),
        train_rows_rejected=train_rejected,
        train_ids_not_found=max(missing, 0),
    )
    return train, evaluation


def prepare_eval(config: SlapConfig, manifest: Manifest, exclude: set[str]) -> dict:
    """The held-out rows evaluated, tokenised: ``eval.paths`` less the ``exclude`` ids (rows
    trained on), sampled per ``eval.max_rows_per_source`` and ``eval.max_rows``."""
    evals = read_rows(config, config.eval.paths, "eval.paths", manifest, "eval_read")
    evals = pool.where_in(pool.accepted(evals), "id", exclude, inside=False)
    chosen = _eval_sample(config, evals.select_columns(["id", "source"]).to_pandas())
    evaluation, rejected = _tokenized_table(config, pool.where_in(evals, "id", chosen))
    if not evaluation["id"]:
        raise ConfigError(f"eval.paths {config.eval.paths}: no usable eval rows")
    manifest.count("prepare", eval_rows=len(evaluation["id"]), eval_rows_rejected=rejected)
    _check_generation_sources(config, evaluation["source"])
    return evaluation


def _finish(
    config: SlapConfig,
    result,
    run_dir: Path,
    manifest: Manifest,
    eval_ids: list[str],
    eval_sources: list[str],
) -> dict:
    """Copy the final model out of Ray Train's storage and gather the loop's records."""
    import torch

    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, weights_only=False)
        target = run_dir / MODEL_DIR
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(Path(folder) / MODEL_DIR, target)
    from slap_ray.assets import load_tokenizer

    load_tokenizer(config.model.name).save_pretrained(target)
    compute = _compute(state, lora=config.train.finetuning == "lora")
    params, steps = compute["parameters"], compute["steps"]
    manifest.set("compute", compute)
    manifest.count(
        "train",
        steps=steps,
        resumed_from_step=state["resumed_from_step"],
        frozen_parameters=params["total"] - params["trainable"],
        frozen_weights_unchanged=state["frozen_weights_unchanged"],
        trainable_weights_changed=state["trainable_digest_end"] != state["trainable_digest_start"],
        checkpoint=str(result.checkpoint.path),
    )
    manifest.data["timings_s"]["eval_base"] = state["base_eval"]["overall"]["seconds"]
    manifest.data["timings_s"]["eval_final"] = state["final_eval"]["overall"]["seconds"]
    metrics = {
        "base_eval": state["base_eval"],
        "final_eval": state["final_eval"],
        "generation": state["generation"],
        "compute": compute,
        "history": state["history"],
        "eval_ids": list(eval_ids),
        # Per held-out row (eval_ids' order): response-loss sums and tokens before and after.
        "eval_rows": {
            "source": list(eval_sources),
            "tokens": state["final_eval_rows"]["tokens"],
            "base_loss_sum": (state.get("base_eval_rows") or {}).get("loss_sum"),
            "final_loss_sum": state["final_eval_rows"]["loss_sum"],
        },
    }
    write_text_atomic(run_dir / METRICS, json.dumps(metrics, indent=2))
    return metrics


def _compute(state: dict, lora: bool) -> dict:
    """What the run computed (the loop's counters, from its final checkpoint state): rows and
    tokens forwarded and back-propagated, parameters, steps, the FLOPs estimate."""
    counters, params = state["counters"], state["parameters"]
    steps = len(state["history"])
    return {
        **counters,
        "parameters": params,
        "flops_estimate": flops_estimate(
            params, counters["forward_tokens"], counters["backward_tokens"], lora
        ),
        "steps": steps,
        # step_seconds travels in the checkpoint, so it covers every step, resumed or not.
        "mean_step_seconds": {
            k: round(v / max(steps, 1), 4) for k, v in state["step_seconds"].items()
        },
    }


def _base_eval_path(config: SlapConfig, evaluation: dict, folder: Path) -> Path:
    """Where the untrained model's evaluation of these held-out rows is kept: named by what it
    depends on (model, dtype, tokenisation, the rows, how they are split and batched)."""
    key = {
        "model": config.model.name, "dtype": config.model.dtype,
        "max_length": config.data.max_length, "truncation": config.data.truncation,
        "ids": list(evaluation["id"]), "micro_batch": config.eval.micro_batch_size,
        "workers": config.train.num_workers,
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return folder / f"base-eval-{digest}.json"


def _cached_base_eval(path: Path | None) -> tuple[dict, dict] | None:
    if path is None or not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    return saved["summary"], saved["rows"]


def _keep_base_eval(path: Path | None, metrics: dict) -> None:
    rows = metrics["eval_rows"]
    if path is None or path.is_file() or rows.get("base_loss_sum") is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = {"summary": metrics["base_eval"], "rows": {"loss_sum": rows["base_loss_sum"],
             "tokens": rows["tokens"]}}  # fmt: skip
    write_text_atomic(path, json.dumps(saved))


def finetune_into(
    config: SlapConfig,
    run_dir: Path,
    selection_report: Path | None = None,
    prior_timings: dict[str, float] | None = None,
    base_eval_dir: Path | None = None,
) -> Path:
    """Fine-tune into a locked, prepared run directory; returns the path of report.md.

    ``slap run`` passes the selection's report and wall time, so one manifest covers the run.
    ``base_eval_dir`` (a sweep's): where the untrained model's evaluation is kept, so that
    only the first trial on the same model and held-out rows computes it.
    """
    input_files(config, config.data.paths, "data.paths")  # bad paths fail before Ray starts
    input_files(config, config.eval.paths, "eval.paths")
    write_resolved_config(config, run_dir / RESOLVED_CONFIG)
    manifest = Manifest("run" if selection_report or prior_timings else "finetune")
    manifest.data["timings_s"].update(prior_timings or {})
    storage = storage_for(config, run_dir, RAY_TRAIN_DIR)
    try:
        with ray_session(config.ray, run_dir, "finetune"):
            check_resources(config, "finetune")
            train, evaluation = prepare_tables(config, manifest)
            t = config.train
            steps = total_steps(len(train["id"]), t.batch_size, t.epochs, t.max_steps)
            manifest.count("train", planned_steps=steps, mode=config.select.mode)
            from slap_ray.ray.train_loop import make_trainer

            cache = _base_eval_path(config, evaluation, base_eval_dir) if base_eval_dir else None
            base_eval = _cached_base_eval(cache)
            manifest.count("prepare", base_eval_reused=base_eval is not None)
            trainer = make_trainer(
                config, train, evaluation, steps, storage, RUN_NAME, base_eval=base_eval
            )
            with manifest.stage("train"):
                result = trainer.fit()
            metrics = _finish(
                config, result, run_dir, manifest, evaluation["id"], evaluation["source"]
            )
            _keep_base_eval(cache, metrics)
            # Exactly the ids trained on (a sweep's trials are checked against their kept list).
            (run_dir / TRAIN_IDS).write_text(
                "".join(i + "\n" for i in train["id"]), encoding="utf-8"
            )
    finally:
        manifest.write(run_dir / MANIFEST)
    return write_train_report(config, metrics, run_dir, manifest.data, selection_report)


def _check_generation_sources(config: SlapConfig, sources: list[str]) -> None:
    """Every source the generation check names has held-out rows (a typo fails before training)."""
    missing = sorted(set(config.eval.generate_metrics) - set(sources))
    if missing:
        raise ConfigError(
            f"eval.generate_metrics: no held-out rows of source(s) {', '.join(missing)} "
            f"(the eval set's sources: {', '.join(sorted(set(sources)))})"
        )


def run_finetune(config: SlapConfig) -> Path:
    """`slap finetune` into ``config.output_dir``; returns the path of report.md."""
    with locked_run_dir(config.output_dir, OWNED, config.resume) as run_dir:
        return finetune_into(config, run_dir)


def main_finetune(config: SlapConfig) -> int:
    report = run_finetune(config)
    metrics = json.loads((Path(config.output_dir) / METRICS).read_text())
    base, final = metrics["base_eval"]["overall"], metrics["final_eval"]["overall"]
    print(
        f"slap finetune: done; eval loss {base['loss']:.4f} -> {final['loss']:.4f}; "
        f"report: {report}"
    )
    return 0
