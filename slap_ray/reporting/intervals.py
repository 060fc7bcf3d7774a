"""Paired intervals for arm-minus-random differences over seeds (no Ray, no plotting).

Two primary metrics, declared before a study runs: the token-weighted held-out response loss
(``eval_loss``) and the per-source macro mean (``macro_loss``: each source's token-weighted
loss, averaged with equal weight). Three intervals of the mean paired difference:
- ``t``: Student's t over the per-seed differences (honest with few seeds);
- ``bootstrap``: percentile bootstrap over seeds (scipy; it only spans the resampled means);
- ``hierarchical``: seeds resampled, then held-out rows resampled within each source, the same
  rows for both arms of a pair (the eval set's own noise, which a seed bootstrap leaves out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PRIMARY = ("eval_loss", "macro_loss")


def macro_mean(per_source: dict[str, float]) -> float:
    """The per-source macro mean: each source's loss with equal weight (NaNs skipped)."""
    values = [v for v in per_source.values() if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def t_interval(diffs: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """mean +- t_{(1+level)/2, n-1} * sd / sqrt(n); NaN with fewer than two differences."""
    from scipy import stats

    diffs = np.asarray(diffs, dtype=np.float64)
    if len(diffs) < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf((1 + level) / 2, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs))
    return float(diffs.mean() - half), float(diffs.mean() + half)


def bootstrap_interval(diffs: np.ndarray, samples: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap of the mean paired difference over seeds (scipy); NaN with
    fewer than two pairs."""
    from scipy.stats import bootstrap

    diffs = np.asarray(diffs, dtype=np.float64)
    if len(diffs) < 2:
        return float("nan"), float("nan")
    if np.allclose(diffs, diffs[0]):
        return float(diffs[0]), float(diffs[0])
    result = bootstrap(
        (diffs,), np.mean, n_resamples=samples, method="percentile", random_state=seed
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


@dataclass
class PairedRows:
    """One seed's pair of trials on the same held-out rows: response-loss sums (n,) of the arm
    and of random, the rows' tokens (n,) and sources (n,)."""

    arm: np.ndarray
    random: np.ndarray
    tokens: np.ndarray
    sources: np.ndarray


def _metric_sums(pair: PairedRows, picks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per bootstrap draw (b,): the token-weighted and macro differences of one seed, with
    ``picks[source]`` (b, n_source) the resampled row positions within each source."""
    arm_total = random_total = tokens_total = 0.0
    macro_arm, macro_random = [], []
    for source, rows in picks.items():
        members = np.flatnonzero(pair.sources == source)
        chosen = members[rows]  # (b, n_source)
        arm, random = pair.arm[chosen].sum(1), pair.random[chosen].sum(1)
        tokens = pair.tokens[chosen].sum(1).astype(np.float64)
        arm_total, random_total = arm_total + arm, random_total + random
        tokens_total = tokens_total + tokens
        with np.errstate(invalid="ignore", divide="ignore"):
            macro_arm.append(arm / tokens)
            macro_random.append(random / tokens)
    return {
        "eval_loss": (arm_total - random_total) / tokens_total,
        "macro_loss": np.nanmean(macro_arm, axis=0) - np.nanmean(macro_random, axis=0),
    }


def hierarchical_interval(
    pairs: list[PairedRows], samples: int, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95% percentile interval of the mean paired difference of each primary metric, resampling
    seeds and then held-out rows within each source (the same rows for both arms)."""
    if len(pairs) < 2:
        return dict.fromkeys(PRIMARY, (float("nan"), float("nan")))
    rng = np.random.default_rng(seed)
    per_seed = {metric: np.empty((samples, len(pairs))) for metric in PRIMARY}
    for s, pair in enumerate(pairs):
        picks = {}
        for source in np.unique(pair.sources):
            count = int((pair.sources == source).sum())
            picks[source] = rng.integers(0, count, size=(samples, count))
        for metric, values in _metric_sums(pair, picks).items():
            per_seed[metric][:, s] = values
    seeds = rng.integers(0, len(pairs), size=(samples, len(pairs)))
    out = {}
    for metric in PRIMARY:
        means = np.take_along_axis(per_seed[metric], seeds, axis=1).mean(axis=1)
        low, high = np.percentile(means, [2.5, 97.5])
        out[metric] = (float(low), float(high))
    return out
