"""Distribution strata (SLAP_METHOD.md section 3, steps 1-2): seeded k-means over sentence
embeddings (scikit-learn), and batches composed so that each mirrors the cluster mix of the pool."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from slap_ray.core.seeds import derive_seed, id_rank_key


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


def rank_within_clusters(ids: Sequence[str], clusters: np.ndarray, seed: int) -> np.ndarray:
    """Each row's rank inside its cluster in a seeded shuffle of the cluster: (N,) -> (N,) int64.

    The shuffle sorts by ``id_rank_key(seed, "compose", id)`` (ties by id), so a row's rank
    depends only on the set of ids in its cluster, not on their order or sharding.
    """
    ids = [str(i) for i in ids]
    clusters = np.asarray(clusters, dtype=np.int64)
    keys = np.array([id_rank_key(seed, "compose", i) for i in ids], dtype=np.int64)
    order = np.lexsort((np.asarray(ids, dtype=str), keys, clusters))
    ranks = np.empty(len(ids), dtype=np.int64)
    sorted_clusters = clusters[order]
    starts = np.searchsorted(sorted_clusters, sorted_clusters, side="left")
    ranks[order] = np.arange(len(ids)) - starts
    return ranks


def stratified_positions(ranks: np.ndarray, clusters: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Global position of each row when clusters are interleaved by Webster's divisor method.

    Seat ``r`` of cluster ``c`` has priority ``n_c / (2 r + 1)``; rows are ordered by priority
    (descending, ties to the lower cluster), so every prefix of the order is the Sainte-Lague
    apportionment of its length over the cluster sizes ``counts``: each stretch of the order
    mirrors the pool's mix and the clusters run out together. Each row's position follows
    from its (cluster, rank) and ``counts`` alone, so rows are placed independently, block by
    block. (N,), (N,), (C,) -> (N,) int64, a permutation of 0..sum(counts)-1 over all rows.
    Exact in int64 for clusters of up to about 2e9 rows.
    """
    ranks = np.asarray(ranks, dtype=np.int64)
    clusters = np.asarray(clusters, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    own = counts[clusters]
    odd = 2 * ranks + 1
    position = ranks.copy()
    for other, size in enumerate(counts.tolist()):
        if size == 0:
            continue
        # Seats r' of `other` ahead of (c, r): size * odd > own * (2 r' + 1), or equal with a
        # lower cluster index: r' < (size * odd - own) / (2 own), strictly or not.
        numerator = size * odd - own
        ahead_or_tied = np.floor_divide(numerator, 2 * own) + 1  # r' <= numerator / (2 own)
        strictly = np.floor_divide(numerator - 1, 2 * own) + 1  # r' < numerator / (2 own)
        seats = np.where(other < clusters, ahead_or_tied, strictly)
        seats = np.clip(seats, 0, size)
        position += np.where(other == clusters, 0, seats)
    return position


def compose_batches(
    ids: Sequence[str], clusters: np.ndarray, batch_size: int, seed: int
) -> np.ndarray:
    """Stratified batch composition: the batch id of every row, aligned with ``ids``.

    Rows are shuffled within their cluster (``rank_within_clusters``), interleaved across
    clusters (``stratified_positions``) and cut into batches of ``batch_size``; the last batch
    may be smaller. The result depends on the set of (id, cluster) pairs only. The streaming
    selection computes the same thing block by block from the cluster sizes.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    clusters = np.asarray(clusters, dtype=np.int64)
    if len(set(map(str, ids))) != len(clusters):
        raise ValueError("compose_batches needs unique ids")
    if len(clusters) == 0:
        return np.zeros(0, dtype=np.int64)
    counts = np.bincount(clusters)
    ranks = rank_within_clusters(ids, clusters, seed)
    return stratified_positions(ranks, clusters, counts) // batch_size
