"""The tiny selection config that the Ray tests share, and its kept ids."""

from __future__ import annotations

import json
from pathlib import Path

from slap_ray.config import build_config

ALPHAS = [0.2, 0.3, 0.4]


def tiny_config(paths: list[str], output_dir: Path, **extra: object):
    """The tiny model (512-token vocabulary) on real rows: embedding strata, calibration,
    three alphas. Tests whose stage is not under test pass cheaper settings in ``extra``."""
    overrides = [f"{k}={json.dumps(v)}" for k, v in extra.items()]
    return build_config(
        {
            "output_dir": str(output_dir),
            "progress": False,
            "data": {"paths": paths, "max_length": 96},
            "model": {"name": "tiny-bpe"},
            # Embed calls of 64 rows (batch_size x EMBED_CALL_BATCHES): three calls over the
            # 160-row pool, so a kill after the first leaves a partial embed to resume.
            "embed": {"max_chars": 256, "batch_size": 1},
            "strata": {"num_clusters": 4},
            "select": {"batch_size": 16, "alphas": ALPHAS, "calibration_batches": 2},
            "score": {"num_scorers": 1, "micro_batch_size": 8},
        },
        overrides,
    )


def kept_ids(run_dir: Path) -> dict[float, list[str]]:
    return {a: (run_dir / "kept" / f"alpha-{a:g}.txt").read_text().split() for a in ALPHAS}
