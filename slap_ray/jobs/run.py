"""`slap run`: select -> fine-tune -> evaluate -> report, in one run directory.

Offline mode runs `slap select` into ``<output_dir>/select`` and fine-tunes on its kept ids at
``train.alpha``; online mode skips the offline pass (selection happens in the training loop).
"""

from __future__ import annotations

import time
from pathlib import Path

from slap_ray.config import ConfigError, SlapConfig, build_config, config_to_dict

SELECT_DIR = "select"


def run_all(config: SlapConfig) -> Path:
    from slap_ray.jobs.finetune import run_finetune
    from slap_ray.jobs.select import run_select

    run_dir = Path(config.output_dir)
    tree = config_to_dict(config)
    selection_report, timings = None, {}
    if config.select.mode == "offline":
        if config.train.alpha > 0 and config.train.alpha not in config.select.alphas:
            raise ConfigError(
                f"train.alpha: {config.train.alpha:g} is not in select.alphas "
                f"{config.select.alphas}; the selection would not produce it"
            )
        select_config = build_config(tree, [f"output_dir={run_dir / SELECT_DIR}"])
        start = time.perf_counter()
        selection_report = run_select(select_config)
        timings["select"] = round(time.perf_counter() - start, 3)
        tree["train"]["selection_dir"] = str(run_dir / SELECT_DIR)
    return run_finetune(build_config(tree), selection_report, timings)


def main_run(config: SlapConfig) -> int:
    report = run_all(config)
    print(f"slap run: done; report: {report}")
    return 0
