"""The sweep's per-arm selection views: written whole or not at all (no Ray)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import slap_ray.jobs.select as select_job
from slap_ray.config import build_config
from slap_ray.jobs.sweep import (
    selection_finished,
    trial_grid,
    write_arm_views,
)


def selection_with_scores(folder) -> list:
    """A sweep's specs (slap and random at alpha 0.3) and a scores.parquet with their columns."""
    config = build_config(
        {
            "output_dir": str(folder),
            "data": {"paths": [str(folder / "pool.jsonl")]},
            "model": {"name": "tiny-bpe"},
            "sweep": {"arms": [{"method": "slap"}, {"method": "random"}], "alphas": [0.3]},
        }
    )
    specs = trial_grid(config)
    ids = [f"row-{i}" for i in range(10)]
    columns: dict[str, list] = {"id": ids}
    for shift, spec in enumerate(s for s in specs if not s.is_full):
        columns[f"keep_{spec.selection_key}"] = [(i + shift) % 3 != 0 for i in range(10)]
        columns[f"weight_{spec.selection_key}"] = [1.0] * 10
    pd.DataFrame(columns).to_parquet(folder / "scores.parquet", index=False)
    return specs


def test_a_kill_between_two_arm_views_leaves_the_selection_unfinished(tmp_path, monkeypatch):
    specs = selection_with_scores(tmp_path)
    arms = sorted({s.arm for s in specs if not s.is_full})
    assert arms == ["random", "slap"]
    write_kept, written = select_job.write_kept, []

    def killed_after_the_first_arm(*args, **kwargs):
        if written:
            raise KeyboardInterrupt  # the process stops between two arms
        written.append(write_kept(*args, **kwargs))

    monkeypatch.setattr(select_job, "write_kept", killed_after_the_first_arm)
    with pytest.raises(KeyboardInterrupt):
        write_arm_views(tmp_path, specs)
    assert len(written) == 1
    assert not (tmp_path / "arms").exists()
    assert not selection_finished(tmp_path)  # a resumed sweep selects (and writes) again

    monkeypatch.setattr(select_job, "write_kept", write_kept)
    write_arm_views(tmp_path, specs)
    assert selection_finished(tmp_path) and not (tmp_path / "arms.partial").exists()
    scores = pd.read_parquet(tmp_path / "scores.parquet")
    for spec in (s for s in specs if not s.is_full):
        view = tmp_path / "arms" / spec.arm / f"seed-{spec.seed}"
        manifest = json.loads((view / "manifest.json").read_text())
        expected = sorted(scores.loc[scores[f"keep_{spec.selection_key}"], "id"])
        assert manifest["kept_per_alpha"] == {"0.3": len(expected)}
        assert (view / "kept" / "alpha-0.3.txt").read_text().split() == expected
