"""Tool-use rows (OpenAI chat format) keep every field through normalisation, tokenisation and
export; a chat template that cannot render them rejects the row saying so (no Ray)."""

from __future__ import annotations

import copy
import json

import pytest
from tool_use import CALL, TOOL_ROW, tool_model_folder

from slap_ray.assets import load_tokenizer
from slap_ray.data.schemas import RowRejected, SchemaOptions, normalize_record
from slap_ray.data.tokenize import ChatTemplateError, tokenize_conversation, tokenize_rows
from slap_ray.jobs.export import as_read
from slap_ray.jobs.select import _stored


def test_a_tool_use_row_is_normalised_without_losing_a_field():
    row = normalize_record(copy.deepcopy(TOOL_ROW), SchemaOptions(), "x")
    assert row == TOOL_ROW  # tools, tool_calls with null content, tool_call_id: all kept
    as_columns = copy.deepcopy(TOOL_ROW)
    as_columns["tools"] = json.dumps(TOOL_ROW["tools"])  # Parquet/CSV hold JSON text
    assert normalize_record(as_columns, SchemaOptions(), "x") == TOOL_ROW


def test_content_parts_become_text_and_other_parts_are_named():
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    record = {
        "messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "Hi"}]
    }
    assert normalize_record(record, SchemaOptions(), "x")["messages"][0]["content"] == "Hello there"
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    record["messages"][0]["content"] = image
    with pytest.raises(RowRejected, match="content part of type 'image_url' \\(text only\\)"):
        normalize_record(record, SchemaOptions(), "x")


def test_a_template_without_tool_support_rejects_the_row_with_the_reason():
    tokenizer = load_tokenizer("tiny-bpe")  # plain ChatML: no tools, no tool calls
    with pytest.raises(ChatTemplateError, match="cannot render tools, tool_calls, tool"):
        tokenize_conversation(TOOL_ROW["messages"], tokenizer, 512, tools=TOOL_ROW["tools"])
    kept, rejected = tokenize_rows([TOOL_ROW], tokenizer, 512)
    assert not kept and rejected[0]["reason"].startswith("chat_template: this model's chat")


def test_labels_cover_the_tool_call_turn_and_not_the_tool_result(tmp_path):
    tokenizer = load_tokenizer(str(tool_model_folder(tmp_path / "model")))
    example = tokenize_conversation(TOOL_ROW["messages"], tokenizer, 1024, tools=TOOL_ROW["tools"])
    labelled = tokenizer.decode([t for t, lab in zip(example.input_ids, example.labels, strict=True)
                                 if lab != -100])  # fmt: skip
    assert "<tool_call>" in labelled and '"get_weather"' in labelled  # the call is trained on
    assert "It is 18 degrees in Paris." in labelled
    assert '{"temp": 18}' not in labelled and "Tools:" not in labelled  # tool output, tools: not
    full = tokenizer.decode(example.input_ids)
    assert '{"temp": 18}' in full and "Tools:" in full


def test_selected_rows_export_as_they_were_read():
    stored = {
        **{k: TOOL_ROW[k] for k in ("id", "source", "task")},
        "messages": [
            {"role": m["role"], "content": m["content"], "tool_calls": None, "tool_call_id": None,
             "name": None, **_stored(m)}
            for m in TOOL_ROW["messages"]
        ],
        "tools": json.dumps(TOOL_ROW["tools"]),
    }  # fmt: skip
    assert stored["messages"][1]["tool_calls"] == json.dumps([CALL])
    exported = as_read(stored)
    assert set(exported) == set(TOOL_ROW)
    for field, value in TOOL_ROW.items():  # every field byte-equal to what was read
        assert json.dumps(exported[field]) == json.dumps(value), field
