"""The selection job end to end on Ray with the tiny model: outputs, determinism, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from recording import assert_matches_recording
from selections import ALPHAS, kept_ids, tiny_config

from slap_ray.assets import parameter_count, resolve_model_path
from slap_ray.core.selection import n_keep_for
from slap_ray.jobs.scoring import finished_batches
from slap_ray.jobs.select import run_select
from slap_ray.ray.scorer import SCORED_BATCHES_KEY

pytestmark = pytest.mark.ray


def test_every_row_scored_once_and_kept_fractions_match(baseline_run, pool_subset):
    scores = pd.read_parquet(baseline_run / "scores.parquet")
    input_ids = [
        json.loads(line)["id"] for f in sorted(pool_subset.glob("*.jsonl")) for line in f.open()
    ]
    assert sorted(scores["id"]) == sorted(input_ids)
    assert scores["id"].is_unique
    assert scores["loss"].notna().all() and np.isfinite(scores["loss"]).all()
    for alpha in ALPHAS:
        per_batch = scores.groupby("batch_id")[f"keep_a{alpha:g}"].agg(["sum", "size"])
        expected = [n_keep_for(size, alpha) for size in per_batch["size"]]
        assert per_batch["sum"].tolist() == expected
        assert abs(scores[f"keep_a{alpha:g}"].mean() - (1 - alpha)) < 0.03
        assert kept_ids(baseline_run)[alpha] == sorted(scores.loc[scores[f"keep_a{alpha:g}"], "id"])
    # each composed batch mirrors the pool: full batches hold 16 rows from several clusters
    sizes = scores.groupby("batch_id").size()
    assert (sizes.iloc[:-1] == 16).all()
    assert scores.groupby("batch_id")["cluster"].nunique().iloc[:-1].min() >= 2


def test_each_scored_file_holds_the_batches_its_footer_names(baseline_run):
    """Scorer calls write groups of batches (several per file, however the calls are sized);
    resume trusts the footer, so it must name exactly the batches inside."""
    files = sorted((baseline_run / "scored").glob("scored-*.parquet"))
    named = {}
    for path in files:
        batches = json.loads(pq.read_schema(path).metadata[SCORED_BATCHES_KEY])
        inside = sorted(set(pd.read_parquet(path, columns=["batch_id"])["batch_id"]))
        assert sorted(batches) == inside, path.name
        named.update(dict.fromkeys(batches, path.name))
    assert sorted(named) == list(range(10))
    per_file = [list(named.values()).count(path.name) for path in files]
    assert max(per_file) >= 2  # a call writes its group of batches, not a file per batch


def test_prepared_batches_are_not_one_row_group_each(baseline_run):
    """A groupby emits one block per batch; written as they come, each batch was its own row
    group and the footers every later read plans from grew with the pool."""
    files = sorted((baseline_run / "stages" / "batches").glob("*.parquet"))
    metadata = [pq.ParquetFile(path).metadata for path in files]
    assert sum(m.num_rows for m in metadata) == 10
    assert max(m.num_rows for m in metadata) >= 2  # some file holds several batches ...
    assert all(m.num_row_groups == 1 for m in metadata)  # ... in one row group


def test_report_manifest_and_config_written(baseline_run):
    for name in ("report.md", "manifest.json", "config.yaml", "rejected.jsonl"):
        assert (baseline_run / name).is_file(), name
    plots = sorted(p.name for p in (baseline_run / "plots").glob("*.png"))
    assert plots == [
        "cluster_sizes.png",
        "kept_per_source.png",
        "kept_per_task.png",
        "loss_kept_vs_pruned.png",
    ]
    assert all((baseline_run / "plots" / p).stat().st_size > 1000 for p in plots)
    manifest = json.loads((baseline_run / "manifest.json").read_text())
    assert manifest["counts"]["read"]["rows"] == 160
    assert manifest["counts"]["output"]["scored"] == 160
    assert set(manifest["timings_s"]) >= {
        "read",
        "tokenize",
        "embed",
        "kmeans",
        "score",
        "calibrate",
    }
    peaks = manifest["driver_peak_rss_gib"]
    assert set(peaks) == set(manifest["timings_s"])
    assert 0 < peaks["read"] <= peaks["score"] < 8  # a running peak, in GiB
    import ray

    assert manifest["versions"]["ray"] == ray.__version__  # the version that ran, recorded
    assert manifest["scorer_throughput_rows_per_s"] > 0
    report = (baseline_run / "report.md").read_text()
    assert "| 0.3 |" in report and "plots/loss_kept_vs_pruned.png" in report


# Every layout knob at once, each away from the baseline's: block size, scorer count and CPUs,
# shuffle partitions, embedding calls, and a proxy scorer (the trained model is SmolLM2, the
# tiny model scores and selects).
LAYOUT = {
    "ray.rows_per_block": 16, "score.num_scorers": 3, "score.num_cpus_per_scorer": 0.5,
    "ray.shuffle_partitions": 5, "embed.batch_size": 16,
    "model.name": "smollm2-135m-instruct", "score.model": "tiny-bpe",
}  # fmt: skip


def test_same_selection_for_any_layout_and_shuffled_files(baseline_run, pool_subset, tmp_path):
    """Block size, file order, row order inside files, shuffle partitions, embedding calls and
    scorer count change nothing; with ``score.model`` the selection is that model's whatever ``model.name``
    trains."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "shuffled"
    folder.mkdir()
    files = sorted(pool_subset.glob("*.jsonl"))
    for source in files:
        lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
        (folder / source.name).write_text("".join(rng.permutation(lines)), encoding="utf-8")
    shuffled = [str(folder / files[i].name) for i in rng.permutation(len(files))]
    trained, scoring = LAYOUT["model.name"], LAYOUT["score.model"]
    resolve_model_path(trained)  # the cost line counts a converted folder, never converts one
    run_select(tiny_config(shuffled, tmp_path / "run", **LAYOUT))
    assert kept_ids(tmp_path / "run") == kept_ids(baseline_run)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["scoring_model"] == scoring
    cost = manifest["scoring_cost"]
    assert cost["scoring_parameters"] == parameter_count(scoring)
    assert cost["trained_parameters"] == parameter_count(trained)
    assert "Scoring cost" in (tmp_path / "run" / "report.md").read_text()


def test_bad_rows_stop_the_run_in_error_mode(ray_cluster, tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text(
        '{"id": "a", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n{oops\n'
    )
    from slap_ray.errors import BadRowError

    with pytest.raises(BadRowError, match=r"broken\.jsonl:2"):
        run_select(tiny_config([str(bad)], tmp_path / "run"))


def test_resume_after_kill_matches_uninterrupted_run(baseline_run, pool_subset, tmp_path, kill_job):
    """Kill the job (whole process group) once embedding has begun, resume and kill again once
    scoring has begun, resume: the same kept ids as the uninterrupted baseline, and each resume
    skipped what the killed run had finished (embedded batches, scored batches). A file in
    ``scored/`` that no finished scorer call wrote (an older layout's ``batch-*.parquet``) is
    not read into the outputs."""
    out = tmp_path / "run"
    config = tiny_config([str(pool_subset / "*.jsonl")], out)
    kill_job(
        "slap_select.py", config, tmp_path,
        lambda: any((out / "stages" / "embedded").glob("part-*.parquet")), "an embedded batch",
        timeout_s=300,
    )  # fmt: skip
    assert not (out / "stages" / "prepare.json").exists()
    resumed = config.model_copy(update={"resume": True})
    kill_job(
        "slap_select.py", resumed, tmp_path,
        lambda: len(finished_batches(out / "scored", [])) >= 2, "two scored batches",
        timeout_s=300,
    )  # fmt: skip
    finished_before = len(finished_batches(out / "scored", []))
    assert 2 <= finished_before < 10 and not (out / "scores.parquet").exists()
    first = sorted((out / "scored").glob("scored-*.parquet"))[0]
    shutil.copy(first, out / "scored" / "batch-00000.parquet")  # read, it would repeat rows

    run_select(resumed)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["resume"]["prepared_reused"] is True
    embedded = manifest["counts"]["embed"]
    assert 0 < embedded["resumed_rows"] < 160  # a partial embed was resumed
    assert embedded["resumed_rows"] + embedded["rows_now"] == 160
    score = manifest["counts"]["score"]
    assert score["resumed_batches"] >= finished_before
    # only the unfinished batches were scored again: every row once in the outputs
    assert 0 < score["rows_scored_now"] <= 160 - 16 * finished_before
    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) == 160 and scores["id"].is_unique
    assert kept_ids(out) == kept_ids(baseline_run)


def test_kept_ids_equal_the_recording(baseline_run):
    """The 160-row pool, embedding strata, calibration, SLAP at three alphas."""
    kept = {f"alpha-{alpha:g}": sorted(ids) for alpha, ids in kept_ids(baseline_run).items()}
    assert_matches_recording("select baseline (slap)", kept)
