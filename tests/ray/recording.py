"""Ids that whole pipelines chose, recorded: a refactor must not change which rows a selection
keeps or a training run trains on (issue 29's guard, at the pipeline level; the core-level one is
``tests/unit/test_recorded_kept_ids.py``).

Each test that owns a fixture run compares what it chose with ``data/recorded_ids.json``. Rewrite
an entry only for an intended change of behaviour, by running those tests with
``SLAP_RECORD_IDS=1`` (the run then records instead of comparing, and fails so it is never left
on by mistake).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from filelock import FileLock

RECORDING = Path(__file__).parent / "data" / "recorded_ids.json"


def assert_matches_recording(name: str, chosen: dict[str, list[str]]) -> None:
    """``chosen``: for each key (an alpha, an arm, a step), the ids in the order the run wrote
    them. Order matters where the run defines it (a step's kept ids); lists read from kept-id
    files are sorted by the caller."""
    if os.environ.get("SLAP_RECORD_IDS") == "1":
        with FileLock(str(RECORDING) + ".lock"):
            recorded = json.loads(RECORDING.read_text()) if RECORDING.exists() else {}
            recorded[name] = chosen
            RECORDING.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        raise AssertionError(f"recorded {name!r} into {RECORDING}; unset SLAP_RECORD_IDS")
    recorded = json.loads(RECORDING.read_text())[name]
    assert chosen.keys() == recorded.keys()
    for key, ids in chosen.items():
        assert ids == recorded[key], f"{name} {key}: the ids differ from the recording"
