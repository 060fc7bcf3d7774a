"""The sweep report's primary metrics and intervals against hand computations (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from slap_ray.config import build_config
from slap_ray.reporting.intervals import PairedRows, hierarchical_interval, t_interval
from slap_ray.reporting.sweep import add_macro, summary_table, write_results


def results_frame() -> pd.DataFrame:
    """A fixed results.csv: random and two arms at alpha 0.3, three seeds, two sources."""
    rows = []
    losses = {  # (arm, seed) -> (token-weighted, source a, source b)
        ("random", 0): (2.00, 1.0, 3.0), ("random", 1): (2.10, 1.1, 3.1),
        ("random", 2): (2.20, 1.2, 3.2),
        ("slap", 0): (1.99, 1.0, 2.9), ("slap", 1): (2.08, 1.05, 3.0),
        ("slap", 2): (2.17, 1.2, 3.0),
        ("better", 0): (1.90, 0.9, 2.9), ("better", 1): (2.00, 1.0, 3.0),
        ("better", 2): (2.11, 1.1, 3.1),
    }  # fmt: skip
    for (arm, seed), (loss, a, b) in losses.items():
        rows.append(
            {
                "arm": arm,
                "method": "random" if arm == "random" else "slap",
                "mode": "offline",
                "alpha": 0.3,
                "seed": seed,
                "eval_loss": loss,
                "eval_loss[source=a]": a,
                "eval_loss[source=b]": b,
                "flops_total": 1e12,
                "train_rows": 132,
                "backward_tokens": 38000 + seed,
            }  # fmt: skip
        )
    return pd.DataFrame(rows)


def test_macro_and_t_intervals_equal_a_hand_computation():
    frame = add_macro(results_frame())
    assert frame.loc[(frame["arm"] == "slap") & (frame["seed"] == 1), "macro_loss"].item() == (
        pytest.approx((1.05 + 3.0) / 2)
    )
    summary = summary_table(frame, samples=2000).set_index("arm")
    slap = summary.loc["slap"]
    # token-weighted: differences -0.01, -0.02, -0.03 -> mean -0.02, sd 0.01, t(0.975, 2)
    half = 4.302652729911275 * 0.01 / np.sqrt(3)
    assert slap["eval_loss_vs_random"] == pytest.approx(-0.02)
    assert slap["eval_loss_t"] == pytest.approx((-0.02 - half, -0.02 + half))
    # macro: (0-0.1)/2, (-0.05-0.1)/2, (0-0.2)/2 = -0.05, -0.075, -0.1
    macro = np.array([-0.05, -0.075, -0.1])
    assert slap["macro_loss_vs_random"] == pytest.approx(macro.mean())
    half = 4.302652729911275 * macro.std(ddof=1) / np.sqrt(3)
    assert slap["macro_loss_t"] == pytest.approx((macro.mean() - half, macro.mean() + half))
    # slap's token-weighted interval crosses 0: it does not beat random; "better" does on both
    assert not slap["beats_random"]
    assert summary.loc["better", "beats_random"]
    assert summary.loc["better", "backward_tokens_mean"] == pytest.approx(38001)
    assert all(np.isnan(t_interval(np.array([0.5]))))


def test_row_level_interval_is_exact_for_a_constant_shift_and_wider_with_row_noise():
    rng = np.random.default_rng(0)
    sources = np.array(["a"] * 30 + ["b"] * 10)
    pairs = []
    for _ in range(4):
        tokens = rng.integers(5, 50, size=40)
        random = rng.gamma(2.0, 1.0, size=40) * tokens
        pairs.append(PairedRows(arm=random - 0.1 * tokens, random=random, tokens=tokens,
                                sources=sources))  # fmt: skip
    exact = hierarchical_interval(pairs, samples=500)
    for metric in ("eval_loss", "macro_loss"):
        assert exact[metric] == pytest.approx((-0.1, -0.1))
    noisy = [
        PairedRows(p.arm + rng.normal(0, 0.5, 40) * p.tokens, p.random, p.tokens, p.sources)
        for p in pairs
    ]
    low, high = hierarchical_interval(noisy, samples=2000)["eval_loss"]
    assert low < -0.1 < high and high - low > 0.05


def test_report_uses_trials_rows_and_prints_the_answer(tmp_path):
    frame = results_frame()
    rng = np.random.default_rng(1)
    ids = [f"row-{i}" for i in range(20)]
    for _, trial in frame.iterrows():
        folder = tmp_path / "trials" / f"{trial['arm']}-offline-a0.3-s{trial['seed']}"
        folder.mkdir(parents=True)
        tokens = [10] * 20
        shift = {"random": 0.0, "slap": -0.02, "better": -0.1}[trial["arm"]]
        sums = (np.full(20, 2.0) + shift + rng.normal(0, 0.01, 20)) * 10
        rows = {
            "source": ["a"] * 10 + ["b"] * 10,
            "tokens": tokens,
            "final_loss_sum": sums.tolist(),
        }
        (folder / "metrics.json").write_text(json.dumps({"eval_ids": ids, "eval_rows": rows}))
    config = build_config({"sweep": {"seeds": [0, 1, 2], "bootstrap_samples": 500}})
    report = write_results(
        [{**r, "error": None} for r in frame.to_dict("records")], config, tmp_path
    )
    text = report.read_text()
    assert "macro loss" in text and "beats random" in text and "Per source" in text
    answer = (tmp_path / "answer.txt").read_text()
    assert "alpha 0.3, eval loss: `better`" in answer
    saved = pd.read_csv(tmp_path / "results.csv")
    assert "macro_loss" in saved and len(saved) == 9


@pytest.mark.parametrize("layout", ["file", "folder of parts"])
def test_the_selection_pass_is_charged_to_offline_arms_that_score(tmp_path, layout):
    from slap_ray.assets import load_causal_lm, parameter_count
    from slap_ray.reporting.sweep import add_selection_cost

    load_causal_lm("tiny-bpe")  # built once, so its size is known
    folder = tmp_path / "selection"
    folder.mkdir()
    scores = pd.DataFrame({"batch_id": [0, 0, 1, None], "num_tokens": [10, 20, 30, 99]})
    if layout == "file":  # the unsampled row (no batch) was never scored
        scores.to_parquet(folder / "scores.parquet")
    else:  # as the pipeline writes it (a sweep's published selection has one)
        (folder / "scores.parquet").mkdir()
        scores[:2].to_parquet(folder / "scores.parquet" / "part-0.parquet")
        scores[2:].to_parquet(folder / "scores.parquet" / "part-1.parquet")
    (folder / "manifest.json").write_text(json.dumps({"timings_s": {"calibrate": 2, "score": 5}}))
    frame = pd.DataFrame(
        {
            "method": ["slap", "random", "slap", "full"],
            "mode": ["offline", "offline", "online", "offline"],
            "flops_total": [1e9, 1e9, 2e9, 3e9],
        }  # fmt: skip
    )
    charged = add_selection_cost(frame, folder, "tiny-bpe")
    expected = 2.0 * parameter_count("tiny-bpe") * 60
    assert charged["flops_selection"].tolist() == [expected, 0.0, 0.0, 0.0]
    assert charged["flops_with_selection"].tolist() == [1e9 + expected, 1e9, 2e9, 3e9]
    assert charged["seconds_selection"].tolist() == [7.0, 0.0, 0.0, 0.0]


def test_selection_diagnostics_against_a_hand_count():
    from slap_ray.reporting.diagnostics import diagnostics_lines, selection_diagnostics

    scores = pd.DataFrame(
        {
            "id": ["a1", "a2", "b1~swapped", "b2", "c1~dup1", "x"],
            "source": ["a", "a", "b", "b", "c", "a"],
            "loss": [1.0, 2.0, 3.0, 4.0, 5.0, np.nan],  # the last row was never scored
            "num_tokens": [10, 20, 30, 40, 50, 60],
            "keep_k": [True, False, True, True, False, True],
        }
    )
    frame = selection_diagnostics(scores, {("slap", 0.3, 0): "k"})
    row = frame.iloc[0]
    assert row["kept_rows"] == 3 and row["kept_tokens"] == 80
    assert row["mean_kept_loss"] == pytest.approx(8.0 / 3)
    assert row["planted_kept"] == pytest.approx(0.5)  # b1~swapped kept, c1~dup1 not
    assert row["share[a]"] == pytest.approx(1 / 3) and row["share[c]"] == 0.0
    assert row["pool_share[a]"] == pytest.approx(0.4)  # 2 of the 5 scored rows
    lines = diagnostics_lines(frame)
    assert lines[2] == "| (pool) | - | - | - | - | 40.0% | 40.0% | 20.0% |"
    assert lines[3].startswith("| slap | 0.3 | 80 | 2.6667 | 50.0% |")


def test_the_noisy_pool_plants_exact_shares_and_marks_them():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from noisy_pool import noisy_rows

    rows = [
        {"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"},
                                     {"role": "assistant", "content": f"a{i}"}]}
        for i in range(40)
    ]  # fmt: skip
    noisy = noisy_rows(rows, swap=0.15, repeat=0.10, seed=3)
    swapped = [r for r in noisy if r["id"].endswith("~swapped")]
    repeats = [r for r in noisy if r["id"].endswith("~dup1")]
    assert len(swapped) == 6 and len(repeats) == 4 and len(noisy) == 44
    for row in swapped:  # another row's answer, never its own
        own = row["id"].removeprefix("r").removesuffix("~swapped")
        assert row["messages"][-1]["content"] != f"a{own}"
        assert row["messages"][0]["content"] == f"q{own}"
    assert rows[0]["id"] == "r0"  # the input is not changed
    assert noisy_rows(rows, 0.15, 0.10, seed=3) == noisy


def test_the_noisy_sample_is_the_pipelines_max_rows_sample_with_both_copies():
    """``--sample N``: the N rows ``data.max_rows: N`` samples (the smallest seeded rank keys
    over all files, brute force here), kept per file in file order; planted into that sample,
    every repeat meets its original."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from noisy_pool import noisy_rows, pipeline_sample

    from slap_ray.core.seeds import id_rank_key

    def row(i: int) -> dict:
        return {"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"},
                                            {"role": "assistant", "content": f"a{i}"}]}  # fmt: skip

    files = {"a.jsonl": [row(i) for i in range(30)], "b.jsonl": [row(i) for i in range(30, 50)]}
    sample = pipeline_sample(files, 12, seed=5)
    everyone = [r["id"] for rows in files.values() for r in rows]
    expected = sorted(everyone, key=lambda i: (id_rank_key(5, "max-rows", i), i))[:12]
    assert sorted(r["id"] for rows in sample.values() for r in rows) == sorted(expected)
    for name, rows in sample.items():
        order = [r["id"] for r in files[name]]
        assert [order.index(r["id"]) for r in rows] == sorted(order.index(r["id"]) for r in rows)
    noisy = noisy_rows(sample["a.jsonl"] + sample["b.jsonl"], swap=0.0, repeat=0.5, seed=1)
    ids = {r["id"] for r in noisy}
    repeats = [i for i in ids if i.endswith("~dup1")]
    assert repeats and all(i.removesuffix("~dup1") in ids for i in repeats)
