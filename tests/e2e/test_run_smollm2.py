"""`slap run` with the real SmolLM2-135M-Instruct (offline) on real pool rows: selection, LoRA
fine-tuning on the kept rows with Ray Train, held-out evaluation, generation, report."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from slap_ray.config import build_config
from slap_ray.jobs.run import run_all

pytestmark = pytest.mark.e2e


def test_smollm2_select_finetune_evaluate_report(ray_cluster, pool_subset, shared_data, tmp_path):
    sources = ("gsm8k", "dolly", "ntrex")
    config = build_config(
        {
            "output_dir": str(tmp_path),
            "progress": False,
            "data": {
                "paths": [str(pool_subset / f"{s}.jsonl") for s in sources],
                "max_length": 128,
            },
            "model": {"name": "smollm2-135m-instruct"},
            "embed": {"max_chars": 256},
            "strata": {"num_clusters": 3},
            "select": {"batch_size": 20, "alphas": [0.3], "calibration_batches": 1},
            "score": {"num_scorers": 2, "micro_batch_size": 10},
            "train": {"alpha": 0.3, "batch_size": 8, "num_workers": 2, "learning_rate": 1e-3},
            "eval": {
                "paths": [str(shared_data / "eval" / f"{s}.jsonl") for s in sources],
                "max_rows": 24,
                "generate_rows": 2,
                "max_new_tokens": 16,
            },
        }
    )
    report = run_all(config)

    # The selection stage, in <run>/select.
    selection = tmp_path / "select"
    scores = pd.read_parquet(selection / "scores.parquet")
    assert len(scores) == 60 and scores["id"].is_unique
    assert scores["keep_a0.3"].sum() == 42
    # a real instruction-tuned model: mean response loss well below uniform (ln 49152 = 10.8)
    assert 0.2 < scores["loss"].mean() < 6.0, scores["loss"].describe()
    assert "| 0.3 | 42 |" in (selection / "report.md").read_text()
    select_manifest = json.loads((selection / "manifest.json").read_text())
    assert select_manifest["counts"]["calibrate"]["batches"] == 1
    assert (selection / "stages" / "second_moment.pt").is_file()

    # Fine-tuning on exactly the kept ids, evaluation and compute in the run's report.
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert manifest["counts"]["prepare"]["train_rows"] == 42
    assert {"select", "prepare", "train"} <= set(manifest["timings_s"])
    assert manifest["counts"]["train"]["frozen_weights_unchanged"] is True
    assert metrics["compute"]["backward_examples"] == 42  # offline: every kept row, once
    assert len(metrics["history"]) == 6  # ceil(42 / 8)
    final, base = metrics["final_eval"]["overall"], metrics["base_eval"]["overall"]
    assert np.isfinite(final["loss"]) and 0.2 < base["loss"] < 6.0
    assert metrics["generation"]["rows"] == 2 and 0.0 <= metrics["generation"]["rouge_l"] <= 1.0
    text = report.read_text()
    assert report == tmp_path / "report.md"
    assert "source=gsm8k" in text and "estimated total FLOPs" in text and "select/report.md" in text
    assert (tmp_path / "model" / "adapter_model.safetensors").is_file()
