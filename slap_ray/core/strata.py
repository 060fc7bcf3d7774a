"""Distribution strata (SLAP_METHOD.md section 3, steps 1-2): seeded k-means over sentence
embeddings, and batches composed so that each mirrors the cluster mix of the pool."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from slap_ray.core.seeds import derive_rng


def _squared_distances(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(N, D), (C, D) -> (N, C) squared L2 distances, clipped at 0 against rounding."""
    cross = points @ centroids.T
    sq = (points**2).sum(1, keepdims=True) - 2.0 * cross + (centroids**2).sum(1)
    return np.maximum(sq, 0.0)


def kmeans_fit(
    points: np.ndarray, num_clusters: int, seed: int, max_iter: int = 50, tol: float = 1e-6
) -> np.ndarray:
    """k-means++ seeding then Lloyd iterations: (N, D) -> centroids (C, D) float64.

    Deterministic for a given seed and row order; callers pass rows in a canonical (id) order.
    A cluster that empties is re-seeded at the point farthest from its centroid.
    """
    data = np.asarray(points, dtype=np.float64)
    count = len(data)
    if not 1 <= num_clusters <= count:
        raise ValueError(f"num_clusters must be in [1, {count}], got {num_clusters}")
    rng = derive_rng(seed, "kmeans-init")
    centroids = [data[rng.integers(count)]]
    nearest = _squared_distances(data, np.asarray(centroids))[:, 0]
    for _ in range(1, num_clusters):
        total = nearest.sum()
        pick = rng.choice(count, p=nearest / total) if total > 0 else rng.integers(count)
        centroids.append(data[pick])
        np.minimum(nearest, _squared_distances(data, data[pick : pick + 1])[:, 0], out=nearest)
    centers = np.asarray(centroids)
    for _ in range(max_iter):
        distances = _squared_distances(data, centers)
        labels = distances.argmin(1)
        updated = np.empty_like(centers)
        for cluster in range(num_clusters):
            members = data[labels == cluster]
            if len(members):
                updated[cluster] = members.mean(0)
            else:
                updated[cluster] = data[distances[np.arange(count), labels].argmax()]
        shift = float(((updated - centers) ** 2).sum())
        centers = updated
        if shift <= tol:
            break
    return centers


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
