"""Regression tests on Ray (tiny model) for issue 8's selection bugs; each failed before."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from selections import tiny_config

from slap_ray.config import ConfigError
from slap_ray.errors import BadRowError
from slap_ray.jobs.finetune import prepare_tables, read_kept, selected_ids
from slap_ray.jobs.select import run_select
from slap_ray.reporting.manifest import Manifest

pytestmark = pytest.mark.ray


def qa_rows(id_pattern: str, count: int) -> list[dict]:
    """Short question/answer rows in the messages schema, ids from ``id_pattern``."""
    return [
        {"id": id_pattern.format(i=i), "messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
        ]}
        for i in range(count)
    ]  # fmt: skip


def conversation(i: int, text: str) -> dict:
    return {
        "id": f"conv-{i}",
        "conversations": [
            {"from": "human", "value": f"Question {i}: {text}"},
            {"from": "gpt", "value": f"An answer about {text}, number {i}."},
        ],
    }


def gsm8k_like(row_id: str) -> dict:
    return {"id": row_id, "messages": [
        {"role": "user", "content": "Tom has 3 apples and buys 4 more. How many now?"},
        {"role": "assistant", "content": "3 + 4 = 7, so Tom has 7 apples."},
    ]}  # fmt: skip


SKIP_OVERRIDES = {
    "data.on_bad_rows": "skip",
    "data.max_rows": 56,  # of 61 accepted rows: 5 left unsampled
    "strata.by": "source",  # strata are not under test here
    "select.calibration_batches": 0,
}


@pytest.fixture(scope="module")
def skip_input(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """One skip-mode pool that carries every planted fault: 40 ShareGPT conversations with 7
    bad rows (2 duplicates), a messages file with 4 bad rows, 20 ids with inner spaces, an empty
    and a blank file. Returns the folder and each file's bad lines."""
    folder = tmp_path_factory.mktemp("skip_input")
    topics = ["rivers", "baking bread", "prime numbers", "the moon", "chess openings"]
    chats = [json.dumps(conversation(i, topics[i % 5])) for i in range(40)]
    bad_chats = [
        json.dumps(conversation(3, "a different text under an old id")),  # duplicate id conv-3
        json.dumps(conversation(7, topics[2])),  # exact duplicate of conv-7
        "{not json",
        json.dumps({"id": "x1", "conversations": [{"from": "wizard", "value": "hi"}]}),
        json.dumps({"id": "x2", "conversations": [{"from": "human", "value": "no answer"}]}),
        json.dumps({"id": "x3", "conversations": "not a list"}),
        json.dumps({"id": "x4"}),
    ]
    good = gsm8k_like("bad-file-good-row")
    bad_messages = [
        "{not json",
        json.dumps({"id": "m1", "messages": [{"role": "wizard", "content": "hi"}]}),
        json.dumps({"id": "m2", "messages": [{"role": "user", "content": "no answer"}]}),
        json.dumps(good),  # a duplicate of the file's first (good) row
    ]
    files = {
        "chats.jsonl": (chats + bad_chats, bad_chats),
        "messages.jsonl": ([json.dumps(good), *bad_messages], bad_messages),
        "spaces.jsonl": ([json.dumps(r) for r in qa_rows("row {i} with spaces", 20)], []),
    }
    for name, (lines, _) in files.items():
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "empty.jsonl").write_text("")
    (folder / "blank.jsonl").write_text("\n   \n\n")
    return folder, {name: bad for name, (_, bad) in files.items()}


@pytest.fixture(scope="module")
def skip_run(ray_cluster, skip_input, tmp_path_factory) -> Path:
    folder, _ = skip_input
    out = tmp_path_factory.mktemp("skip_run")
    run_select(tiny_config([str(folder / "*.jsonl")], out, **SKIP_OVERRIDES))
    return out


def rejects_by_file(run: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for line in (run / "rejected.jsonl").open():
        reject = json.loads(line)
        out.setdefault(Path(reject["path"]).name, []).append(reject)
    return out


def test_rejected_duplicates_keep_their_own_text_and_counts_agree(skip_run, skip_input):
    """Bug 1: a rejected duplicate no longer inherits the winner's scores or loses its text."""
    _, bad = skip_input
    rejects = rejects_by_file(skip_run)
    assert sorted(rejects) == ["chats.jsonl", "messages.jsonl"]  # empty files are no crash
    for name in rejects:  # each reject carries its own raw line
        assert sorted(r["raw"] for r in rejects[name]) == sorted(bad[name])
    scores = pd.read_parquet(skip_run / "scores.parquet")
    manifest = json.loads((skip_run / "manifest.json").read_text())
    read = manifest["counts"]["read"]["rows"]
    assert read == 47 + 5 + 20 == len(scores)
    out = manifest["counts"]["output"]
    assert out["scored"] + out["rejected"] + out["not_sampled"] == read
    assert out["rejected"] == 11 and out["not_sampled"] == 5
    assert out["scored"] == int(scores["loss"].notna().sum()) == 56
    rejected_rows = scores[scores["reject_reason"].notna()]
    assert len(rejected_rows) == 11 and rejected_rows["loss"].isna().all()
    for alpha in (0.2, 0.3, 0.4):
        assert not rejected_rows[f"keep_a{alpha:g}"].any()
        kept = (skip_run / "kept" / f"alpha-{alpha:g}.txt").read_text().splitlines()
        assert len(kept) == len(set(kept)) == out["kept_per_alpha"][f"{alpha:g}"]
    report = (skip_run / "report.md").read_text()
    assert "56 scored, 11 rejected" in report


def test_bad_rows_skipped_and_written_with_their_reasons(skip_run):
    rejects = rejects_by_file(skip_run)["messages.jsonl"]
    assert len(rejects) == 4
    reasons = " ".join(r["reason"] for r in rejects)
    assert "duplicate id 'bad-file-good-row'" in reasons and "wizard" in reasons
    scores = pd.read_parquet(skip_run / "scores.parquet")
    mine = scores[scores["path"].str.endswith("messages.jsonl")]
    assert mine["reject_reason"].notna().sum() == 4
    assert mine.loc[mine["reject_reason"].isna() & mine["sampled"], "loss"].notna().all()


def test_unsampled_rows_are_kept_in_the_outputs_unscored(skip_run):
    """Bug 13 (second half): ``max_rows`` marks rows unsampled, never drops them."""
    scores = pd.read_parquet(skip_run / "scores.parquet")
    accepted = scores["reject_reason"].isna()
    assert int(scores["sampled"].sum()) == 56 and int((accepted & ~scores["sampled"]).sum()) == 5
    assert scores.loc[~scores["sampled"], "loss"].isna().all()
    manifest = json.loads((skip_run / "manifest.json").read_text())
    assert manifest["counts"]["output"]["not_sampled"] == 5


def test_ids_with_spaces_survive_the_kept_list(skip_run):
    """Bug 11: kept lists are read by lines, so an id with a space is one id."""
    kept = read_kept(skip_run, 0.3)
    spaced = [i for i in kept if " " in i]
    assert spaced and all(i.startswith("row ") and i.endswith(" with spaces") for i in spaced)
    scores = pd.read_parquet(skip_run / "scores.parquet")
    assert sorted(kept) == sorted(scores.loc[scores["keep_a0.3"], "id"])
    assert (skip_run / "kept" / "alpha-0.3.txt").read_text().splitlines() == sorted(kept)


def test_resume_with_new_alphas_is_refused_and_stale_kept_files_go(skip_run, skip_input, tmp_path):
    """Bug 3: batches scored before a resume have no column for a new alpha."""
    import shutil

    paths = [str(skip_input[0] / "*.jsonl")]
    run = tmp_path / "run"
    shutil.copytree(skip_run, run)
    resume = tiny_config(paths, run, **SKIP_OVERRIDES, **{"select.alphas": [0.3, 0.5]}).model_copy(
        update={"resume": True}
    )
    with pytest.raises(ConfigError, match=r"select\.alphas: --resume asks for alphas \['0.5'\]"):
        run_select(resume)
    fewer = tiny_config(paths, run, **SKIP_OVERRIDES, **{"select.alphas": [0.3]}).model_copy(
        update={"resume": True}
    )
    run_select(fewer)
    assert sorted(p.name for p in (run / "kept").iterdir()) == [
        "alpha-0.3.parquet",
        "alpha-0.3.txt",
    ]
    assert (run / "kept" / "alpha-0.3.txt").read_text() == (
        skip_run / "kept" / "alpha-0.3.txt"
    ).read_text()


def test_stale_kept_lists_do_not_survive_and_finetune_checks_alpha(skip_run, skip_input, tmp_path):
    """Bug 10: a fresh run clears the old kept lists; finetune checks train.alpha."""
    import shutil

    paths = [str(skip_input[0] / "*.jsonl")]
    run = tmp_path / "run"
    shutil.copytree(skip_run, run)
    run_select(tiny_config(paths, run, **SKIP_OVERRIDES, **{"select.alphas": [0.5]}))
    assert sorted(p.name for p in (run / "kept").iterdir()) == [
        "alpha-0.5.parquet",
        "alpha-0.5.txt",
    ]
    config = tiny_config(paths, tmp_path / "ft").model_copy(deep=True)
    config.train.selection_dir, config.train.alpha = str(run), 0.3
    with pytest.raises(ConfigError, match=r"train\.alpha: 0\.3 is not one of the selection's"):
        selected_ids(config, [])


def test_offline_infobatch_weights_reach_finetuning(
    ray_cluster, pool_subset, shared_data, tmp_path
):
    """Bug 4: offline InfoBatch writes per-row weights and fine-tuning trains with them."""
    out = tmp_path / "sel"
    config = tiny_config(
        [str(pool_subset / "*.jsonl")],
        out,
        **{
            "select.method": "infobatch",
            "select.alphas": [0.3],
            "strata.by": "source",
            "select.calibration_batches": 0,
        },
    )
    run_select(config)
    scores = pd.read_parquet(out / "scores.parquet")
    kept = scores[scores["keep_a0.3"]]
    assert (scores.loc[~scores["keep_a0.3"], "weight_a0.3"] == 0).all()
    assert (kept["weight_a0.3"] >= 1).all() and (kept["weight_a0.3"] > 1).any()
    weights = read_kept(out, 0.3)
    assert weights == dict(zip(kept["id"], kept["weight_a0.3"], strict=True))
    ft = config.model_copy(deep=True)
    ft.train.selection_dir, ft.train.alpha = str(out), 0.3
    ft.eval.paths, ft.eval.max_rows = [str(shared_data / "eval" / "gsm8k.jsonl")], 8
    train, _ = prepare_tables(ft, Manifest("finetune"))
    assert train["weight"] == [weights[i] for i in train["id"]]


def test_nothing_to_read_is_an_error(ray_cluster, tmp_path):
    """Bug 12: empty or whitespace-only files alone are an error (with other files they are no
    crash: the skip run reads both)."""
    empty, blank = tmp_path / "empty.jsonl", tmp_path / "blank.jsonl"
    empty.write_text("")
    blank.write_text("\n   \n\n")
    with pytest.raises(ConfigError, match=r"data\.paths: no rows in"):
        run_select(tiny_config([str(empty), str(blank)], tmp_path / "a"))


def test_truncation_rejects_stop_error_mode(ray_cluster, tmp_path):
    """Bug 13: rows emptied by truncation stop an error-mode run (unsampled rows: the skip run)."""
    path = tmp_path / "long.jsonl"
    long_prompt = " ".join(["word"] * 400)
    rows = qa_rows("short-{i}", 10)
    rows.append({"id": "too-long", "messages": [
        {"role": "user", "content": long_prompt},
        {"role": "assistant", "content": "late answer"},
    ]})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BadRowError, match=r"long\.jsonl:11: no_response_tokens"):
        run_select(tiny_config([str(path)], tmp_path / "a", **{"data.truncation": "right"}))


def test_blocks_a_filter_emptied_do_not_break_fetching(ray_cluster):
    """At 200k rows the calibration filter left a block with no rows and no schema, and
    concatenating it with the others failed (ArrowInvalid: schema at index 1 was different)."""
    import pyarrow as pa
    import ray

    from slap_ray.ray.pool import fetch_table

    rows = pa.table({"batch_id": [7], "input_ids": [[[1, 2]]]})
    refs = [ray.put(rows), ray.put(pa.table({})), ray.put(rows.slice(0, 0))]
    with pytest.raises(pa.ArrowInvalid):
        pa.concat_tables(ray.get(refs))
    assert fetch_table(refs).to_pydict() == rows.to_pydict()
    assert fetch_table(refs[1:]) is None and fetch_table([]) is None
