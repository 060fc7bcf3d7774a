"""Sweep overhead: the same trials run directly (one `slap finetune` each, in one Ray session)
vs through Ray Tune (`slap sweep`), tiny model. Target: direct / Tune wall time >= 0.9.

    python bench/bench_sweep.py [--out bench/results/sweep_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def config_for(out: Path):
    from slap_ray.config import build_config

    return build_config(
        {
            "output_dir": str(out),
            "progress": False,
            "data": {
                "paths": [str(SHARED / "pool" / "*.jsonl")],
                "max_rows": 128,
                "max_length": 96,
            },
            "model": {"name": "tiny-random"},
            "embed": {"max_chars": 256},
            "strata": {"num_clusters": 4},
            "select": {"batch_size": 16, "alphas": [0.3], "calibration_batches": 1},
            "train": {"batch_size": 16, "epochs": 2, "num_workers": 2, "checkpoint_every": 4},
            "eval": {"paths": [str(SHARED / "eval" / "gsm8k.jsonl")], "max_rows": 16},
            "sweep": {
                "arms": [{"method": "slap"}, {"method": "random"}],
                "alphas": [0.3],
                "seeds": [0],
            },  # fmt: skip
            "ray": {"num_cpus": 2},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "sweep_overhead.json"))
    args = parser.parse_args()
    import ray

    from slap_ray.config import config_to_dict
    from slap_ray.jobs.finetune import finetune_into
    from slap_ray.jobs.rundir import make_run_dir
    from slap_ray.jobs.sweep import run_sweep, trial_config, trial_grid
    from slap_ray.ray.runtime import ensure_ray

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = config_for(tmp / "sweep")
        ensure_ray(config.ray)
        run_sweep(config)
        tuned = json.loads((tmp / "sweep" / "manifest.json").read_text())["timings_s"]["trials"]
        tree = config_to_dict(config)
        direct = 0.0
        for spec in trial_grid(config):
            trial = trial_config(tree, spec, tmp / "sweep")
            folder = make_run_dir(tmp / "direct" / spec["arm"])
            trial = trial.model_copy(update={"output_dir": str(folder)})
            start = time.perf_counter()
            finetune_into(trial, folder)
            direct += time.perf_counter() - start
        ray.shutdown()
    result = {
        "trials": len(trial_grid(config)),
        "tune_trials_s": round(tuned, 2),
        "direct_trials_s": round(direct, 2),
        "direct_over_tune": round(direct / tuned, 3),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
