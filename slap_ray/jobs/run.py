"""`slap run`: select -> fine-tune -> evaluate -> report, in one run directory.

Offline mode runs `slap select` into ``<output_dir>/select`` and fine-tunes on its kept ids at
``train.alpha``; online mode skips the offline pass (selection happens in the training loop).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from slap_ray.config import ConfigError, SlapConfig, build_config, config_to_dict
from slap_ray.jobs.rundir import locked_run_dir
from slap_ray.names import METRICS

SELECT_DIR = "select"


def run_all(config: SlapConfig) -> Path:
    from slap_ray.jobs.finetune import OWNED, finetune_into
    from slap_ray.jobs.select import select_into
    from slap_ray.ray.runtime import ray_started

    tree = config_to_dict(config)
    selection_report, timings = None, {}
    if config.select.mode == "offline" and config.train.alpha > 0:
        if config.train.alpha not in config.select.alphas:
            raise ConfigError(
                f"train.alpha: {config.train.alpha:g} is not in select.alphas "
                f"{config.select.alphas}; the selection would not produce it"
            )
    with (
        locked_run_dir(config.output_dir, (*OWNED, SELECT_DIR), config.resume) as run_dir,
        ray_started(config.ray),  # one Ray start serves both jobs
    ):
        if config.select.mode == "offline":
            select_dir = run_dir / SELECT_DIR
            select_dir.mkdir(exist_ok=True)
            start = time.perf_counter()
            select_config = build_config(tree, [f"output_dir={select_dir}"])
            selection_report = select_into(select_config, select_dir)
            timings["select"] = round(time.perf_counter() - start, 3)
            tree["train"]["selection_dir"] = str(select_dir)
        return finetune_into(build_config(tree), run_dir, selection_report, timings)


def main_run(config: SlapConfig) -> int:
    report = run_all(config)
    metrics = json.loads((Path(config.output_dir) / METRICS).read_text())
    base, final = metrics["base_eval"]["overall"], metrics["final_eval"]["overall"]
    compute = metrics["compute"]
    print(
        f"slap run: {compute['steps']} steps, {compute['backward_examples']} of "
        f"{compute['forward_examples']} examples back-propagated; eval loss "
        f"{base['loss']:.4f} -> {final['loss']:.4f}; report: {report}"
    )
    return 0
