"""A small selection run with the real SmolLM2-135M-Instruct (offline) on the real pool."""

from __future__ import annotations

import json

import pandas as pd

from slap_ray.config import build_config
from slap_ray.select_job import run_select


def test_smollm2_selection_on_real_rows(ray_cluster, pool_subset, tmp_path):
    config = build_config(
        {
            "output_dir": str(tmp_path),
            "progress": False,
            "data": {
                "paths": [
                    str(pool_subset / f) for f in ("gsm8k.jsonl", "dolly.jsonl", "ntrex.jsonl")
                ],
                "max_length": 128,
            },
            "model": {"name": "smollm2-135m-instruct"},
            "embed": {"max_chars": 256},
            "strata": {"num_clusters": 3},
            "select": {"batch_size": 20, "alphas": [0.3], "calibration_batches": 1},
            "score": {"num_scorers": 2, "micro_batch_size": 10},
        }
    )
    report = run_select(config)
    scores = pd.read_parquet(tmp_path / "scores.parquet")
    assert len(scores) == 60 and scores["id"].is_unique
    assert scores["keep_a0.3"].sum() == 42
    # a real instruction-tuned model: mean response loss well below uniform (ln 49152 = 10.8)
    assert 0.2 < scores["loss"].mean() < 6.0, scores["loss"].describe()
    assert report.is_file() and "| 0.3 | 42 |" in report.read_text()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"]["calibrate"]["batches"] == 1
    assert (tmp_path / "stages" / "second_moment.pt").is_file()
