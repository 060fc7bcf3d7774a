"""Kept ids and weights of every selection option, recorded: a refactor must not change them.

The grid scores two batches of the tiny model offline (``score_batch``) and runs one on-policy
step per method; the recording (``data/recorded_kept_ids.json``) was written by the code before
the selection spec was unified. Rewrite it only for an intended change of behaviour:
``python tests/unit/test_recorded_kept_ids.py --record``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from test_scoring import rows

from slap_ray.assets import load_causal_lm
from slap_ray.core.onpolicy import SelectionSettings, onpolicy_step
from slap_ray.core.scoring import (
    ScoringSettings,
    ScoringState,
    Selection,
    calibrate_second_moment,
    score_batch,
)
from slap_ray.core.selection import SelectionSpec

RECORDING = Path(__file__).parent / "data" / "recorded_kept_ids.json"
OFFLINE = {
    "slap": SelectionSpec(),
    "slap_factored": SelectionSpec(preconditioner="factored"),
    "slap_raw": SelectionSpec(preconditioner="none"),
    "slap_projected": SelectionSpec(projection_dim=8),
    "slap_quantile_k2_tau0.5": SelectionSpec(num_strata=2, tau=0.5, strata="quantile"),
    "random": SelectionSpec(method="random"),
    "online_hard": SelectionSpec(method="online_hard"),
    "ccs_k2": SelectionSpec(method="ccs", num_strata=2),
    "infobatch": SelectionSpec(method="infobatch"),
    "full": SelectionSpec(method="full"),
}
ONLINE = ("slap", "random", "online_hard", "ccs", "infobatch")


def offline_kept(model) -> dict:
    moment = calibrate_second_moment(model, [rows(8, seed=20)], 0).value()
    grid = [
        Selection(f"{name}@{alpha}#s{seed}", alpha, seed, spec)
        for name, spec in OFFLINE.items()
        for alpha in (0.25, 0.5)
        for seed in (0, 1)
    ]
    settings = ScoringSettings(pad_token_id=0, projection_seed=3)
    state = ScoringState(second_moment=moment)
    recorded = {}
    for batch_key in (0, 1):
        ids, labels = rows(16, seed=10 + batch_key)
        scores = score_batch(
            model, ids, labels, settings, selections=grid, batch_key=batch_key, state=state
        )
        for s in grid:
            name = f"{s.key}#b{batch_key}"
            kept = np.flatnonzero(scores.keep[s.key])
            recorded[name] = {
                "kept": kept.tolist(),
                "weights": [round(float(w), 6) for w in scores.weight[s.key][kept]],
            }
    return recorded


def online_kept() -> dict:
    recorded = {}
    for method in ONLINE:
        torch.manual_seed(0)
        model = load_causal_lm("tiny-bpe-untied").train()
        ids, labels = rows(10, seed=30)
        settings = SelectionSettings(SelectionSpec(method=method), alpha=0.3)
        stats = onpolicy_step(
            model, list(zip(ids, labels, strict=True)), range(10), 10, settings,
            np.random.default_rng(5), pad_token_id=0,
        )  # fmt: skip
        recorded[f"online_{method}"] = {"kept": stats.kept.tolist()}
    return recorded


def current() -> dict:
    torch.manual_seed(0)
    return {**offline_kept(load_causal_lm("tiny-bpe")), **online_kept()}


def test_kept_ids_and_weights_equal_the_recording():
    recorded = json.loads(RECORDING.read_text())
    got = current()
    assert sorted(got) == sorted(recorded)
    changed = [name for name in recorded if got[name] != recorded[name]]
    assert not changed, f"{len(changed)} selections changed, e.g. {changed[:5]}"
    # The grid is not degenerate: the options select differently.
    distinct = {json.dumps(v["kept"]) for k, v in got.items() if "@0.5#s0#b0" in k}
    assert len(distinct) >= 6


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    lines = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(current().items())]
    RECORDING.write_text("{\n" + ",\n".join(lines) + "\n}\n")
