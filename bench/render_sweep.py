"""Re-render a sweep's results.csv, results.md, answer and plots from its finished trials, with
this checkout's reporting code (a study that ran from an older pinned commit gets the current
report without running a trial again).

    python bench/render_sweep.py docs/results/study_variants
"""

from __future__ import annotations

import sys
from pathlib import Path

from slap_ray.config import load_config
from slap_ray.jobs.sweep import finished_rows, trial_grid
from slap_ray.reporting.sweep import write_results


def main(sweep_dir: Path) -> None:
    config = load_config(sweep_dir / "config.yaml")
    specs = trial_grid(config)
    rows = finished_rows(sweep_dir, specs)
    report = write_results(rows, config, sweep_dir, planned=len(specs))
    print(f"{len(rows)} of {len(specs)} trials -> {report}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
