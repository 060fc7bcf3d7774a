"""The embedded chitchat dataset: real package data plus a tiny synthetic file for edge cases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from slap_ray.data.chitchat import COUNT_KEYS, chitchat_rows, dataset_path
from slap_ray.data.schemas import validate_messages


@pytest.fixture(scope="module")
def pairs() -> tuple[list[dict[str, Any]], dict[str, int]]:
    counts: dict[str, int] = {}
    return list(chitchat_rows("pairs", counts=counts)), counts


@pytest.fixture(scope="module")
def multiturn() -> tuple[list[dict[str, Any]], dict[str, int]]:
    counts: dict[str, int] = {}
    return list(chitchat_rows("multiturn", counts=counts)), counts


def test_dataset_is_located_without_importing_the_package() -> None:
    code = (
        "import sys; from slap_ray.data.chitchat import dataset_path; p = dataset_path(); "
        "assert 'chitchat_dataset' not in sys.modules; print(p)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()) == dataset_path()
    assert dataset_path().parent.name == "chitchat_dataset" and dataset_path().is_file()


def test_pairs_cover_every_adjacent_turn(
    pairs: tuple[list[dict[str, Any]], dict[str, int]],
) -> None:
    rows, counts = pairs
    assert len(rows) > 100_000 and counts["rows"] == len(rows)
    # every conversation of n turns offers n - 1 pairs; each one is either a row or a counted skip
    assert counts["rows"] + counts["skipped_pairs"] == counts["turns"] - counts["conversations"]
    assert counts["empty_turns"] > 0 and counts["skipped_pairs"] > 0
    ids = [row["id"] for row in rows]
    assert len(set(ids)) == len(ids)


def test_first_pair_rows_structure(pairs: tuple[list[dict[str, Any]], dict[str, int]]) -> None:
    rows, _ = pairs
    for row in rows[:50]:
        assert set(row) == {"id", "source", "task", "messages"}
        assert (row["source"], row["task"]) == ("chitchat", "dialogue")
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert validate_messages(row["messages"]) == row["messages"]
    first_conv = rows[0]["id"].rsplit("-", 1)[0]
    assert rows[0]["id"] == f"{first_conv}-000" and rows[1]["id"] == f"{first_conv}-001"
    # the assistant of pair i is the user of pair i + 1
    assert rows[0]["messages"][1]["content"] == rows[1]["messages"][0]["content"]


def test_multiturn_alternates_and_ends_with_assistant(
    multiturn: tuple[list[dict[str, Any]], dict[str, int]],
) -> None:
    rows, counts = multiturn
    assert counts["rows"] == len(rows) > 1000
    assert counts["rows"] + counts["skipped_conversations"] == counts["conversations"]
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert validate_messages(row["messages"]) == row["messages"]
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    assert all(r["id"].startswith("chitchat-") and r["id"].count("-") == 5 for r in rows)


def test_deterministic_and_limits(pairs: tuple[list[dict[str, Any]], dict[str, int]]) -> None:
    rows, _ = pairs
    counts: dict[str, int] = {}
    assert list(chitchat_rows("pairs", max_rows=500, counts=counts)) == rows[:500]
    assert counts["rows"] == 500
    capped = list(chitchat_rows("multiturn", max_rows=20, max_turns=4))
    assert len(capped) == 20 and all(len(r["messages"]) <= 4 for r in capped)
    assert list(chitchat_rows(max_rows=0)) == []
    with pytest.raises(ValueError, match="mode"):
        list(chitchat_rows("triples"))  # type: ignore[arg-type]


def _utt(text: str, sender: str) -> dict[str, str]:
    return {"text": text, "timestamp": "2018-05-05T21:01:14Z", "sender": sender}


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """Two-speaker conversations with an empty middle turn, a trailing user, a lone turn."""
    data = {
        "b": {"messages": [[_utt("hi", "x"), _utt("", "x"), _utt("there", "x")], [_utt("yo", "y")], [_utt("", "x")],
                           [_utt("so", "y")], [_utt("bye", "x")]]},
        "a": {"messages": [[_utt("alone", "x")]]},
        "c": {"messages": [[_utt("", "x")], [_utt("q", "y")], [_utt("r", "x")]]},
    }  # fmt: skip
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(data))
    return path


def test_pairs_skip_empty_turns_and_join_utterances(tiny: Path) -> None:
    counts: dict[str, int] = {}
    rows = list(chitchat_rows("pairs", counts=counts, path=tiny))
    assert [r["id"] for r in rows] == ["chitchat-b-000", "chitchat-b-003", "chitchat-c-001"]
    assert rows[0]["messages"][0]["content"] == "hi\nthere"
    assert counts == {"conversations": 3, "turns": 9, "empty_turns": 2, "skipped_pairs": 3,
                      "skipped_conversations": 0, "rows": 3}  # fmt: skip
    assert set(counts) == set(COUNT_KEYS)


def test_multiturn_merges_around_empty_turns_and_drops_trailing_user(tiny: Path) -> None:
    counts: dict[str, int] = {}
    rows = {r["id"]: r["messages"] for r in chitchat_rows("multiturn", counts=counts, path=tiny)}
    assert rows["chitchat-b"] == [
        {"role": "user", "content": "hi\nthere"},
        {"role": "assistant", "content": "yo\nso"},
    ]  # "bye" was a trailing user turn
    assert rows["chitchat-c"] == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "r"},
    ]
    assert "chitchat-a" not in rows and counts["skipped_conversations"] == 1


def test_eval_split_holds_out_whole_conversations(
    pairs: tuple[list[dict[str, Any]], dict[str, int]],
) -> None:
    rows, _ = pairs
    train = {r["id"] for r in chitchat_rows("pairs", split="train")}
    held_out = {r["id"] for r in chitchat_rows("pairs", split="eval")}
    assert train.isdisjoint(held_out) and train | held_out == {r["id"] for r in rows}
    assert 0.01 < len(held_out) / len(rows) < 0.03  # about 1 conversation in 50

    def conversation(row_id: str) -> str:
        return row_id.rsplit("-", 1)[0]

    assert {conversation(i) for i in train}.isdisjoint({conversation(i) for i in held_out})
    with pytest.raises(ValueError, match="split"):
        list(chitchat_rows("pairs", split="test"))
