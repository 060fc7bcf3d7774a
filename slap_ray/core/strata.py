"""Distribution strata (SLAP_METHOD.md section 3, steps 1-2): seeded k-means over sentence
embeddings (scikit-learn), and batches composed so that each mirrors the cluster mix of the pool."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from slap_ray.core.seeds import derive_rng, derive_seed


def _squared_distances(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(N, D), (C, D) -> (N, C) squared L2 distances, clipped at 0 against rounding."""
    cross = points @ centroids.T
    sq = (points**2).sum(1, keepdims=True) - 2.0 * cross + (centroids**2).sum(1)
    return np.maximum(sq, 0.0)


def kmeans_fit(
    points: np.ndarray, num_clusters: int, seed: int, max_iter: int = 50, tol: float = 1e-6
) -> np.ndarray:
    """k-means++ seeding then Lloyd iterations (scikit-learn): (N, D) -> centroids (C, D) float64.

    Deterministic for a given seed and row order; callers pass rows in a canonical (id) order.
    scikit-learn relocates clusters that empty out, also with duplicated points.
    """
    from sklearn.cluster import KMeans

    data = np.asarray(points, dtype=np.float64)
    count = len(data)
    if not 1 <= num_clusters <= count:
        raise ValueError(f"num_clusters must be in [1, {count}], got {num_clusters}")
    model = KMeans(
        n_clusters=num_clusters,
        init="k-means++",
        n_init=1,
        max_iter=max_iter,
        tol=tol,
        random_state=derive_seed(seed, "kmeans-init") % 2**32,
    )
    with warnings.catch_warnings():
        # Fewer distinct points than clusters is allowed: duplicates share a centroid.
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        model.fit(data)
    return np.asarray(model.cluster_centers_, dtype=np.float64)


def assign_clusters(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid of each row: (N, D), (C, D) -> (N,) int64 (ties: lowest cluster)."""
    return _squared_distances(np.asarray(points, np.float64), centroids).argmin(1).astype(np.int64)


def largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Split ``total`` into integers proportional to ``weights`` (Hamilton's method).

    Ties in the remainders go to the lower index. (C,) -> (C,) int64 summing to ``total``.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if total == 0 or weights.sum() == 0:
        return np.zeros(len(weights), dtype=np.int64)
    exact = total * weights / weights.sum()
    quota = np.floor(exact).astype(np.int64)
    short = total - int(quota.sum())
    order = np.lexsort((np.arange(len(weights)), -(exact - quota)))
    quota[order[:short]] += 1
    return quota


def compose_batches(
    ids: Sequence[str], clusters: np.ndarray, batch_size: int, seed: int
) -> np.ndarray:
    """Stratified batch composition: the batch id of every row, aligned with ``ids``.

    Within each cluster rows are shuffled (seeded, from id order). Each batch takes from every
    cluster in proportion to what that cluster still holds (largest remainder), so every batch
    mirrors the pool's mix and the clusters run out together. The last batch may be smaller.
    The result depends on the set of (id, cluster) pairs only, not on their order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = np.asarray(ids, dtype=object)
    clusters = np.asarray(clusters, dtype=np.int64)
    if len(set(ids.tolist())) != len(ids):
        raise ValueError("compose_batches needs unique ids")
    by_id = np.argsort(ids.astype(str), kind="stable")
    num_clusters = int(clusters.max()) + 1 if len(clusters) else 0
    queues = []
    for cluster in range(num_clusters):
        members = by_id[clusters[by_id] == cluster]
        queues.append(members[derive_rng(seed, "compose", cluster).permutation(len(members))])
    remaining = np.array([len(q) for q in queues], dtype=np.int64)
    cursor = np.zeros(num_clusters, dtype=np.int64)
    batch_of = np.full(len(ids), -1, dtype=np.int64)
    batch = 0
    while remaining.sum() > 0:
        quota = largest_remainder(min(batch_size, int(remaining.sum())), remaining)
        for cluster in np.flatnonzero(quota):
            take = queues[cluster][cursor[cluster] : cursor[cluster] + quota[cluster]]
            batch_of[take] = batch
        cursor += quota
        remaining -= quota
        batch += 1
    return batch_of
