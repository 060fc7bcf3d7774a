"""slap_select against brute-force references, and each baseline on a hand-computed case."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from slap_ray.core.selection import (
    ccs_select,
    exp_loss_draw,
    infobatch_select,
    loss_strata,
    n_keep_for,
    select,
    slap_select,
)


def batch(seed: int = 0, size: int = 32, dim: int = 16):
    rng = np.random.default_rng(seed)
    return rng.gamma(2.0, 1.0, size=size), rng.normal(size=(size, dim))


def brute_force_slap(losses, features, n_keep, seed, num_strata=3, tau=1.0, strata="width"):
    """Straight from SLAP_METHOD.md, with python loops and sequential (not Gumbel) code."""
    rng = np.random.default_rng(seed)
    stratum = loss_strata(losses, num_strata, strata)
    drawn = exp_loss_draw(losses, n_keep, tau, rng)
    budgets = [int(np.sum(stratum[drawn] == s)) for s in range(num_strata)]
    chosen: list[int] = []
    for s in range(num_strata):
        members = [i for i in range(len(losses)) if stratum[i] == s]
        for _ in range(budgets[s]):
            if not chosen:
                chosen.append(members[rng.integers(len(members))])
                continue
            best, best_distance = None, -1.0
            for i in members:
                if i in chosen:
                    continue
                distance = min(np.linalg.norm(features[i] - features[k]) for k in chosen)
                if distance > best_distance:  # strict: ties keep the lower index
                    best, best_distance = i, distance
            chosen.append(best)
    return chosen


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("strata", ["width", "quantile"])
def test_slap_matches_brute_force(seed, strata):
    losses, features = batch(seed)
    n_keep = n_keep_for(32, 0.3)
    got = slap_select(losses, features, n_keep, np.random.default_rng(seed), strata=strata)
    expected = brute_force_slap(losses, features, n_keep, seed, strata=strata)
    assert got.tolist() == sorted(expected)
    assert len(got) == n_keep == 22 and len(set(got.tolist())) == n_keep
    assert got.dtype == np.int64


def test_same_seed_same_result_other_seed_differs():
    losses, features = batch(1)
    first = slap_select(losses, features, 20, np.random.default_rng(7))
    again = slap_select(losses, features, 20, np.random.default_rng(7))
    assert first.tolist() == again.tolist()
    others = {tuple(slap_select(losses, features, 20, np.random.default_rng(s))) for s in range(10)}
    assert len(others) > 1


def test_per_stratum_counts_equal_the_exp_loss_draw():
    losses, features = batch(2)
    for seed in range(10):
        selected = slap_select(losses, features, 18, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        drawn = exp_loss_draw(losses, 18, 1.0, rng)
        stratum = loss_strata(losses, 3)
        expected = np.bincount(stratum[drawn], minlength=3)
        assert np.bincount(stratum[selected], minlength=3).tolist() == expected.tolist()


def test_exp_loss_draw_has_the_sequential_distribution():
    """Inclusion probabilities of the Gumbel-top-k draw equal exact sequential-draw ones."""
    losses = np.array([0.0, 0.5, 1.0, 2.0, 3.0])
    weights = np.exp(losses)
    exact = np.zeros(5)
    for first, second in itertools.permutations(range(5), 2):
        p = weights[first] / weights.sum() * weights[second] / (weights.sum() - weights[first])
        exact[[first, second]] += p
    rng = np.random.default_rng(0)
    trials = 20000
    counts = np.zeros(5)
    for _ in range(trials):
        counts[exp_loss_draw(losses, 2, 1.0, rng)] += 1
    np.testing.assert_allclose(counts / trials, exact, atol=0.015)


def test_one_stratum_is_plain_farthest_point():
    losses, features = batch(3)
    got = slap_select(losses, features, 10, np.random.default_rng(4), num_strata=1)
    rng = np.random.default_rng(4)
    rng.gumbel(size=32)  # the budget draw happens first, even with one stratum
    chosen = [int(rng.integers(32))]
    while len(chosen) < 10:
        distance = [
            -1 if i in chosen else min(np.linalg.norm(features[i] - features[k]) for k in chosen)
            for i in range(32)
        ]
        chosen.append(int(np.argmax(distance)))
    assert got.tolist() == sorted(chosen)


def test_equal_losses_and_edge_budgets():
    _, features = batch(4)
    equal = np.full(32, 1.5)
    for n_keep in (0, 1, 17, 32):
        got = slap_select(equal, features, n_keep, np.random.default_rng(0))
        assert len(got) == n_keep == len(np.unique(got))
    assert slap_select(equal, features, 32, np.random.default_rng(0)).tolist() == list(range(32))


def test_identical_features_tie_break_by_lowest_index():
    losses = np.zeros(6)
    features = np.zeros((6, 3))
    rng = np.random.default_rng(0)
    got = slap_select(losses, features, 3, rng, num_strata=1)
    replay = np.random.default_rng(0)
    replay.gumbel(size=6)
    first = int(replay.integers(6))
    expected = sorted([first] + [i for i in range(6) if i != first][:2])
    assert got.tolist() == expected


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_losses_rejected(bad):
    losses, features = batch(5)
    losses[3] = bad
    with pytest.raises(ValueError, match="finite.*\\[3\\]"):
        slap_select(losses, features, 10, np.random.default_rng(0))


def test_bad_arguments_rejected():
    losses, features = batch(6)
    with pytest.raises(ValueError, match="n_keep"):
        slap_select(losses, features, 33, np.random.default_rng(0))
    with pytest.raises(ValueError, match="features"):
        slap_select(losses, features[:5], 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown selection method"):
        select("nope", losses, features, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown selection options"):
        select("slap", losses, features, 3, np.random.default_rng(0), temperature=2)


def test_loss_strata_width_and_quantile():
    losses = np.array([0.0, 1.0, 2.0, 3.0, 9.0, 10.0])
    assert loss_strata(losses, 3, "width").tolist() == [0, 0, 0, 0, 2, 2]
    assert loss_strata(losses, 3, "quantile").tolist() == [0, 0, 1, 1, 2, 2]


def test_n_keep_rounds_half_up():
    assert n_keep_for(10, 0.3) == 7
    assert n_keep_for(5, 0.5) == 3
    assert n_keep_for(32, 0.0) == 32
    with pytest.raises(ValueError):
        n_keep_for(32, 1.0)


# ---- baselines on hand-computed cases -------------------------------------------------------

LOSSES = np.array([0.5, 4.0, 1.0, 3.0, 0.2, 2.5])


def test_random_is_uniform_without_replacement():
    got = select("random", LOSSES, None, 4, np.random.default_rng(0))
    assert got.tolist() == sorted(np.random.default_rng(0).choice(6, 4, replace=False).tolist())


def test_full_keeps_everything():
    assert select("full", LOSSES, None, 2, np.random.default_rng(0)).tolist() == list(range(6))


def test_online_hard_keeps_highest_losses():
    assert select("online_hard", LOSSES, None, 3, np.random.default_rng(0)).tolist() == [1, 3, 5]
    ties = np.array([1.0, 2.0, 2.0, 2.0])
    assert select("online_hard", ties, None, 2, np.random.default_rng(0)).tolist() == [1, 2]


def test_ccs_budget_smallest_strata_first():
    # width strata over [0.2, 4.0]: edges 1.467, 2.733 -> {0,2,4} low, {5} mid, {1,3} high.
    assert loss_strata(LOSSES, 3).tolist() == [0, 2, 0, 2, 0, 1]
    # budget 4: mid (size 1) gets min(1, 4//3=1)=1; high (2) gets min(2, 3//2=1)=1; low gets 2.
    for seed in range(20):
        got = ccs_select(LOSSES, 4, np.random.default_rng(seed))
        strata = loss_strata(LOSSES, 3)[got]
        assert np.bincount(strata, minlength=3).tolist() == [2, 1, 1]
    assert len(ccs_select(LOSSES, 6, np.random.default_rng(0))) == 6


def test_infobatch_prunes_only_below_mean_and_reweights():
    # mean = 1.8667: low = {0, 2, 4}; pruning 2 of them gives r = 2/3, weight 3 for the kept one.
    for seed in range(20):
        kept, weights = infobatch_select(LOSSES, 4, np.random.default_rng(seed))
        assert {1, 3, 5} <= set(kept.tolist()) and len(kept) == 4
        low_kept = [k for k in kept if k in (0, 2, 4)]
        assert len(low_kept) == 1
        assert weights[kept.tolist().index(low_kept[0])] == pytest.approx(3.0)
        assert sorted(weights.tolist()) == [1.0, 1.0, 1.0, 3.0]
    assert select("infobatch", LOSSES, None, 4, np.random.default_rng(0)).tolist() == sorted(
        infobatch_select(LOSSES, 4, np.random.default_rng(0))[0].tolist()
    )


def test_infobatch_prunes_beyond_the_low_half_when_it_must():
    kept, weights = infobatch_select(LOSSES, 2, np.random.default_rng(0))
    assert len(kept) == 2 and set(kept.tolist()) <= {1, 3, 5}
    assert weights.tolist() == [1.0, 1.0]
