"""Ingestion: every reader, every schema, stable ids, and every bad-input case, read as the
pipeline reads rows (slap_ray.data.rows)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slap_ray.data.ingest import (
    BadRowError,
    RowRejected,
    SchemaOptions,
    canonical_json,
    expand_paths,
    iter_raw_records,
    make_reject,
    normalize_record,
    source_for_path,
    write_rejected,
)
from slap_ray.data.rows import (
    ROW_COLUMNS,
    bad_row_error,
    origin_key,
    read_file_rows,
    reject_duplicates,
    rows_in_process,
)
from slap_ray.jobs.rows import raw_text

CHAT = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]


def _row(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"r{i}",
        "messages": [*CHAT[:1], {"role": "assistant", "content": f"A{i}"}],
        **extra,
    }


def _jsonl(path: Path, *items: Any) -> Path:
    """Write items as lines; a str is written verbatim, bytes raw, anything else as JSON."""
    with path.open("wb") as handle:
        for item in items:
            if isinstance(item, bytes):
                handle.write(item + b"\n")
            elif isinstance(item, str):
                handle.write(item.encode() + b"\n")
            else:
                handle.write(json.dumps(item).encode() + b"\n")
    return path


def _norm(record: dict[str, Any], **options: Any) -> dict[str, Any]:
    return normalize_record(record, SchemaOptions(**options), "stem")


def _read(paths: Any, fmt: str = "auto") -> tuple[list[dict], list[dict]]:
    """(accepted, rejected) rows of `paths`, duplicates marked, in (path, line) order."""
    rows = rows_in_process(paths, SchemaOptions(), fmt)
    accepted = [r for r in rows if r["reject_reason"] is None]
    return accepted, [r for r in rows if r["reject_reason"] is not None]


def _clean(paths: Any, fmt: str = "auto") -> list[dict]:
    """The rows of inputs that `on_bad_rows: error` lets through: none may be rejected."""
    accepted, rejected = _read(paths, fmt)
    assert rejected == []
    return accepted


def _messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    return json.loads(row["messages"])


# --- readers -----------------------------------------------------------------------------------


def test_jsonl_keeps_physical_line_numbers_and_skips_blank_lines(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", _row(1), "", "   ", _row(2))
    raws = list(iter_raw_records(path))
    assert [(r.line, r.record["id"], r.error) for r in raws] == [(1, "r1", None), (4, "r2", None)]
    assert raws[0].raw == json.dumps(_row(1)) and raws[0].path == str(path)


def test_rows_without_ids_get_file_stem_source_and_hash_ids(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "gsm8k.jsonl", {"prompt": "1+1?", "response": "2"})
    (row,) = read_file_rows({"path": str(path)}, SchemaOptions(), "auto")
    assert row["reject_reason"] is None
    assert row["source"] == "gsm8k" and row["task"] == "general"
    assert row["id"].startswith("gsm8k-") and len(row["id"]) == len("gsm8k-") + 16
    assert source_for_path("pool/gsm8k.jsonl") == "gsm8k"


def test_json_array_uses_row_indices(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps([_row(1), _row(2)], indent=2))
    assert [r["id"] for r in _clean(str(path))] == ["r1", "r2"]
    assert [r.line for r in iter_raw_records(path)] == [0, 1]


def test_json_extension_holding_json_lines_is_read_as_jsonl(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "a.json", _row(1), _row(2))
    assert [r.line for r in iter_raw_records(path)] == [1, 2]
    assert len(_clean(str(path))) == 2


def test_parquet_with_nested_messages_and_null_columns(tmp_path: Path) -> None:
    path = tmp_path / "mixed.parquet"
    table = pa.Table.from_pylist(
        [
            {**_row(1), "instruction": None, "input": None, "output": None},
            {"id": "a1", "instruction": "Add 2+2", "input": None, "output": "4", "messages": None},
        ]
    )
    pq.write_table(table, path)
    rows = _clean(str(path))
    assert _messages(rows[0]) == _row(1)["messages"]
    assert _messages(rows[1])[0]["content"] == "Add 2+2"
    assert [r.line for r in iter_raw_records(path)] == [0, 1]
    assert {r["source"] for r in rows} == {"mixed"}


def test_csv_multiline_field_line_numbers_and_json_messages_column(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    messages = json.dumps(CHAT).replace('"', '""')
    path.write_text(
        "id,instruction,input,output,messages\n"
        'c1,"Line one\nline two",,Out,\n'
        f'c2,,,,"{messages}"\n',
        encoding="utf-8",
    )
    raws = list(iter_raw_records(path))
    assert [r.line for r in raws] == [2, 4]
    assert raws[0].raw == 'c1,"Line one\nline two",,Out,'
    rows = _clean(str(path))
    assert _messages(rows[0])[0]["content"] == "Line one\nline two"
    assert _messages(rows[1]) == CHAT


def test_hf_save_to_disk_directory(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "hfset"
    datasets.Dataset.from_list([_row(1), _row(2)]).save_to_disk(str(folder))
    rows = _clean(str(folder))
    assert [r["id"] for r in rows] == ["r1", "r2"]
    assert rows[0]["source"] == "hfset"
    assert [r.line for r in iter_raw_records(folder)] == [0, 1]


def test_hf_dataset_dict_is_a_reject_not_a_crash(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([_row(1)])}).save_to_disk(str(folder))
    accepted, rejected = _read(str(folder))
    assert accepted == [] and "DatasetDict" in rejected[0]["reject_reason"]
    assert len(_clean(str(folder / "train"))) == 1


def test_format_override_and_unknown_extension(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "data.txt", _row(1))
    with pytest.raises(ValueError, match="data.txt"):
        _read(str(path))
    assert len(_clean(str(path), fmt="jsonl")) == 1
    with pytest.raises(ValueError, match="unknown format"):
        list(iter_raw_records(path, format="xml"))  # type: ignore[arg-type]


def test_expand_paths_sorts_globs_and_names_missing_patterns(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a.jsonl", "c.csv"):
        (tmp_path / name).write_text("")
    got = expand_paths(
        [str(tmp_path / "c.csv"), str(tmp_path / "*.jsonl"), str(tmp_path / "a.jsonl")]
    )
    assert got == sorted(got) and [Path(p).name for p in got] == ["a.jsonl", "b.jsonl", "c.csv"]
    with pytest.raises(FileNotFoundError, match=r"nothing\*\.jsonl"):
        expand_paths(str(tmp_path / "nothing*.jsonl"))
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        expand_paths([str(tmp_path / "absent.jsonl")])


def test_result_does_not_depend_on_listing_order(tmp_path: Path) -> None:
    a = _jsonl(tmp_path / "a.jsonl", _row(1), _row(2))
    b = _jsonl(tmp_path / "b.jsonl", _row(2), _row(3))
    assert rows_in_process([str(b), str(a)]) == rows_in_process([str(a), str(b)])
    accepted, rejected = _read([str(b), str(a)])
    assert [r["id"] for r in accepted] == ["r1", "r2", "r3"]
    assert rejected[0]["path"] == str(b) and rejected[0]["line"] == 1


def test_duplicate_rule_on_a_block_keeps_the_first_origin_and_earlier_rejects() -> None:
    """The block step ray.pool.mark_duplicates runs, with its table of duplicated ids only."""
    batch = pd.DataFrame(
        [
            {"id": "d", "path": "b.jsonl", "line": 1, "reject_reason": None},
            {"id": "d", "path": "a.jsonl", "line": 10, "reject_reason": None},
            {"id": "d", "path": "a.jsonl", "line": 12, "reject_reason": "malformed JSON"},
            {"id": "u", "path": "a.jsonl", "line": 11, "reject_reason": None},
        ]
    )
    first = {"d": origin_key(pd.Series(["a.jsonl"]), pd.Series([10])).iat[0]}
    reasons = reject_duplicates(batch, first)["reject_reason"].tolist()
    assert reasons == ["duplicate id 'd' (first seen at a.jsonl:10)", None, "malformed JSON", None]


# --- schemas -----------------------------------------------------------------------------------


def test_alpaca_with_and_without_input() -> None:
    with_input = _norm({"instruction": "Translate", "input": "Hallo", "output": "Hello"})
    assert with_input["messages"] == [
        {"role": "user", "content": "Translate\n\nHallo"},
        {"role": "assistant", "content": "Hello"},
    ]
    for blank in ({}, {"input": ""}, {"input": "  "}, {"input": None}):
        row = _norm({"instruction": "Say hi", "output": "hi", **blank})
        assert row["messages"][0] == {"role": "user", "content": "Say hi"}


def test_sharegpt_three_turns_with_system() -> None:
    record = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
        ]
    }
    assert _norm(record)["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]


@pytest.mark.parametrize(
    ("speaker", "role"),
    [("human", "user"), ("user", "user"), ("gpt", "assistant"), ("assistant", "assistant"),
     ("chatgpt", "assistant"), ("bing", "assistant"), ("bard", "assistant")],
)  # fmt: skip
def test_sharegpt_speaker_names(speaker: str, role: str) -> None:
    turns = [{"from": "human", "value": "Q"}, {"from": speaker, "value": "X"}]
    if role == "user":
        turns.append({"from": "gpt", "value": "A"})
    assert _norm({"conversations": turns})["messages"][1]["role"] == role


def test_messages_layout_passes_through_and_drops_extra_keys() -> None:
    """Unknown message keys are dropped; the tool-use fields (here `name`) are carried."""
    record = {
        "id": "m",
        "source": "s",
        "task": "t",
        "messages": [{**CHAT[0], "name": "x", "weight": 2}, CHAT[1]],
    }
    messages = [{**CHAT[0], "name": "x"}, CHAT[1]]
    assert _norm(record) == {"id": "m", "source": "s", "task": "t", "messages": messages}


def test_prompt_response_with_custom_field_names_and_system() -> None:
    options = {"prompt_field": "question", "response_field": "answer", "system_field": "sys"}
    row = _norm({"question": "Q", "answer": "A", "sys": "Be kind."}, **options)
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    assert _norm({"prompt": "Q", "response": "A"})["messages"][1]["content"] == "A"


def test_explicit_schema_overrides_detection() -> None:
    record = {"messages": "not used", "prompt": "Q", "response": "A"}
    with pytest.raises(RowRejected, match="not valid JSON"):
        _norm(record)
    assert _norm(record, schema="prompt_response")["messages"][0]["content"] == "Q"
    with pytest.raises(ValueError, match="unknown schema"):
        SchemaOptions(schema="oasst")  # type: ignore[arg-type]


def test_source_and_task_precedence() -> None:
    record = {"prompt": "Q", "response": "A"}
    assert (_norm(record)["source"], _norm(record)["task"]) == ("stem", "general")
    opts = {"source": "opt", "task": "qa"}
    assert (_norm(record, **opts)["source"], _norm(record, **opts)["task"]) == ("opt", "qa")
    own = _norm({**record, "source": "own", "task": "math"}, **opts)
    assert (own["source"], own["task"]) == ("own", "math")


def test_integer_ids_become_strings_and_id_field_is_configurable() -> None:
    assert _norm({"id": 7, "prompt": "Q", "response": "A"})["id"] == "7"
    assert _norm({"uid": "u1", "prompt": "Q", "response": "A"}, id_field="uid")["id"] == "u1"


def test_missing_id_is_a_stable_content_hash() -> None:
    row = _norm({"prompt": "Q", "response": "A"}, source="src")
    canonical = json.dumps(
        row["messages"], sort_keys=True, ensure_ascii=False, separators=(",", ":")
    )
    assert canonical == canonical_json(row["messages"])
    assert row["id"] == "src-" + hashlib.sha256(canonical.encode()).hexdigest()[:16]
    # the same conversation in another layout and key order gets the same id ...
    same = _norm(
        {"messages": [{"content": "Q", "role": "user"}, {"role": "assistant", "content": "A"}]},
        source="src",
    )
    assert same["id"] == row["id"]
    # ... while a different answer or source does not
    assert _norm({"prompt": "Q", "response": "B"}, source="src")["id"] != row["id"]
    assert _norm({"prompt": "Q", "response": "A"}, source="other")["id"].startswith("other-")


# --- bad input ---------------------------------------------------------------------------------

BAD_LINES: dict[str, tuple[Any, str]] = {
    "malformed_json": ('{"id": "x", "messages": [', "malformed JSON"),
    "not_an_object": ([1, 2, 3], "expected a JSON object, got list"),
    "missing_field": ({"instruction": "Q"}, "missing field 'output'"),
    "empty_field": ({"instruction": " ", "output": "A"}, "field 'instruction' is empty"),
    "empty_messages": ({"messages": []}, "field 'messages' is empty"),
    "unknown_role": (
        {"messages": [{"role": "function", "content": "x"}, *CHAT]},
        "unknown role 'function'",
    ),
    "non_string_content": (
        {"messages": [CHAT[0], {"role": "assistant", "content": ["x"]}]},
        "content must be a string, got list",
    ),
    "null_content": (
        {"messages": [CHAT[0], {"role": "assistant", "content": None}]},
        "got NoneType",
    ),
    "invalid_utf8": (b'{"prompt": "caf\xe9", "response": "A"}', "invalid UTF-8"),
    "lone_surrogate": ('{"prompt": "\\ud800", "response": "A"}', "not valid Unicode"),
    "unrecognised_schema": ({"question": "Q", "answer": "A"}, "unrecognised schema"),
    "duplicate_id": (_row(1), "duplicate id 'r1' (first seen at "),
    "system_not_first": (
        {"messages": [*CHAT, {"role": "system", "content": "s"}, CHAT[1]]},
        "only allowed first",
    ),
    "no_user_turn": ({"messages": [{"role": "system", "content": "s"}, CHAT[1]]}, "no user turn"),
    "ends_with_user": ({"messages": [*CHAT, CHAT[0]]}, "must end with an assistant turn"),
    "empty_assistant": (
        {"messages": [CHAT[0], {"role": "assistant", "content": ""}]},
        "empty content",
    ),
    "unknown_speaker": (
        {"conversations": [{"from": "alien", "value": "x"}]},
        "unknown speaker 'alien'",
    ),
    "bad_id_type": ({"id": 1.5, "prompt": "Q", "response": "A"}, "must be a string or an integer"),
}


@pytest.fixture(params=sorted(BAD_LINES))
def bad_file(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str]:
    """A JSONL file whose line 2 is bad between two good lines."""
    bad, reason = BAD_LINES[request.param]
    return _jsonl(tmp_path / "pool.jsonl", _row(1), bad, _row(3)), reason


def test_bad_row_error_mode_names_file_line_and_reason(bad_file: tuple[Path, str]) -> None:
    path, reason = bad_file
    _, rejected = _read(str(path))
    error = bad_row_error(rejected[0])  # what `on_bad_rows: error` raises for the first reject
    message = str(error)
    assert isinstance(error, BadRowError)
    assert message.startswith(f"{path}:2: ") and "pool.jsonl" in message and reason in message
    assert (error.path, error.line) == (str(path), 2)


def test_bad_row_skip_mode_writes_rejected_jsonl(
    bad_file: tuple[Path, str], tmp_path: Path
) -> None:
    path, reason = bad_file
    accepted, rejected = _read(str(path))
    assert [r["id"] for r in accepted] == ["r1", "r3"]
    assert len(list(iter_raw_records(path))) == len(accepted) + len(rejected) == 3
    assert {r["path"] for r in accepted + rejected} == {str(path)} and len(rejected) == 1
    # the reject records `slap select` writes: a duplicate's own line is read again (raw_text)
    frame = pd.DataFrame(rejected)
    texts = raw_text(frame, "auto")
    records = [
        make_reject(r["path"], r["line"], r["reject_reason"], text)
        for r, text in zip(rejected, texts, strict=True)
    ]
    (tmp_path / "out").mkdir()
    written = write_rejected(records, tmp_path / "out")
    assert written == tmp_path / "out" / "rejected.jsonl"
    (reject,) = [json.loads(line) for line in written.read_text(encoding="utf-8").splitlines()]
    assert reject["path"] == str(path) and reject["line"] == 2 and reason in reject["reason"]
    assert isinstance(reject["raw"], str) and reject["raw"]


def test_invalid_utf8_raw_text_is_kept_readable(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", b'{"prompt": "caf\xe9"}')
    (reject,) = _read(str(path))[1]
    assert reject["raw"] == '{"prompt": "caf\\xe9"}'


@pytest.mark.parametrize(
    ("name", "content", "line", "reason"),
    [
        ("a.json", b'[{"prompt": "Q", "response": "A"}, 5]', 1, "expected a JSON object, got int"),
        ("a.json", b'[{"prompt": "Q", ', 0, "malformed JSON file"),
        ("a.csv", b"prompt,response\nQ,A\ncaf\xe9,A\n", 3, "invalid UTF-8"),
        (
            "a.csv",
            b"prompt,response\nQ,A\nQ,A,extra\n",
            3,
            "CSV row has 3 fields, the header has 2",
        ),
        ("a.csv", b"prompt,prompt\nQ,A\n", 1, "repeated column name"),
        ("a.parquet", b"PAR1 not really parquet", 0, "unreadable Parquet file"),
    ],
)
def test_file_format_specific_bad_input(
    tmp_path: Path, name: str, content: bytes, line: int, reason: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    accepted, rejected = _read(str(path))
    assert re.search(f"{name}:{line}: .*{reason}", str(bad_row_error(rejected[0])))
    assert len(list(iter_raw_records(path))) == len(accepted) + len(rejected)
    assert rejected[-1]["line"] == line and reason in rejected[-1]["reject_reason"]


def test_make_reject_and_write_rejected_to_a_file(tmp_path: Path) -> None:
    reject = make_reject(
        tmp_path / "x.jsonl", 4, "no response tokens left after truncation", {"a": 1}
    )
    assert reject == {
        "path": str(tmp_path / "x.jsonl"),
        "line": 4,
        "reason": "no response tokens left after truncation",
        "raw": '{"a": 1}',
    }
    target = write_rejected([reject], tmp_path / "sub" / "rejected.jsonl")
    assert json.loads(target.read_text()) == reject
    assert write_rejected([], tmp_path).read_text() == ""


# --- the real pool -----------------------------------------------------------------------------


def test_real_pool_is_accepted_whole(shared_data: Path) -> None:
    files = sorted((shared_data / "pool").glob("*.jsonl"))
    rows = _clean(str(shared_data / "pool" / "*.jsonl"))
    assert sum(len(list(iter_raw_records(p))) for p in files) == len(rows) == 18_352
    ids = [row["id"] for row in rows]
    assert len(set(ids)) == len(ids)
    for row in rows:
        # no normalised row carries more than id, source, task and messages (no tool definitions)
        assert set(row) == set(ROW_COLUMNS) and row["tools"] == ""
        messages = _messages(row)
        assert messages[-1]["role"] == "assistant"
        assert {m["role"] for m in messages} <= {"system", "user", "assistant"}
    assert {row["source"] for row in rows} == {p.stem for p in files}
