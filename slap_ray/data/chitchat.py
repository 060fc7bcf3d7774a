"""The embedded default dataset: the Chit Chat Challenge conversations of `chitchat-dataset`.

It ships inside a pip package, so the pipeline has real dialogue data with no hub download. The
package's `__init__` is not imported (it is not needed, and the project installs such asset
packages without their dependencies); only its `dataset.json` is located and read.

`dataset.json` maps conversation ids to `{"messages": [[utterance, ...], ...], ...}`, where each
inner list is one speaker's consecutive utterances (`{"text", "timestamp", "sender"}`); speakers
strictly alternate between inner lists. A *turn* below is one such inner list, its utterances
joined with "\\n".
"""

from __future__ import annotations

import importlib.util
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from slap_ray.vocabulary import CHITCHAT_MODES, ChitchatMode

SOURCE = "chitchat"
TASK = "dialogue"
PACKAGE = "chitchat_dataset"
# Held-out evaluation split: whole conversations (so no pair of one conversation is on both
# sides), chosen by a stable hash of the conversation id: 1 in EVAL_EVERY.
EVAL_EVERY = 50
SPLITS = ("all", "train", "eval")
COUNT_KEYS = (
    "conversations",
    "turns",
    "empty_turns",
    "skipped_pairs",
    "skipped_conversations",
    "rows",
)


def dataset_path() -> Path:
    """Where the installed package keeps `dataset.json`, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {PACKAGE!r} package is not installed; `make install` adds it (chitchat-dataset)"
        )
    path = Path(spec.submodule_search_locations[0]) / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {PACKAGE!r} package")
    return path


def conversation_split(conv_id: str) -> str:
    """``"eval"`` for about 2% of conversations (stable crc32 of the id), else ``"train"``."""
    return "eval" if zlib.crc32(conv_id.encode("utf-8")) % EVAL_EVERY == 0 else "train"


def chitchat_rows(
    mode: ChitchatMode = "pairs",
    max_rows: int | None = None,
    max_turns: int | None = None,
    counts: dict[str, int] | None = None,
    path: str | os.PathLike[str] | None = None,
    split: Literal["all", "train", "eval"] = "all",
) -> Iterator[dict[str, Any]]:
    """Yield normalised rows (source "chitchat", task "dialogue"), conversations sorted by id.

    - `"pairs"`: each adjacent pair of turns (turn i as user, turn i+1 as assistant), id
      `chitchat-{conv_id}-{i:03d}`; a pair touching an empty turn is skipped.
    - `"multiturn"`: the whole conversation, first non-empty speaker as user, roles alternating,
      a trailing user turn dropped; id `chitchat-{conv_id}`. An empty turn is removed and its
      neighbours (the same speaker) are merged so that roles keep alternating.

    `max_turns` caps the turns taken from the start of each conversation, `max_rows` the rows
    yielded. Skips are not silent: pass a dict as `counts` and it is filled (as rows are
    yielded) with the keys of `COUNT_KEYS`. `split` keeps only the conversations of one side of
    the held-out split (`conversation_split`); the counts then cover that side only.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if mode not in CHITCHAT_MODES:
        raise ValueError(f"mode must be one of {CHITCHAT_MODES}, got {mode!r}")
    for name, value in (("max_rows", max_rows), ("max_turns", max_turns)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    stats = counts if counts is not None else {}
    for key in COUNT_KEYS:
        stats[key] = 0
    if max_rows == 0:
        return
    with open(path if path is not None else dataset_path(), encoding="utf-8") as handle:
        data: dict[str, Any] = json.load(handle)
    build = _pairs if mode == "pairs" else _multiturn
    for conv_id in sorted(data):
        if split != "all" and conversation_split(conv_id) != split:
            continue
        turns = [_turn(group) for group in data[conv_id].get("messages", [])]
        if max_turns is not None:
            turns = turns[:max_turns]
        stats["conversations"] += 1
        stats["turns"] += len(turns)
        stats["empty_turns"] += sum(1 for _, text in turns if not text)
        for row in build(conv_id, turns, stats):
            stats["rows"] += 1
            yield row
            if max_rows is not None and stats["rows"] >= max_rows:
                return


def _turn(group: list[dict[str, Any]]) -> tuple[str | None, str]:
    """(sender, text) of one speaker's utterances; blank utterances add nothing to the text."""
    texts = [u.get("text") or "" for u in group]
    text = "\n".join(t for t in texts if t.strip())
    sender = group[0].get("sender") if group else None
    return sender, text


def _row(row_id: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    return {"id": row_id, "source": SOURCE, "task": TASK, "messages": messages}


def _pairs(
    conv_id: str, turns: list[tuple[str | None, str]], stats: dict[str, int]
) -> Iterator[dict[str, Any]]:
    for i in range(len(turns) - 1):
        prompt, reply = turns[i][1], turns[i + 1][1]
        if not prompt or not reply:
            stats["skipped_pairs"] += 1
            continue
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
        yield _row(f"{SOURCE}-{conv_id}-{i:03d}", messages)


def _multiturn(
    conv_id: str, turns: list[tuple[str | None, str]], stats: dict[str, int]
) -> Iterator[dict[str, Any]]:
    merged: list[tuple[str | None, str]] = []
    for sender, text in turns:
        if not text:
            continue
        if merged and merged[-1][0] == sender:
            merged[-1] = (sender, f"{merged[-1][1]}\n{text}")
        else:
            merged.append((sender, text))
    roles = ("user", "assistant")
    messages = [{"role": roles[i % 2], "content": text} for i, (_, text) in enumerate(merged)]
    if messages and messages[-1]["role"] == "user":
        messages.pop()
    if not messages:
        stats["skipped_conversations"] += 1
        return
    yield _row(f"{SOURCE}-{conv_id}", messages)
