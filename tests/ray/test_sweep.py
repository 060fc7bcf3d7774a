"""`slap sweep` with the tiny model: one selection pass, a Tune grid, restore after a kill."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from recording import assert_matches_recording

from slap_ray.config import build_config
from slap_ray.jobs.sweep import run_sweep

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]


def sweep_config(pool: Path, shared: Path, out: Path, **sweep):
    return build_config(
        {
            "output_dir": str(out),
            "progress": False,
            "data": {"paths": [str(pool / "*.jsonl")], "max_rows": 96, "max_length": 96},
            "model": {"name": "tiny-bpe"},
            "strata": {"by": "source"},  # strata and calibration are not under test here
            "select": {"batch_size": 16, "alphas": [0.3], "calibration_batches": 0},
            "train": {
                "batch_size": 16,
                "epochs": 1,
                "learning_rate": 0.01,
                "num_workers": 1,
                "checkpoint_every": 2,
            },  # fmt: skip
            "eval": {"paths": [str(shared / "eval" / "gsm8k.jsonl")], "max_rows": 8},
            "sweep": {
                # slap at both alphas, random at one: four trials with the full-data one
                "arms": [{"method": "slap"}, {"method": "random", "alphas": [0.4]}],
                "alphas": [0.2, 0.4],
                "seeds": [0],
                **sweep,
            },
        }
    )


@pytest.fixture(scope="module")
def sweep_run(ray_cluster, pool_subset, shared_data, tmp_path_factory) -> Path:
    """Two trials at once on the 2-CPU cluster: each tokenises its rows in Ray Data, then trains
    on one CPU. (With tokenizer actors each trial held one CPU while its read tasks waited for
    another: this sweep never finished.) Trials are seeded, so the table does not depend on it."""
    out = tmp_path_factory.mktemp("sweep")
    run_sweep(sweep_config(pool_subset, shared_data, out, max_concurrent_trials=2))
    return out


def results(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "results.csv").set_index(["arm", "mode", "alpha", "seed"])


def test_tiny_sweep_writes_results_and_selects_once(sweep_run):
    frame = results(sweep_run)
    assert len(frame) == 4
    assert sorted(set(frame.index.get_level_values("arm"))) == ["full", "random", "slap"]
    assert frame["eval_loss"].notna().all() and (frame["flops_total"] > 0).all()
    # the selection pass is charged to the arm that scores, never to random or full
    charged = frame["flops_selection"]
    assert (charged.xs("slap", level="arm") > 0).all()
    assert (charged.drop("slap", level="arm") == 0).all()
    # pruning shows in the compute columns: 0.4 back-propagates fewer rows than 0.2 than full
    rows = frame["backward_examples"]
    assert rows[("slap", "offline", 0.4, 0)] < rows[("slap", "offline", 0.2, 0)]
    assert rows[("slap", "offline", 0.2, 0)] < rows[("full", "offline", 0.0, 0)]
    report = (sweep_run / "results.md").read_text()
    assert "| slap | offline | 0.2 | 1 |" in report and "Best arm per alpha" in report
    for plot in ("loss_vs_kept.png", "loss_vs_flops.png", "per_task.png"):
        assert (sweep_run / "plots" / plot).stat().st_size > 1000, plot
    manifest = json.loads((sweep_run / "manifest.json").read_text())
    assert manifest["counts"]["selection"]["runs_this_session"] == 1
    assert manifest["counts"]["selection"]["selections"] == 3
    assert manifest["counts"]["trials"] == {"planned": 4, "finished": 4, "failed": 0}
    scored = json.loads((sweep_run / "selection" / "manifest.json").read_text())["counts"]
    assert scored["score"]["rows_scored_now"] == scored["output"]["scored"]  # each row once
    assert sorted(scored["output"]["kept_per_alpha"]) == ["0.2", "0.4"]  # the sweep's alphas
    # the untrained model is evaluated by the first trials only; later ones reuse it
    trials = sorted((sweep_run / "trials").glob("*/manifest.json"))
    reused = [json.loads(t.read_text())["counts"]["prepare"]["base_eval_reused"] for t in trials]
    assert len(trials) == 4 and any(reused) and not all(reused)
    assert frame["base_eval_loss"].nunique() == 1
    assert len(list((sweep_run / "base_eval").glob("base-eval-*.json"))) == 1
    # one forward pass per batch for all of the grid's selections (test_scoring checks kinds)
    assert scored["score"]["forward_passes_now"] == scored["score"]["batches"]


def kept_list(selection: Path, arm: str, alpha: float) -> list[str]:
    return (
        (selection / "arms" / arm / "seed-0" / "kept" / f"alpha-{alpha:g}.txt").read_text().split()
    )


def test_each_trial_trains_on_exactly_its_arms_kept_ids(sweep_run):
    selection = sweep_run / "selection"
    scores = pd.read_parquet(selection / "scores.parquet")
    for arm, alpha in (("slap", 0.2), ("slap", 0.4), ("random", 0.4)):
        kept = selection / "arms" / arm / "seed-0" / "kept" / f"alpha-{alpha:g}.txt"
        expected = kept.read_text().splitlines()
        assert expected == sorted(scores.loc[scores[f"keep_{arm}__a{alpha:g}__s0"], "id"])
        trial = sweep_run / "trials" / f"{arm}-offline-a{alpha:g}-s0"
        assert (trial / "train_ids.txt").read_text().splitlines() == expected
    # random keeps the same number of rows per batch as slap, other rows
    assert len(kept_list(selection, "random", 0.4)) == len(kept_list(selection, "slap", 0.4))
    assert kept_list(selection, "random", 0.4) != kept_list(selection, "slap", 0.4)
    # what each arm keeps, written before training, counts the same rows as the kept lists
    diagnostics = pd.read_csv(selection / "diagnostics.csv").set_index(["arm", "alpha"])
    for arm, alpha in (("slap", 0.2), ("slap", 0.4), ("random", 0.4)):
        assert diagnostics.loc[(arm, alpha), "kept_rows"] == len(kept_list(selection, arm, alpha))
    assert "What each arm keeps, before training" in (sweep_run / "results.md").read_text()
    full = (sweep_run / "trials" / "full-s0" / "train_ids.txt").read_text().splitlines()
    assert full == sorted(scores.loc[scores["loss"].notna(), "id"])


def test_trained_ids_equal_the_recording(sweep_run):
    """Source strata, no calibration: SLAP at 0.2 and 0.4, random at 0.4, full data."""
    trials = sorted((sweep_run / "trials").glob("*/train_ids.txt"))
    trained = {path.parent.name: path.read_text().split() for path in trials}
    assert_matches_recording("sweep trials (slap, random, full)", trained)


def test_killed_sweep_resumes_only_the_missing_trials(
    sweep_run, pool_subset, shared_data, tmp_path, kill_job
):
    """Kill the sweep's process group once the first trial has finished; --resume runs only
    the rest, and the table equals the uninterrupted sweep's for the same trials. The selection
    is the uninterrupted sweep's (a finished selection is reused, never run again)."""
    import shutil

    out = tmp_path / "sweep"
    shutil.copytree(sweep_run / "selection", out / "selection")
    config = sweep_config(
        pool_subset, shared_data, out, arms=[{"method": "slap"}], alphas=[0.2]
    ).model_copy(update={"resume": True})
    kill_job(
        "sweep.py", config, tmp_path,
        lambda: list((out / "trials").glob("*/trial_result.json")), "a finished trial",
    )  # fmt: skip
    (marker,) = list((out / "trials").glob("*/trial_result.json"))
    first = marker.parent / "metrics.json"
    finished_at = first.stat().st_mtime_ns
    partial = out / "results.csv"  # rewritten after each finished trial
    assert not partial.exists() or len(pd.read_csv(partial)) == 1

    run_sweep(config)
    assert first.stat().st_mtime_ns == finished_at  # the finished trial did not run again
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["selection"]["runs_this_session"] == 0
    resumed, whole = results(out), results(sweep_run)
    assert len(resumed) == 2
    columns = ["eval_loss", "backward_examples", "forward_tokens", "train_rows"]
    pd.testing.assert_frame_equal(resumed[columns], whole.loc[resumed.index, columns], rtol=1e-6)


def test_trials_restore_from_a_relative_output_dir(ray_cluster, tmp_path, monkeypatch):
    """`slap sweep --resume` with a relative output_dir (as in the example configs)."""
    from ray import tune

    from slap_ray.ray.tune import TuneRun, run_trials

    def echo(params: dict) -> None:
        tune.report({"value": params["trial"]["x"] * 10})

    monkeypatch.chdir(tmp_path)
    storage = Path("runs") / "tune"
    run = TuneRun(storage, "exp", max_concurrent_trials=1, trial_cpus=0.0, resume=True)
    name = lambda s: f"x{s['x']}"  # noqa: E731
    first = run_trials(echo, [{"x": 1}, {"x": 2}], {}, run, name)
    again = run_trials(echo, [{"x": 1}, {"x": 2}], {}, run, name)
    assert sorted(r["value"] for r in first) == sorted(r["value"] for r in again) == [10, 20]
