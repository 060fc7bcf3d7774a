"""`slap run` as a newcomer runs it, with the real SmolLM2-135M-Instruct (offline) on real pool
rows: the CLI in its own process, selection, LoRA fine-tuning on the kept rows with Ray Train,
held-out evaluation, generation, report; a clean console with the detail in the run's logs, and
one Ray start for both jobs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
# Console lines that are detail, never a newcomer's business: each must go to the log files.
NOISE = (
    "Traceback", "RpcError", " INFO ", "FutureWarning", "Loading weights", "Checkpoint",
    "Token authentication",
)  # fmt: skip


@pytest.fixture(scope="module")
def smollm2_run(
    pool_subset, shared_data, tmp_path_factory
) -> Iterator[tuple[Path, Path, list, list]]:
    """``slap run --config run.yaml`` in a subprocess; yields (run dir, Ray's temp dir, its
    stdout lines, its stderr lines)."""
    sources = ("gsm8k", "dolly")  # 40 rows: two 20-row batches
    out = tmp_path_factory.mktemp("smollm2") / "run"
    config = {
        "output_dir": str(out),
        "data": {"paths": [str(pool_subset / f"{s}.jsonl") for s in sources], "max_length": 128},
        "model": {"name": "smollm2-135m-instruct"},
        "embed": {"max_chars": 256},
        "strata": {"num_clusters": 3},
        "select": {"batch_size": 20, "alphas": [0.3], "calibration_batches": 1},
        "score": {"num_scorers": 2, "micro_batch_size": 10},
        "train": {"alpha": 0.3, "batch_size": 8, "num_workers": 2, "learning_rate": 1e-3},
        "eval": {
            "paths": [str(shared_data / "eval" / f"{s}.jsonl") for s in sources],
            "max_rows": 12,
            "generate_rows": 1,  # per source named below
            "generate_metrics": {"gsm8k": "exact_match", "dolly": "chrf"},
            "max_new_tokens": 16,
        },
        "ray": {"num_cpus": 2, "object_store_memory": 200_000_000},
    }
    path = out.parent / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    # A short folder: Ray's socket paths must fit in 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "slap_ray.cli", "run", "--config", str(path)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=900, env=env, cwd=REPO
        )
        assert done.returncode == 0, done.stderr[-3000:]
        yield out, ray_tmp, done.stdout.splitlines(), done.stderr.splitlines()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)  # Ray's session logs, outside tmp_path


def test_smollm2_select_finetune_evaluate_report(smollm2_run, pool_subset):
    run = smollm2_run[0]
    # The selection stage, in <run>/select.
    selection = run / "select"
    scores = pd.read_parquet(selection / "scores.parquet")
    assert len(scores) == 40 and scores["id"].is_unique
    assert scores["keep_a0.3"].sum() == 28
    # a real instruction-tuned model: mean response loss well below uniform (ln 49152 = 10.8)
    assert 0.2 < scores["loss"].mean() < 6.0, scores["loss"].describe()
    assert "| 0.3 | 28 |" in (selection / "report.md").read_text()
    select_manifest = json.loads((selection / "manifest.json").read_text())
    assert select_manifest["counts"]["calibrate"]["batches"] == 1
    # rows cut to data.max_length are counted, against the tokenizer's own lengths
    from slap_ray.assets import load_tokenizer
    from slap_ray.data.tokenize import tokenize_conversation

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    rows = [
        json.loads(line) for s in ("gsm8k", "dolly") for line in open(pool_subset / f"{s}.jsonl")
    ]
    messages = {row["id"]: row["messages"] for row in rows}
    lengths = [
        tokenize_conversation(messages[i], tokenizer, 10**6).num_tokens for i in scores["id"]
    ]
    cut = select_manifest["counts"]["tokenize"]
    assert cut["truncated_rows"] == sum(n > 128 for n in lengths) > 0
    assert cut["truncated_tokens"] == sum(n - 128 for n in lengths if n > 128)
    assert (
        f"{cut['truncated_rows']} cut to data.max_length" in (selection / "report.md").read_text()
    )
    assert (selection / "stages" / "second_moment.pt").is_file()

    # Fine-tuning on exactly the kept ids, evaluation and compute in the run's report.
    manifest = json.loads((run / "manifest.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert manifest["counts"]["prepare"]["train_rows"] == 28
    assert {"select", "prepare", "train"} <= set(manifest["timings_s"])
    assert manifest["counts"]["train"]["frozen_weights_unchanged"] is True
    assert metrics["compute"]["backward_examples"] == 28  # offline: every kept row, once
    assert len(metrics["history"]) == 4  # ceil(28 / 8)
    final, base = metrics["final_eval"]["overall"], metrics["base_eval"]["overall"]
    assert np.isfinite(final["loss"]) and 0.2 < base["loss"] < 6.0
    generation = metrics["generation"]
    assert generation["rows"] == 2 and generation["groups"].keys() == {"dolly", "gsm8k"}
    assert generation["groups"]["gsm8k"]["metric"] == "exact_match"
    assert generation["groups"]["gsm8k"]["score"] in (0.0, 1.0)
    assert 0.0 <= generation["groups"]["dolly"]["score"] <= 100.0  # chrF
    text = (run / "report.md").read_text()
    assert "source=gsm8k" in text and "estimated total FLOPs" in text and "select/report.md" in text
    assert "gsm8k: exact match" in text and "dolly: chrF" in text
    assert (run / "model" / "adapter_model.safetensors").is_file()
    kept = set((selection / "kept" / "alpha-0.3.txt").read_text().splitlines())
    assert set((run / "train_ids.txt").read_text().splitlines()) == kept


STAGE_LINE = re.compile(r"^slap run: [a-z_]+ done \(\d+\.\d s\)$")


def test_console_is_clean_and_the_detail_goes_to_the_logs(smollm2_run):
    run, _, stdout, stderr = smollm2_run
    for noise in NOISE:
        assert not [line for line in stdout + stderr if noise in line], noise
    # What a newcomer reads: one summary line on stdout; on stderr a line per finished stage and
    # nothing else but Ray's one known notice (its C++ core worker prints it, citing its issue,
    # about restartable actors with arguments in the object store). The raylet's worker-pool
    # warning (ray-project/ray#3644) no longer prints: the embedded instance starts workers as
    # many at a time as it keeps warm.
    assert len(stdout) == 1 and stdout[0].startswith("slap run: 4 steps"), stdout
    assert "report:" in stdout[0]
    stages = [line for line in stderr if STAGE_LINE.match(line)]
    assert {"embed", "score", "train"} <= {line.split()[2] for line in stages}, stderr
    # most of the 40 rows exceed data.max_length=128 (the manifest counts them): said once
    counts = json.loads((run / "select" / "manifest.json").read_text())["counts"]["tokenize"]
    (cut,) = [line for line in stderr if "were cut to fit" in line]
    assert cut.startswith(f"slap run: data.max_length=128: {counts['truncated_rows']} of 40 rows")
    others = [line for line in stderr if not STAGE_LINE.match(line) and line != cut]
    assert len(others) <= 1 and all("github.com/ray-project/ray/issues/" in x for x in others), (
        others
    )
    assert not [line for line in stdout + stderr if "PYTHON worker processes" in line]
    select_log = (run / "select" / "logs" / "select.log").read_text()
    finetune_log = (run / "logs" / "finetune.log").read_text()
    assert "MapBatches(Embedder)" in select_log or "Embedder" in select_log
    assert "RpcError" not in finetune_log
    # The workers' own output: Ray's worker log files, copied into the run (log_to_driver off).
    assert "Ray worker output:" in finetune_log
    worker_logs = list((run / "logs" / "ray-workers").glob("worker-*"))
    assert any("RayTrainWorker" in p.read_text(errors="replace") for p in worker_logs)


def test_slap_run_starts_ray_once_for_select_and_finetune(smollm2_run):
    ray_tmp = smollm2_run[1]
    sessions = [p for p in (ray_tmp / "ray").glob("session_2*") if not p.is_symlink()]
    assert len(sessions) == 1, sessions
