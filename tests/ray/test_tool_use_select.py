"""A tool-use file round-trips through `slap select` and `slap export`: every field of every
row byte-equal (tools, tool calls with null content, tool results), on a model whose chat
template renders them; on one whose template cannot, the rows are rejected saying why."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
from selections import tiny_config
from tool_use import TOOL_ROW, tool_model_folder

from slap_ray.jobs.export import main_export
from slap_ray.jobs.select import run_select

pytestmark = pytest.mark.ray


def tool_rows(count: int) -> list[dict]:
    rows = []
    for i in range(count):
        row = copy.deepcopy(TOOL_ROW)
        row["id"] = f"tool-{i}"
        row["messages"][0]["content"] = f"What is the weather in city {i}?"
        row["messages"][-1]["content"] = f"It is {10 + i} degrees there."
        rows.append(row)
    plain = {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}
    rows += [{"id": f"plain-{i}", "source": "plain", "messages": list(plain)} for i in range(4)]
    return rows


def test_tool_use_rows_round_trip_through_select_and_export(ray_cluster, tmp_path):
    rows = tool_rows(12)
    pool = tmp_path / "tools.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cheap = {"strata.by": "source", "select.calibration_batches": 0, "select.batch_size": 8}
    config = tiny_config([str(pool)], tmp_path / "run", **cheap, **{"select.alphas": [0.0]})
    config.model.name = str(tool_model_folder(tmp_path / "model"))
    run_select(config)
    scores = pd.read_parquet(tmp_path / "run" / "scores.parquet")
    assert scores["reject_reason"].isna().all() and len(scores) == len(rows)
    out = tmp_path / "kept.jsonl"
    assert main_export([str(tmp_path / "run"), "--alpha", "0", "--output", str(out)]) == 0
    exported = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(exported) == sorted(r["id"] for r in rows)
    for row in rows:
        expected = {"source": "tools", "task": "general", **row}
        assert set(exported[row["id"]]) == set(expected)
        for field, value in expected.items():
            assert json.dumps(exported[row["id"]][field]) == json.dumps(value), (row["id"], field)

    # the default tiny model's plain ChatML template cannot render them: rejected, and said why
    skip = {**cheap, "select.batch_size": 4, "data.on_bad_rows": "skip"}
    plain = tiny_config([str(pool)], tmp_path / "plain", **skip)
    run_select(plain)
    rejected = [
        json.loads(x) for x in (tmp_path / "plain" / "rejected.jsonl").read_text().splitlines()
    ]
    assert len(rejected) == 12
    assert all("cannot render tools, tool_calls, tool" in r["reason"] for r in rejected)
