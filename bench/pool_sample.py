"""A seeded sample of tokenised rows from the real pool, shared by the feature benches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from slap_ray.data.rows import rows_in_process
from slap_ray.data.tokenize import tokenize_rows


def tokenized_pool_sample(
    pool: str, seed: int, tokenizer, need: int, max_length: int
) -> list[dict[str, Any]]:
    """The first ``need`` rows of a seeded permutation of ``pool/*.jsonl`` that tokenise within
    ``max_length`` (each with ``input_ids``, ``labels`` and ``source``); exits if too few."""
    paths = sorted(Path(pool).glob("*.jsonl"))
    if not paths:
        raise SystemExit(f"no *.jsonl under {pool}: the shared pool is required")
    rows = [
        {"id": row["id"], "source": row["source"], "messages": json.loads(row["messages"])}
        for row in rows_in_process([str(p) for p in paths])
        if row["reject_reason"] is None
    ]
    order = np.random.default_rng(seed).permutation(len(rows))
    picked: list[dict[str, Any]] = []
    for start in range(0, len(order), need):
        chunk = [rows[i] for i in order[start : start + need]]
        source = {row["id"]: row["source"] for row in chunk}
        kept, _ = tokenize_rows(chunk, tokenizer, max_length=max_length)
        picked += [dict(x, source=source[x["id"]]) for x in kept]
        if len(picked) >= need:
            return picked[:need]
    raise SystemExit(f"only {len(picked)} usable rows in the pool, {need} needed")
