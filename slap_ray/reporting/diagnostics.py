"""What each sweep arm keeps, before any training: kept rows and tokens, mean kept loss, each
source's share of the kept rows against its share of the pool, and the share of planted noise
kept (rows whose id carries a ``names.PLANTED_MARKERS`` marker, as the noisy-pool script
writes them). Plain pandas over ``selection/scores.parquet``."""

from __future__ import annotations

import numpy as np
import pandas as pd

from slap_ray.names import PLANTED_MARKERS, keep_column


def _planted(ids: pd.Series) -> pd.Series:
    return ids.astype(str).str.contains("|".join(PLANTED_MARKERS), regex=True)


def selection_diagnostics(
    scores: pd.DataFrame, keys: dict[tuple[str, float, int], str]
) -> pd.DataFrame:
    """One row per (arm, alpha, seed) of ``keys`` (its selection key in scores.parquet): kept
    rows, kept tokens, mean kept loss, ``share[<source>]`` of the kept rows (``pool_share[...]``:
    the scored pool's) and ``planted_kept`` (the share of planted rows kept, NaN without)."""
    scored = scores[scores["loss"].notna()]
    pool_share = scored["source"].value_counts(normalize=True)
    planted = _planted(scored["id"])
    rows = []
    for (arm, alpha, seed), key in sorted(keys.items()):
        kept = scored[scored[keep_column(key)].astype(bool)]
        row = {
            "arm": arm, "alpha": alpha, "seed": seed, "kept_rows": len(kept),
            "kept_tokens": int(kept["num_tokens"].sum()), "mean_kept_loss": kept["loss"].mean(),
            "planted_kept": planted[kept.index].sum() / planted.sum() if planted.any() else np.nan,
        }  # fmt: skip
        share = kept["source"].value_counts(normalize=True)
        for source in pool_share.index.sort_values():
            row[f"share[{source}]"] = share.get(source, 0.0)
        rows.append(row)
    frame = pd.DataFrame(rows)
    for source in pool_share.index.sort_values():
        frame[f"pool_share[{source}]"] = pool_share[source]
    return frame


def diagnostics_lines(frame: pd.DataFrame) -> list[str]:
    """Markdown: per arm (mean over seeds) kept tokens, mean kept loss, planted kept, and each
    source's share of the kept rows, with the pool's share in the first row."""
    sources = [
        c.removeprefix("share[").rstrip("]") for c in frame.columns if c.startswith("share[")
    ]
    means = frame.groupby(["arm", "alpha"]).mean(numeric_only=True)
    head = "| arm | alpha (pruned) | kept tokens | mean kept loss | planted kept | "
    lines = [head + " | ".join(sources) + " |", "| --- |" + " ---: |" * (4 + len(sources))]
    pool = " | ".join(f"{frame[f'pool_share[{s}]'].iloc[0]:.1%}" for s in sources)
    lines.append(f"| (pool) | - | - | - | - | {pool} |")
    for (arm, alpha), row in means.iterrows():
        planted = "-" if np.isnan(row["planted_kept"]) else f"{row['planted_kept']:.1%}"
        shares = " | ".join(f"{row[f'share[{s}]']:.1%}" for s in sources)
        lines.append(
            f"| {arm} | {alpha:g} | {row['kept_tokens']:.0f} | {row['mean_kept_loss']:.4f} "
            f"| {planted} | {shares} |"
        )
    return lines
