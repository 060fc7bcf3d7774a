"""`slap evaluate`: score a saved model (a fine-tuning run's ``model/``) on held-out rows without
training again: response-token loss per row, source and task, and the generation check.

Start from the run's own ``config.yaml`` (its model, tokenisation and seed) and change only
what is evaluated, e.g. ``eval.max_rows_per_source=80``. Writes ``metrics.json`` in the keys a
fine-tuning run's has (``final_eval``, ``eval_ids``, ``eval_rows``, ``generation``), so a sweep's
trials re-scored this way are read like trained ones, and ``manifest.json``, ``config.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path

from slap_ray.config import ConfigError, SlapConfig, write_resolved_config
from slap_ray.files import write_text_atomic
from slap_ray.jobs.finetune import prepare_eval
from slap_ray.jobs.rows import input_files
from slap_ray.jobs.rundir import locked_run_dir
from slap_ray.names import MANIFEST, METRICS, RESOLVED_CONFIG, RUN_RECORDS, TRAIN_IDS
from slap_ray.ray.runtime import ray_session
from slap_ray.reporting.manifest import Manifest

OWNED = (METRICS, *RUN_RECORDS)


def saved_model_dir(config: SlapConfig) -> Path:
    """``eval.model_dir``, checked: a folder holding a saved adapter or model."""
    setting = config.eval.model_dir
    if not setting:
        raise ConfigError("eval.model_dir: `slap evaluate` needs the saved model folder to score")
    folder = Path(setting)
    if not folder.is_dir():
        raise ConfigError(f"eval.model_dir: folder {folder} does not exist")
    if not (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise ConfigError(
            f"eval.model_dir: {folder} holds no saved model (no adapter_config.json or "
            "config.json); give a fine-tuning run's model/ folder"
        )
    return folder


def trained_ids(model_dir: Path) -> set[str]:
    """The ids the saved model was trained on (its run's ``train_ids.txt``), never evaluated."""
    listed = model_dir.parent / TRAIN_IDS
    return set(listed.read_text(encoding="utf-8").split()) if listed.is_file() else set()


def run_evaluate(config: SlapConfig) -> Path:
    """`slap evaluate` into ``config.output_dir``; returns the path of metrics.json."""
    model_dir = saved_model_dir(config)
    input_files(config, config.eval.paths, "eval.paths")  # bad paths fail before Ray starts
    with locked_run_dir(config.output_dir, OWNED, config.resume) as run_dir:
        write_resolved_config(config, run_dir / RESOLVED_CONFIG)
        manifest = Manifest("evaluate")
        manifest.set("model_dir", str(model_dir.resolve()))
        try:
            with ray_session(config.ray, run_dir, "evaluate"):
                from slap_ray.ray.evaluate import evaluate_saved

                with manifest.stage("prepare"):
                    evaluation = prepare_eval(config, manifest, exclude=trained_ids(model_dir))
                with manifest.stage("evaluate"):
                    scored = evaluate_saved(config, model_dir, evaluation)
        finally:
            manifest.write(run_dir / MANIFEST)
        metrics = {
            "model_dir": str(model_dir.resolve()),
            "final_eval": scored["eval"],
            "generation": scored["generation"],
            "eval_ids": list(evaluation["id"]),
            "eval_rows": {
                "source": list(evaluation["source"]),
                "tokens": scored["eval_rows"]["tokens"],
                "final_loss_sum": scored["eval_rows"]["loss_sum"],
            },
        }
        return write_text_atomic(run_dir / METRICS, json.dumps(metrics, indent=2))


def main_evaluate(config: SlapConfig) -> int:
    path = run_evaluate(config)
    metrics = json.loads(path.read_text(encoding="utf-8"))
    overall = metrics["final_eval"]["overall"]
    per_source = ", ".join(
        f"{key.split('=', 1)[1]} {value['loss']:.4f}"
        for key, value in sorted(metrics["final_eval"].items())
        if key.startswith("source=")
    )
    print(
        f"slap evaluate: eval loss {overall['loss']:.4f} over {len(metrics['eval_ids'])} rows"
        + (f" ({per_source})" if per_source else "")
        + f"; metrics: {path}"
    )
    return 0
