"""The names of a selection's outputs, built (and parsed back) here only.

A selection has a *key*: ``a0.3`` for a plain `slap select` selection at alpha 0.3, or
``<arm>__a<alpha>__s<seed>`` for one of a sweep's. Its columns in ``scores.parquet`` are
``keep_<key>`` and ``weight_<key>``; its kept lists are ``kept/alpha-<alpha>.txt|.parquet`` and
its rows ``selected/alpha-<alpha>/``. A plain module (like ``vocabulary``): the core uses it too.
"""

from __future__ import annotations

import re
from pathlib import Path

KEEP_PREFIX, WEIGHT_PREFIX = "keep_", "weight_"
ALPHA_PREFIX = "alpha-"
# A sweep's selection folder holds one `slap select`-shaped view per (arm, seed) under here.
ARMS_DIR = "arms"
# The bundled sample, as `data.paths` / `eval.paths` name it: chitchat's training side and its
# held-out conversations.
EMBEDDED_CHITCHAT = "embedded:chitchat"
EMBEDDED_CHITCHAT_EVAL = "embedded:chitchat-eval"
# The generation check's group when no source is named: the eval set's first rows.
GENERATION_ALL_ROWS = "all"
_PLAIN_KEY = re.compile(r"a([0-9.]+)")
# What every run writes beside its outputs: its manifest, its resolved config, its log files.
MANIFEST, RESOLVED_CONFIG, LOGS_DIR = "manifest.json", "config.yaml", "logs"
RUN_RECORDS = (MANIFEST, RESOLVED_CONFIG, LOGS_DIR)
# A job's human-facing outputs: the report, its plots, a fine-tuning run's (or evaluation's)
# metrics.
REPORT, PLOTS_DIR, METRICS = "report.md", "plots", "metrics.json"
TRAIN_IDS = "train_ids.txt"  # the ids a fine-tuning run trained on, never evaluated after


def alpha_key(alpha: float) -> str:
    """The key of a plain `slap select` selection at ``alpha``."""
    return f"a{alpha:g}"


FULL_ARM = "full"  # a sweep's full-data reference
# Id markers of rows planted as noise (bench/noisy_pool.py): a swapped response, a repeat.
PLANTED_MARKERS = ("~swapped", "~dup")


def trial_name(arm: str, mode: str, alpha: float, seed: int) -> str:
    """A sweep trial's name (its folder under ``trials/``) from its parameters, never a
    timestamp: a restored trial finds its own checkpoint under the same name."""
    if arm == FULL_ARM:
        return f"full-s{seed}"
    return f"{arm}-{mode}-a{alpha:g}-s{seed}"


def sweep_key(arm: str, alpha: float, seed: int) -> str:
    """The key of a sweep's selection for one (arm, alpha, seed)."""
    return f"{arm}__a{alpha:g}__s{seed}"


def _key(key_or_alpha: str | float) -> str:
    return key_or_alpha if isinstance(key_or_alpha, str) else alpha_key(key_or_alpha)


def keep_column(key_or_alpha: str | float) -> str:
    """``keep_<key>`` (a float is a plain selection's alpha)."""
    return KEEP_PREFIX + _key(key_or_alpha)


def weight_column(key_or_alpha: str | float) -> str:
    """``weight_<key>``: the training weight of each kept row (1 unless a method reweights,
    e.g. InfoBatch), 0 for pruned rows."""
    return WEIGHT_PREFIX + _key(key_or_alpha)


def keys_of(columns: list[str]) -> list[str]:
    """The selection keys that a scores table's ``keep_*`` columns carry."""
    return [c.removeprefix(KEEP_PREFIX) for c in columns if c.startswith(KEEP_PREFIX)]


def shown(key: str) -> str:
    """How a key reads in messages: a plain key as its alpha (``0.3``), a sweep's as itself."""
    plain = _PLAIN_KEY.fullmatch(key)
    return plain.group(1) if plain else key


def alpha_name(alpha: float) -> str:
    """``alpha-0.3``: the stem of kept lists and the folder of selected rows."""
    return f"{ALPHA_PREFIX}{alpha:g}"


def alphas_named(paths: list[Path]) -> list[str]:
    """The alphas (as written) of ``alpha-*`` files or folders."""
    names = (p.name.removesuffix(".txt").removesuffix(".parquet") for p in paths)
    return sorted({name.removeprefix(ALPHA_PREFIX) for name in names})


def kept_list(kept_dir: Path, alpha: float) -> Path:
    """One kept id per line."""
    return kept_dir / f"{alpha_name(alpha)}.txt"


def kept_table(kept_dir: Path, alpha: float) -> Path:
    """Kept ids with their training weights (Parquet: id, weight)."""
    return kept_dir / f"{alpha_name(alpha)}.parquet"


def selected_rows(run_dir: Path, alpha: float) -> Path:
    """The folder of a selection's kept rows (the input rows, unchanged)."""
    return run_dir / "selected" / alpha_name(alpha)
