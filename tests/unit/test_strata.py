"""k-means, largest-remainder apportionment and stratified batch composition."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from slap_ray.core.seeds import derive_seed
from slap_ray.core.strata import (
    assign_clusters,
    bucket_bits,
    bucket_offsets,
    compose_batches,
    compose_keys,
    key_buckets,
    kmeans_fit,
    rank_within_clusters,
    stratified_positions,
)


def blobs(seed=0, per=50):
    rng = np.random.default_rng(seed)
    centers = np.array([[0, 0], [10, 0], [0, 10]], dtype=float)
    points = np.concatenate([c + rng.normal(scale=0.5, size=(per, 2)) for c in centers])
    return points, np.repeat(np.arange(3), per)


def test_kmeans_recovers_separated_blobs_deterministically():
    points, truth = blobs()
    centroids = kmeans_fit(points, 3, seed=0)
    labels = assign_clusters(points, centroids)
    # each true blob maps to exactly one cluster
    assert all(len(set(labels[truth == k].tolist())) == 1 for k in range(3))
    assert len(set(labels.tolist())) == 3
    np.testing.assert_array_equal(kmeans_fit(points, 3, seed=0), centroids)


def test_kmeans_rejects_bad_cluster_count():
    points, _ = blobs(per=2)
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans_fit(points, 7, seed=0)


def _webster_by_hand(counts: list[int]) -> list[tuple[int, int]]:
    """Brute force: hand out seats one at a time to the highest n_c / (2 s_c + 1)."""
    seats, order = [0] * len(counts), []
    for _ in range(sum(counts)):
        best = max(
            (c for c in range(len(counts)) if seats[c] < counts[c]),
            key=lambda c: (Fraction(counts[c], 2 * seats[c] + 1), -c),
        )
        order.append((best, seats[best]))
        seats[best] += 1
    return order


@pytest.mark.parametrize("counts", [[5, 3, 2], [1, 1, 1], [7, 0, 7, 1], [100, 1, 13, 40], [9]])
def test_stratified_positions_match_seat_by_seat_webster(counts):
    order = _webster_by_hand(counts)
    clusters = np.array([c for c, _ in order])
    ranks = np.array([r for _, r in order])
    got = stratified_positions(ranks, clusters, np.array(counts))
    assert got.tolist() == list(range(sum(counts)))


def test_compose_batches_mirrors_the_mix_and_covers_every_row():
    rng = np.random.default_rng(1)
    ids = [f"row-{i:04d}" for i in range(1000)]
    clusters = rng.choice(4, size=1000, p=[0.5, 0.25, 0.15, 0.10])
    batch_of = compose_batches(ids, clusters, 32, seed=3)
    assert (batch_of >= 0).all()
    sizes = np.bincount(batch_of)
    assert (sizes[:-1] == 32).all() and sizes.sum() == 1000
    share = np.bincount(clusters, minlength=4) / 1000
    for b in range(len(sizes) - 1):
        counts = np.bincount(clusters[batch_of == b], minlength=4)
        assert np.all(np.abs(counts - 32 * share) <= 2.0), (b, counts)


def test_compose_batches_ignores_input_order():
    rng = np.random.default_rng(2)
    ids = np.array([f"id{i}" for i in range(300)])
    clusters = rng.integers(0, 3, 300)
    first = dict(zip(ids.tolist(), compose_batches(ids, clusters, 16, 9).tolist(), strict=True))
    order = rng.permutation(300)
    second = dict(
        zip(
            ids[order].tolist(),
            compose_batches(ids[order], clusters[order], 16, 9).tolist(),
            strict=True,
        )
    )
    assert first == second


def test_derive_seed_is_stable_and_separates_stages():
    assert derive_seed(0, "select", 3) == derive_seed(0, "select", 3)
    assert derive_seed(0, "select", 3) != derive_seed(0, "select", 4)
    assert derive_seed(0, "select", 3) != derive_seed(1, "select", 3)
    assert 0 <= derive_seed(5, "x") < 2**63


def test_kmeans_with_duplicated_points_fills_every_cluster_with_a_real_point():
    """More clusters than distinct points in one region: no NaN or duplicated reseed."""
    points = np.concatenate([np.zeros((40, 3)), np.ones((3, 3)), np.full((2, 3), 5.0)])
    centroids = kmeans_fit(points, 3, seed=1)
    assert np.isfinite(centroids).all()
    labels = assign_clusters(points, centroids)
    assert sorted(np.bincount(labels).tolist()) == [2, 3, 40]


@pytest.mark.parametrize("bits", [0, 1, 3, 6])
def test_ranks_by_key_bucket_equal_ranks_over_the_whole_cluster(bits):
    """The streaming compose ranks each (cluster, key bucket) apart and offsets it by the
    bucket counts: the same ranks as sorting each whole cluster."""
    rng = np.random.default_rng(4)
    ids = np.array([f"r{i}" for i in range(600)])
    clusters = rng.choice(3, size=600, p=[0.6, 0.3, 0.1])
    keys = compose_keys(ids.tolist(), 7)
    buckets = key_buckets(keys, bits)
    assert buckets.min() >= 0 and buckets.max() < 2**bits
    pairs, rows = np.unique(np.stack([clusters, buckets], axis=1), axis=0, return_counts=True)
    assert len(pairs) >= min(2**bits, 8)  # the buckets really split the clusters
    offsets = bucket_offsets(pairs[:, 0], pairs[:, 1], rows)
    got = np.full(600, -1)
    for (cluster, bucket), offset in zip(pairs.tolist(), offsets.tolist(), strict=True):
        mask = (clusters == cluster) & (buckets == bucket)
        ranks = rank_within_clusters(ids[mask].tolist(), clusters[mask], 7, keys[mask])
        got[mask] = offset + ranks
    np.testing.assert_array_equal(got, rank_within_clusters(ids.tolist(), clusters, 7))


def test_bucket_offsets_count_lower_buckets_of_the_same_cluster_in_any_order():
    clusters, buckets, rows = [1, 0, 1, 0, 1], [2, 0, 0, 1, 1], [5, 3, 4, 2, 7]
    assert bucket_offsets(clusters, buckets, rows).tolist() == [11, 0, 0, 3, 4]


@pytest.mark.parametrize(
    ("largest", "bits"),
    [
        (0, 0),
        (1, 0),
        (50_000, 0),
        (50_001, 1),
        (100_000, 1),
        (100_001, 2),
        (125_000, 2),
        (10**12, 16),
    ],
)
def test_bucket_bits_give_buckets_of_at_most_the_group_size(largest, bits):
    assert bucket_bits(largest, 50_000) == bits
