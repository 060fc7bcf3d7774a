"""Per-stage, per-shard seeds: a run's randomness never depends on global RNG state or on
how work is split across processes."""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(seed: int, stage: str, *keys: object) -> int:
    """A 63-bit seed from the run seed, a stage name and any keys (shard, batch id, ...)."""
    text = "|".join([str(int(seed)), stage, *map(str, keys)])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def derive_rng(seed: int, stage: str, *keys: object) -> np.random.Generator:
    """A numpy Generator seeded with ``derive_seed``."""
    return np.random.default_rng(derive_seed(seed, stage, *keys))


def id_rank_key(seed: int, stage: str, row_id: str) -> int:
    """A seeded pseudo-random key for a row id: sorting by it gives a sample or shuffle that
    depends only on the set of ids, not on their order or on how they are sharded."""
    return derive_seed(seed, stage, row_id)
