"""Per-batch selection: SLAP (SLAP_METHOD.md section 1, steps 2-5) and the section 4 baselines.

Every method has the same interface: per-example losses (B,), features (B, D) or None,
``n_keep`` and a seeded ``numpy.random.Generator``; it returns sorted, unique int64 indices.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from slap_ray.selection_spec import METHOD_OPTIONS, SelectionSpec
from slap_ray.vocabulary import METHODS, STRATA_KINDS


def _as_losses(losses: np.ndarray | torch.Tensor) -> np.ndarray:
    values = np.asarray(losses.detach().cpu() if isinstance(losses, torch.Tensor) else losses)
    values = values.astype(np.float64).reshape(-1)
    if not np.all(np.isfinite(values)):
        bad = np.flatnonzero(~np.isfinite(values)).tolist()
        raise ValueError(f"losses must be finite; non-finite at batch positions {bad}")
    return values


def _as_matrix(features: np.ndarray | torch.Tensor, batch: int) -> np.ndarray:
    matrix = np.asarray(
        features.detach().cpu() if isinstance(features, torch.Tensor) else features,
        dtype=np.float64,
    )
    if matrix.ndim != 2 or len(matrix) != batch:
        raise ValueError(f"features must be (B, D) with B={batch}, got {matrix.shape}")
    return matrix


def _check_n_keep(n_keep: int, batch: int) -> int:
    if not 0 <= int(n_keep) <= batch:
        raise ValueError(f"n_keep must be in [0, {batch}], got {n_keep}")
    return int(n_keep)


def _sorted(indices: np.ndarray | list[int]) -> np.ndarray:
    return np.sort(np.asarray(indices, dtype=np.int64))


def loss_strata(losses: np.ndarray, num_strata: int, kind: str = "width") -> np.ndarray:
    """Stratum of each example, 0 = lowest loss: (B,) -> (B,) int64 in [0, num_strata).

    ``width``: equal-width bins over [min, max] (all equal losses -> stratum 0).
    ``quantile``: equal-count bins by loss rank (ties by index).
    """
    if num_strata < 1:
        raise ValueError(f"num_strata must be >= 1, got {num_strata}")
    if kind not in STRATA_KINDS:
        raise ValueError(f"strata must be one of {STRATA_KINDS}, got {kind!r}")
    batch = len(losses)
    if kind == "quantile":
        ranks = np.empty(batch, dtype=np.int64)
        ranks[np.argsort(losses, kind="stable")] = np.arange(batch)
        return ranks * num_strata // max(batch, 1)
    low, high = (float(losses.min()), float(losses.max())) if batch else (0.0, 0.0)
    if high <= low:
        return np.zeros(batch, dtype=np.int64)
    position = (losses - low) / (high - low) * num_strata
    return np.minimum(position.astype(np.int64), num_strata - 1)


def exp_loss_draw(
    losses: np.ndarray, n_keep: int, tau: float, rng: np.random.Generator
) -> np.ndarray:
    """Draw ``n_keep`` indices without replacement with probability proportional to exp(loss/tau).

    Gumbel-top-k: the top-k of log-weight + Gumbel noise has exactly the distribution of
    sequential weighted draws without replacement, and stays stable for any loss scale.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    keys = losses / tau + rng.gumbel(size=len(losses))
    return np.argsort(-keys, kind="stable")[:n_keep]


class FarthestPoints:
    """The selected set S of step 5 and every point's squared distance to it, kept across
    calls so that several groups (``keep_mix``) share one S."""

    def __init__(self, features: np.ndarray) -> None:
        self.features = features
        self.selected: list[int] = []
        # Squared distance to the nearest selected point; monotone in the distance.
        self.nearest = np.full(len(features), np.inf)
        self.taken = np.zeros(len(features), dtype=bool)
        self._difference = np.empty_like(features)  # reused: B x D temporaries cost more

    def add(self, index: int) -> None:
        self.selected.append(index)
        self.taken[index] = True
        np.subtract(self.features, self.features[index], out=self._difference)
        squared = np.square(self._difference, out=self._difference).sum(axis=1)
        np.minimum(self.nearest, squared, out=self.nearest)

    def fill(
        self, members: np.ndarray, strata: np.ndarray, budgets: np.ndarray, rng: np.random.Generator
    ) -> None:
        """Step 5 over ``members`` (indices into the features) with their ``strata``: strata
        in ascending order; S starts at a random member of the first stratum with budget
        unless it already has points; then each stratum adds the member farthest from S."""
        for stratum, budget in enumerate(budgets):
            in_stratum = members[strata == stratum]
            for _ in range(int(budget)):
                if not self.selected:
                    self.add(int(in_stratum[rng.integers(len(in_stratum))]))
                    continue
                candidates = in_stratum[~self.taken[in_stratum]]
                # argmax returns the first maximum: ties break by lowest index.
                self.add(int(candidates[np.argmax(self.nearest[candidates])]))


def farthest_point_fill(
    features: np.ndarray, strata: np.ndarray, budgets: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Stratified greedy farthest-point selection (step 5).

    features (B, D) float64, strata (B,) int, budgets (K,) -> selected indices in pick order.
    Strata are visited in ascending order; the first with budget starts S at a random member;
    then each stratum adds the member farthest (max of min L2 distance) from all of S.
    """
    points = FarthestPoints(features)
    points.fill(np.arange(len(features)), strata, budgets, rng)
    return np.asarray(points.selected, dtype=np.int64)


def largest_remainder(total: int, sizes: np.ndarray) -> np.ndarray:
    """``total`` shared out in proportion to ``sizes`` (K,) -> (K,) int64 summing to ``total``:
    floors, then one more to the largest remainders (ties to the lower index)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if total == 0 or sizes.sum() == 0:
        return np.zeros(len(sizes), dtype=np.int64)
    exact = total * sizes / sizes.sum()
    shares = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - shares), kind="stable")
    shares[order[: total - int(shares.sum())]] += 1
    return shares


def stratum_budgets(
    losses: np.ndarray,
    stratum_of: np.ndarray,
    n_keep: int,
    num_strata: int,
    tau: float,
    budget: str,
    rng: np.random.Generator,
) -> np.ndarray:
    """Step 3: how many rows each loss stratum keeps, (K,) int64. ``loss``: the strata of
    ``n_keep`` draws with probability proportional to exp(loss / tau) (tau = inf: uniform);
    ``proportional``: each stratum's share of the batch by largest remainder (no draw)."""
    if budget == "proportional":
        return largest_remainder(n_keep, np.bincount(stratum_of, minlength=num_strata))
    drawn = exp_loss_draw(losses, n_keep, tau, rng)
    return np.bincount(stratum_of[drawn], minlength=num_strata)


def slap_select(
    losses: np.ndarray | torch.Tensor,
    features: np.ndarray | torch.Tensor,
    n_keep: int,
    rng: np.random.Generator,
    num_strata: int = 3,
    tau: float = 1.0,
    strata: str = "width",
    budget: str = "loss",
    points: FarthestPoints | None = None,
    members: np.ndarray | None = None,
) -> np.ndarray:
    """SLAP selection of one batch: loss strata, exp(loss) budgets, stratified farthest points.

    losses (B,), features (B, D) -> sorted unique int64 indices, ``n_keep`` of them.
    ``members`` (M,): select among these rows only (strata and budgets from their losses), with
    ``points``, a selected set S shared with earlier calls (``keep_mix``).
    """
    values = _as_losses(losses)
    n_keep = _check_n_keep(n_keep, len(values))
    matrix = _as_matrix(features, len(values))
    if n_keep == 0:
        return np.empty(0, dtype=np.int64)
    members = np.arange(len(values)) if members is None else np.asarray(members, np.int64)
    stratum_of = loss_strata(values[members], num_strata, strata)
    budgets = stratum_budgets(values[members], stratum_of, n_keep, num_strata, tau, budget, rng)
    points = points if points is not None else FarthestPoints(matrix)
    before = len(points.selected)
    points.fill(members, stratum_of, budgets, rng)
    return _sorted(points.selected[before:])


def random_select(losses: np.ndarray, n_keep: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform without replacement."""
    return _sorted(rng.choice(len(losses), size=n_keep, replace=False))


def online_hard_select(losses: np.ndarray, n_keep: int) -> np.ndarray:
    """The ``n_keep`` highest-loss examples (ties by lowest index)."""
    return _sorted(np.argsort(-losses, kind="stable")[:n_keep])


def ccs_select(
    losses: np.ndarray, n_keep: int, rng: np.random.Generator, num_strata: int = 3
) -> np.ndarray:
    """Coverage-centric selection: equal-width loss strata, budget to the smallest strata first.

    Each non-empty stratum, in ascending size (ties by stratum index), gets
    min(size, floor(remaining budget / remaining strata)); members are sampled uniformly.
    """
    stratum_of = loss_strata(losses, num_strata, "width")
    members = [np.flatnonzero(stratum_of == s) for s in range(num_strata)]
    order = sorted((len(m), s) for s, m in enumerate(members) if len(m))
    remaining = n_keep
    chosen: list[np.ndarray] = []
    for position, (size, stratum) in enumerate(order):
        take = min(size, remaining // (len(order) - position))
        chosen.append(rng.choice(members[stratum], size=take, replace=False))
        remaining -= take
    picked = np.concatenate(chosen) if chosen else np.empty(0, dtype=np.int64)
    return _sorted(picked)


def infobatch_select(
    losses: np.ndarray, n_keep: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """InfoBatch with a fixed budget: prune below-mean-loss examples at random.

    Returns (indices, weights): the ratio r = n_prune / n_low is chosen to hit ``n_keep``
    exactly; kept low-loss rows get weight 1 / (1 - r), others 1. If fewer rows lie below the
    mean than must be pruned (r would exceed 1), all low rows go and the rest of the pruning is
    uniform over the others, all kept weights 1.
    """
    batch = len(losses)
    n_prune = batch - n_keep
    low = np.flatnonzero(losses < losses.mean())
    high = np.setdiff1d(np.arange(batch), low)
    if n_prune <= len(low):
        pruned = rng.choice(low, size=n_prune, replace=False)
        ratio = n_prune / len(low) if len(low) else 0.0
    else:
        pruned = np.concatenate([low, rng.choice(high, size=n_prune - len(low), replace=False)])
        ratio = 1.0
    kept = np.setdiff1d(np.arange(batch), pruned)
    weights = np.ones(len(kept))
    if ratio < 1.0:
        # 1 / (1 - r) with r = n_prune / n_low, written exactly.
        weights[np.isin(kept, low)] = len(low) / (len(low) - n_prune)
    return kept.astype(np.int64), weights


def select(
    method: str,
    losses: np.ndarray | torch.Tensor,
    features: np.ndarray | torch.Tensor | None,
    n_keep: int,
    rng: np.random.Generator,
    **options,
) -> np.ndarray:
    """Dispatch to one selection method; returns sorted unique int64 indices.

    Options: ``num_strata``, ``tau``, ``strata`` (slap); ``num_strata`` (ccs). ``full`` keeps
    every row whatever ``n_keep`` says (alpha = 0).
    """
    unknown = set(options) - set().union(*METHOD_OPTIONS.values())
    if unknown:
        raise ValueError(f"unknown selection options {sorted(unknown)}")
    # Options meant for other methods are ignored, so one config can drive any method.
    options = {k: v for k, v in options.items() if k in METHOD_OPTIONS.get(method, ())}
    values = _as_losses(losses)
    n_keep = _check_n_keep(n_keep, len(values))
    table: dict[str, Callable[[], np.ndarray]] = {
        "slap": lambda: slap_select(values, features, n_keep, rng, **options),
        "random": lambda: random_select(values, n_keep, rng),
        "full": lambda: np.arange(len(values), dtype=np.int64),
        "online_hard": lambda: online_hard_select(values, n_keep),
        "ccs": lambda: ccs_select(values, n_keep, rng, **options),
        "infobatch": lambda: infobatch_select(values, n_keep, rng)[0],
    }
    if method not in table:
        raise ValueError(f"unknown selection method {method!r}; choose from {METHODS}")
    if method == "slap" and features is None:
        raise ValueError("method 'slap' needs features")
    return table[method]()


def select_weighted(
    method: str,
    losses: np.ndarray | torch.Tensor,
    features: np.ndarray | torch.Tensor | None,
    n_keep: int,
    rng: np.random.Generator,
    **options,
) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`select`, plus the training weight of each kept example (aligned with it).

    Only ``infobatch`` reweights (1 / (1 - r) on kept low-loss rows); every other method trains
    its kept rows with weight 1 (SLAP_METHOD.md section 1, step 6: no reweighting).
    """
    if method == "infobatch":
        n_keep = _check_n_keep(n_keep, len(_as_losses(losses)))
        return infobatch_select(_as_losses(losses), n_keep, rng)
    kept = select(method, losses, features, n_keep, rng, **options)
    return kept, np.ones(len(kept))


def select_with(
    spec: SelectionSpec,
    losses: np.ndarray | torch.Tensor,
    features: np.ndarray | torch.Tensor | None,
    n_keep: int,
    rng: np.random.Generator,
    groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Select one batch as ``spec`` says: (kept indices, their training weights), sorted; see
    :func:`select_weighted`. The one entry point of the scorers and the training loop.

    ``groups`` (B,): each row's distribution stratum, needed by ``keep_mix``. ``drop_top``
    removes the highest-loss rows from the candidates first (SLAP_METHOD.md section 6).
    """
    if not spec.drop_top and not spec.keep_mix:
        return select_weighted(spec.method, losses, features, n_keep, rng, **spec.options())
    values = _as_losses(losses)
    n_keep = _check_n_keep(n_keep, len(values))
    candidates = np.sort(np.argsort(-values, kind="stable")[int(spec.drop_top * len(values)) :])
    n_keep = min(n_keep, len(candidates))
    parts, shares = [candidates], [n_keep]
    if spec.keep_mix:
        if groups is None or len(groups) != len(values):
            raise ValueError("keep_mix needs each row's distribution stratum (groups)")
        keys = np.asarray(groups)[candidates]
        parts = [candidates[keys == key] for key in np.unique(keys)]  # ascending keys
        shares = largest_remainder(n_keep, np.array([len(p) for p in parts]))
    points = None
    if spec.needs_features:
        if features is None:
            raise ValueError("method 'slap' needs features")
        points = FarthestPoints(_as_matrix(features, len(values)))
    kept, weights = [], []
    for members, share in zip(parts, shares, strict=True):
        part_kept, part_weights = _select_among(spec, values, members, int(share), rng, points)
        kept.append(part_kept)
        weights.append(part_weights)
    kept_all, weights_all = np.concatenate(kept), np.concatenate(weights)
    order = np.argsort(kept_all, kind="stable")
    return kept_all[order].astype(np.int64), weights_all[order]


def _select_among(spec, values, members, n_keep, rng, points) -> tuple[np.ndarray, np.ndarray]:
    """``spec``'s method among ``members`` only: (kept batch indices, weights)."""
    if spec.method == "full":
        return members, np.ones(len(members))
    if points is not None:
        kept = slap_select(
            values, points.features, n_keep, rng, **spec.options(), points=points, members=members
        )
        return kept, np.ones(len(kept))
    local, weights = select_weighted(
        spec.method, values[members], None, n_keep, rng, **spec.options()
    )
    return members[local], weights


def n_keep_for(batch_size: int, alpha: float) -> int:
    """Examples kept from a batch of ``batch_size`` at pruning ratio ``alpha``."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    # Half-up rounding (Python's round() would send 2.5 to 2).
    return int(math.floor((1.0 - alpha) * batch_size + 0.5))
