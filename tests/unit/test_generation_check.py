"""The generation check: exact match and chrF against hand values and the library, which rows it
answers, how it is summarised, configured and reported."""

from __future__ import annotations

import pandas as pd
import pytest

from slap_ray.config import ConfigError, build_config
from slap_ray.core.evaluation import (
    chrf,
    exact_match,
    generation_plan,
    normalize_answer,
    summarize_generation,
)
from slap_ray.jobs.finetune import _check_generation_sources
from slap_ray.reporting.sweep import generation_column, generation_columns, per_source_lines
from slap_ray.reporting.training import _generation_lines


@pytest.mark.parametrize(
    ("candidate", "reference", "expected"),
    [
        ("The Eiffel Tower!", "eiffel tower", 1.0),  # case, article and punctuation
        ("  an   apple ", "Apple", 1.0),
        ("Paris, France", "Paris", 0.0),  # extra words are wrong
        ("theatre", "atre", 0.0),  # articles only as whole words
        ("1,000", "1000", 1.0),  # SQuAD drops punctuation inside numbers too
        ("", "", 1.0),
    ],
)
def test_exact_match_normalises_as_squad_does(candidate, reference, expected):
    assert exact_match(candidate, reference) == expected


def test_normalize_answer_by_hand():
    assert normalize_answer("The  Quick, brown fox.") == "quick brown fox"


def test_chrf_against_bounds_and_sacrebleus_corpus_score():
    from sacrebleu import corpus_chrf

    assert chrf("Der Hund bellt.", "Der Hund bellt.") == pytest.approx(100.0)
    assert chrf("xyz", "Der Hund bellt.") == 0.0
    partial = chrf("Der Hund bellt laut", "Der Hund bellt.")
    assert 0.0 < partial < 100.0
    # one sentence: the sentence score is the corpus score of a one-line corpus
    expected = corpus_chrf(["Der Hund bellt laut"], [["Der Hund bellt."]]).score
    assert partial == pytest.approx(expected)


def test_generation_plan_takes_each_listed_sources_first_rows_by_id():
    ids = ["n-3", "t-1", "n-1", "g-1", "n-2", "t-2"]
    sources = ["nq", "tr", "nq", "gs", "nq", "tr"]
    plan = generation_plan(ids, sources, {"tr": "chrf", "nq": "exact_match"}, rows=2)
    assert plan == [(2, "nq", "exact_match"), (4, "nq", "exact_match"),
                    (1, "tr", "chrf"), (5, "tr", "chrf")]  # fmt: skip
    # without metrics: the table's first rows, ROUGE-L, one group
    assert generation_plan(ids, sources, {}, rows=2) == [
        (0, "all", "rouge_l"),
        (1, "all", "rouge_l"),
    ]
    assert len(generation_plan(ids, sources, {}, rows=50)) == 6


def test_summarize_generation_means_per_group():
    summary = summarize_generation(
        [("nq", "exact_match", 1.0), ("tr", "chrf", 40.0), ("nq", "exact_match", 0.0),
         ("tr", "chrf", 60.0), ("nq", "exact_match", 1.0)]
    )  # fmt: skip
    assert summary == {
        "nq": {"metric": "exact_match", "score": pytest.approx(2 / 3), "rows": 3},
        "tr": {"metric": "chrf", "score": 50.0, "rows": 2},
    }


def test_generation_settings_are_checked():
    config = build_config(
        {"eval": {"generate_rows": 4, "generate_metrics": {"nq_open": "exact_match"}}}
    )
    assert config.eval.generate_metrics == {"nq_open": "exact_match"}
    with pytest.raises(ConfigError, match=r"eval\.generate_metrics.*generate_rows > 0"):
        build_config({"eval": {"generate_metrics": {"nq_open": "exact_match"}}})
    with pytest.raises(ConfigError, match=r"eval\.generate_metrics"):
        build_config({"eval": {"generate_rows": 4, "generate_metrics": {"nq_open": "bleu"}}})
    with pytest.raises(ConfigError, match=r"no held-out rows of source\(s\) nq_opn"):
        _check_generation_sources(
            build_config(
                {"eval": {"generate_rows": 4, "generate_metrics": {"nq_opn": "exact_match"}}}
            ),
            ["nq_open", "ntrex"],
        )


def test_reports_show_each_groups_score():
    generation = {
        "rows": 5,
        "rouge_l": None,
        "groups": {
            "nq_open": {"metric": "exact_match", "score": 0.4, "rows": 3},
            "ntrex": {"metric": "chrf", "score": 41.5, "rows": 2},
        },
    }
    (line,) = _generation_lines(generation)
    assert "nq_open: exact match 0.4000 (3 rows)" in line and "ntrex: chrF 41.5000" in line
    older = {"rows": 2, "rouge_l": 0.25, "samples": []}  # a metrics.json from before the groups
    assert "first eval rows: ROUGE-L F1 0.2500 (2 rows)" in _generation_lines(older)[0]


def test_sweep_table_pairs_generation_scores_with_random_by_seed():
    em = generation_column("exact_match", "nq_open")
    assert em == "exact_match[source=nq_open]"
    assert generation_column("rouge_l", "all") == "rouge_l[all]"
    frame = pd.DataFrame(
        {
            "arm": ["random"] * 3 + ["slap"] * 3,
            "method": ["random"] * 3 + ["slap"] * 3,
            "mode": "offline",
            "alpha": 0.3,
            "seed": [0, 1, 2] * 2,
            "eval_loss": 2.0,
            em: [0.2, 0.3, 0.4, 0.3, 0.3, 0.6],  # slap - random: +0.1, 0.0, +0.2
        }
    )
    assert generation_columns(frame) == [em]
    (header, _, row) = per_source_lines(frame, generation_columns(frame))
    assert header == "| source | slap |"
    assert row.startswith("| nq_open (exact_match) | +0.100 [")
