"""Distribution strata (SLAP_METHOD.md section 3, steps 1-2): seeded k-means over sentence
embeddings (scikit-learn), and batches composed so that each mirrors the cluster mix of the pool."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

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
    # Imported here: scikit-learn costs about a second in every worker that imports this module.
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

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


KEY_BITS = 63  # id_rank_key is a 63-bit non-negative int


def compose_keys(ids: Sequence[str], seed: int) -> np.ndarray:
    """The seeded shuffle key of each row in its cluster: (N,) -> (N,) int64 in [0, 2**63)."""
    return np.array([id_rank_key(seed, "compose", str(i)) for i in ids], dtype=np.int64)


def key_buckets(keys: np.ndarray, bits: int) -> np.ndarray:
    """Each row's bucket, the top ``bits`` bits of its compose key (``compose_keys``): (N,)
    int64 -> (N,) int64 in [0, 2**bits). Buckets are key ranges in key order, and equal keys
    share a bucket, so a row's rank in its cluster is the count of its cluster's rows in lower
    buckets plus its rank inside its (cluster, bucket): each bucket can be ranked apart from the
    others."""
    if not 0 <= bits <= 16:
        raise ValueError(f"bits must be in [0, 16], got {bits}")
    keys = np.asarray(keys, dtype=np.int64)
    return keys >> (KEY_BITS - bits) if bits else np.zeros(len(keys), np.int64)


def bucket_bits(largest_cluster: int, group_rows: int) -> int:
    """The fewest bits that split a cluster of ``largest_cluster`` rows into buckets of about
    ``group_rows`` rows (compose keys are uniform), at most 16."""
    groups = max(1, -(-int(largest_cluster) // max(1, int(group_rows))))
    return min(16, (groups - 1).bit_length())


def bucket_offsets(clusters: np.ndarray, buckets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows of the same cluster in lower buckets, for each (cluster, bucket) count:
    (K,), (K,), (K,) -> (K,) int64, aligned with the input (any order; pairs unique)."""
    clusters, buckets = np.asarray(clusters, np.int64), np.asarray(buckets, np.int64)
    rows = np.asarray(rows, np.int64)
    order = np.lexsort((buckets, clusters))
    sorted_clusters, sorted_rows = clusters[order], rows[order]
    running = np.cumsum(sorted_rows) - sorted_rows
    starts = np.searchsorted(sorted_clusters, sorted_clusters, side="left")
    offsets = np.empty(len(rows), dtype=np.int64)
    offsets[order] = running - running[starts]
    return offsets


def rank_within_clusters(
    ids: Sequence[str], clusters: np.ndarray, seed: int, keys: np.ndarray | None = None
) -> np.ndarray:
    """Each row's rank inside its cluster in a seeded shuffle of the cluster: (N,) -> (N,) int64.

    The shuffle sorts by ``id_rank_key(seed, "compose", id)`` (ties by id), so a row's rank
    depends only on the set of ids in its cluster, not on their order or sharding. ``keys``
    (N,) int64, when given, are those ``compose_keys(ids, seed)`` computed earlier.
    """
    ids = [str(i) for i in ids]
    clusters = np.asarray(clusters, dtype=np.int64)
    keys = compose_keys(ids, seed) if keys is None else np.asarray(keys, dtype=np.int64)
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
