"""Schema recognition and normalisation to `{id, source, task, messages}`.

Every later stage (tokenisation, scoring, selection, joins) sees one row shape, so the many
public instruction-data layouts are translated here and nowhere else. Validation is strict on
purpose: a row that would train on nothing (no assistant text) or that a chat template cannot
render (unknown role, system message in the middle, non-text content) is rejected with a reason
rather than discovered later as a crash inside a Ray worker.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from slap_ray.vocabulary import SCHEMAS, Schema  # noqa: E402  (re-exported)

ROLES: frozenset[str] = frozenset({"system", "user", "assistant", "tool"})
# Tool use (OpenAI chat format): carried through every stage and output unchanged.
TOOL_FIELDS = ("tool_calls", "tool_call_id", "name")

# ShareGPT exports name speakers inconsistently; these are the spellings seen in the wild.
SHAREGPT_ROLES: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
}
DEFAULT_TASK = "general"


class RowRejected(ValueError):
    """A record cannot be normalised; `reason` is the human-readable why, without location."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SchemaOptions:
    """How to read records: which layout, which field names, and fallbacks for source/task.

    Frozen so one options object can be shared by Ray tasks and hashed into a run manifest.
    `system_field`, when set, names a top-level field holding a system prompt for the alpaca,
    ShareGPT and prompt/response layouts (the `messages` layout carries its own system turn).
    """

    schema: Schema = "auto"
    prompt_field: str = "prompt"
    response_field: str = "response"
    system_field: str | None = None
    id_field: str = "id"
    source: str | None = None
    task: str | None = None

    def __post_init__(self) -> None:
        if self.schema not in SCHEMAS:
            raise ValueError(
                f"unknown schema {self.schema!r}; expected one of {', '.join(SCHEMAS)}"
            )
        for name in ("prompt_field", "response_field", "id_field"):
            if not getattr(self, name):
                raise ValueError(f"SchemaOptions.{name} must be a non-empty string")


def canonical_json(value: Any) -> str:
    """The one serialisation used for hashing: key order and whitespace cannot change an id."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def content_id(source: str, messages: list[dict[str, str]]) -> str:
    """Stable id for a row without one: the same conversation always gets the same id."""
    digest = hashlib.sha256(canonical_json(messages).encode("utf-8")).hexdigest()
    return f"{source}-{digest[:16]}"


def detect_schema(record: dict[str, Any], options: SchemaOptions) -> str:
    """Pick a layout from the keys that carry a value (see `_present`).

    Priority runs from the most to the least specific layout, so a record that also carries,
    say, a stray `prompt` column next to `messages` is still read as messages.
    """
    if options.schema != "auto":
        return options.schema
    if _present(record, "messages"):
        return "messages"
    if _present(record, "conversations"):
        return "sharegpt"
    if _present(record, "instruction"):
        return "alpaca"
    if _present(record, options.prompt_field) or _present(record, options.response_field):
        return "prompt_response"
    keys = ", ".join(sorted(k for k in record if _present(record, k))) or "none"
    raise RowRejected(
        f"unrecognised schema (keys: {keys}); expected messages, conversations (ShareGPT), "
        f"instruction/output (alpaca) or {options.prompt_field}/{options.response_field}"
    )


def normalize_record(
    record: dict[str, Any], options: SchemaOptions, default_source: str
) -> dict[str, Any]:
    """Return the normalised row for one raw record, or raise `RowRejected` saying why.

    `default_source` is the fallback when neither the record nor the options name a source
    (the ingest layer passes the file stem, so `pool/gsm8k.jsonl` rows come from `gsm8k`).
    """
    if not isinstance(record, dict):
        raise RowRejected(f"expected a JSON object, got {type(record).__name__}")
    schema = detect_schema(record, options)
    if schema == "messages":
        messages = _from_messages(record)
    elif schema == "sharegpt":
        messages = _from_sharegpt(record, options)
    elif schema == "alpaca":
        messages = _from_alpaca(record, options)
    else:
        messages = _from_prompt_response(record, options)
    messages = validate_messages(messages)
    source = _label(record, "source", options.source) or default_source
    task = _label(record, "task", options.task) or DEFAULT_TASK
    row_id = _row_id(record.get(options.id_field), options.id_field)
    if row_id is None:
        row_id = content_id(source, messages)
    row = {"id": row_id, "source": source, "task": task, "messages": messages}
    tools = _maybe_json(record.get("tools"), "tools") if _present(record, "tools") else None
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise RowRejected("field 'tools' must be a list of objects")
        row["tools"] = tools
    return row


def validate_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Check the conversation invariants every chat template and the label masker rely on.

    Empty system messages are dropped (they carry nothing); every other turn must hold text.
    The conversation needs a user turn and must end with a non-empty assistant turn, since the
    training signal is the assistant text and a trailing user turn would never be learned from.
    """
    kept: list[dict[str, str]] = []
    for position, message in enumerate(messages, start=1):
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise RowRejected(f"message {position}: unknown role {role!r}")
        if role == "assistant" and message.get("tool_calls") is not None:
            if not isinstance(message["tool_calls"], list) or not message["tool_calls"]:
                raise RowRejected(f"message {position}: tool_calls must be a non-empty list")
            if content is None or isinstance(content, str):  # a call may come without text
                kept.append(message)
                continue
        if not isinstance(content, str):
            kind = type(content).__name__
            raise RowRejected(f"message {position} ({role}): content must be a string, got {kind}")
        if _has_lone_surrogate(content):
            raise RowRejected(f"message {position} ({role}): content is not valid Unicode")
        if role == "system":
            if position > 1:
                raise RowRejected(f"message {position}: a system message is only allowed first")
            if not content.strip():
                continue
        elif not content.strip() and role != "tool":  # a tool may return nothing
            raise RowRejected(f"message {position} ({role}): empty content")
        kept.append(message)
    if not any(m["role"] == "user" for m in kept):
        raise RowRejected("conversation has no user turn")
    if kept[-1]["role"] != "assistant":
        raise RowRejected("conversation must end with an assistant turn")
    return kept


def _present(record: dict[str, Any], key: str) -> bool:
    """Columnar files hold None, and CSV files "", where a row has no value for a column."""
    value = record.get(key)
    return value is not None and value != ""


def _maybe_json(value: Any, field: str) -> Any:
    """CSV cells and string columns hold nested lists as JSON text; decode them here."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise RowRejected(f"field {field!r} is a string but not valid JSON: {exc}") from None


def _required_text(record: dict[str, Any], field: str) -> str:
    value = record.get(field)
    if value is None:
        raise RowRejected(f"missing field {field!r}")
    if not isinstance(value, str):
        raise RowRejected(f"field {field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowRejected(f"field {field!r} is empty")
    return value


def _optional_text(record: dict[str, Any], field: str | None) -> str:
    if field is None or record.get(field) is None:
        return ""
    value = record[field]
    if not isinstance(value, str):
        raise RowRejected(f"field {field!r} must be a string, got {type(value).__name__}")
    return value


def _list_of_objects(record: dict[str, Any], field: str) -> list[dict[str, Any]]:
    if not _present(record, field):
        raise RowRejected(f"missing field {field!r}")
    value = _maybe_json(record[field], field)
    if value is None:
        raise RowRejected(f"missing field {field!r}")
    if not isinstance(value, list):
        raise RowRejected(f"field {field!r} must be a list, got {type(value).__name__}")
    if not value:
        raise RowRejected(f"field {field!r} is empty")
    for position, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            kind = type(item).__name__
            raise RowRejected(f"{field}[{position}] must be an object, got {kind}")
    return value


def _from_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    messages = []
    for position, item in enumerate(_list_of_objects(record, "messages"), start=1):
        if "role" not in item or ("content" not in item and "tool_calls" not in item):
            raise RowRejected(f"message {position}: needs both 'role' and 'content'")
        if not isinstance(item["role"], str):
            raise RowRejected(f"message {position}: role must be a string")
        message = {"role": item["role"], "content": _text_of(item.get("content"), position)}
        for field in TOOL_FIELDS:
            if item.get(field) is not None:
                value = item[field]
                message[field] = _maybe_json(value, field) if field == "tool_calls" else value
        messages.append(message)
    return messages


def _text_of(content: Any, position: int) -> Any:
    """OpenAI content parts of type text, joined; any other part type is rejected by name."""
    parts = isinstance(content, list) and all(isinstance(p, dict) and "type" in p for p in content)
    if not parts or not content:
        return content
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RowRejected(f"message {position}: content part of type {kind!r} (text only)")
        texts.append(part["text"])
    return "".join(texts)


def _with_system(record: dict[str, Any], options: SchemaOptions) -> list[dict[str, Any]]:
    system = _optional_text(record, options.system_field)
    return [{"role": "system", "content": system}] if system.strip() else []


def _from_sharegpt(record: dict[str, Any], options: SchemaOptions) -> list[dict[str, Any]]:
    messages = _with_system(record, options)
    for position, turn in enumerate(_list_of_objects(record, "conversations"), start=1):
        if "from" not in turn or "value" not in turn:
            raise RowRejected(f"conversations[{position}]: needs both 'from' and 'value'")
        speaker = turn["from"]
        role = SHAREGPT_ROLES.get(speaker.strip().lower()) if isinstance(speaker, str) else None
        if role is None:
            raise RowRejected(f"conversations[{position}]: unknown speaker {speaker!r}")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _from_alpaca(record: dict[str, Any], options: SchemaOptions) -> list[dict[str, Any]]:
    instruction = _required_text(record, "instruction")
    extra = _optional_text(record, "input")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    output = _required_text(record, "output")
    return [
        *_with_system(record, options),
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": output},
    ]


def _from_prompt_response(record: dict[str, Any], options: SchemaOptions) -> list[dict[str, Any]]:
    prompt = _required_text(record, options.prompt_field)
    response = _required_text(record, options.response_field)
    return [
        *_with_system(record, options),
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": response},
    ]


def _label(record: dict[str, Any], field: str, fallback: str | None) -> str | None:
    value = record.get(field)
    if value is None or value == "":
        return fallback
    if not isinstance(value, str):
        raise RowRejected(f"field {field!r} must be a string, got {type(value).__name__}")
    return value


def _row_id(value: Any, field: str) -> str | None:
    """Ids are strings; integer ids (common in CSV/Parquet exports) are converted, not rejected."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RowRejected(
            f"field {field!r} must be a string or an integer, got {type(value).__name__}"
        )
    return check_id(str(value), field)


def check_id(row_id: str, field: str = "id") -> str:
    """Ids travel through line-based kept lists: one with a line break or surrounding whitespace
    could not be read back as itself, so it is rejected here with the reason."""
    if row_id.strip() != row_id or row_id.splitlines() != [row_id]:
        raise RowRejected(
            f"field {field!r}: id {row_id!r} has a line break or leading/trailing whitespace "
            "and cannot round-trip through a kept list"
        )
    return row_id


def _has_lone_surrogate(text: str) -> bool:
    """JSON `\\ud800` escapes decode to text that cannot be written back as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
