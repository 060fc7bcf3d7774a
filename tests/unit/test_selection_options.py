"""The section 6 selection options (tau = inf, proportional budget, keep_mix, drop_top) against
reference implementations written from SLAP_METHOD.md, offline and on-policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slap_ray.config import build_config, load_config
from slap_ray.core.selection import (
    largest_remainder,
    loss_strata,
    n_keep_for,
    select_with,
    stratum_budgets,
)
from slap_ray.selection_spec import SelectionSpec

METHODS = ("slap", "random", "online_hard", "ccs", "infobatch", "full")


def batch(seed: int, size: int = 24, dim: int = 6, groups: int = 3):
    rng = np.random.default_rng(seed)
    losses = rng.gamma(2.0, 1.0, size)
    features = rng.normal(size=(size, dim))
    return losses, features, rng.integers(0, groups, size)


def reference_largest_remainder(total, sizes):
    exact = [total * s / sum(sizes) for s in sizes]
    shares = [int(np.floor(x)) for x in exact]
    # one more each to the largest remainders, ties to the lower index
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


def reference_keep_mix_slap(losses, features, groups, n_keep, rng, spec):
    """Section 6 keep_mix + section 1 steps 2-5, written as plainly as possible."""
    keys = sorted(set(groups.tolist()))
    members = {k: [i for i in range(len(losses)) if groups[i] == k] for k in keys}
    shares = reference_largest_remainder(n_keep, [len(members[k]) for k in keys])
    chosen = []
    for key, share in zip(keys, shares, strict=True):
        rows = members[key]
        if share == 0:
            continue
        strata = loss_strata(losses[rows], spec.num_strata, spec.strata)
        if spec.budget == "proportional":
            budgets = reference_largest_remainder(
                share, [int((strata == s).sum()) for s in range(spec.num_strata)]
            )
        else:
            keys_drawn = losses[rows] / spec.tau + rng.gumbel(size=len(rows))
            drawn = np.argsort(-keys_drawn, kind="stable")[:share]
            budgets = [int((strata[drawn] == s).sum()) for s in range(spec.num_strata)]
        for stratum, budget in enumerate(budgets):
            pool = [r for r, s in zip(rows, strata, strict=True) if s == stratum]
            for _ in range(budget):
                if not chosen:
                    chosen.append(pool[rng.integers(len(pool))])
                    continue
                best, best_distance = None, -1.0
                for r in pool:  # lowest index first: ties keep the first
                    if r in chosen:
                        continue
                    distance = min(np.linalg.norm(features[r] - features[c]) for c in chosen)
                    if distance > best_distance:
                        best, best_distance = r, distance
                chosen.append(best)
    return sorted(chosen)


def test_largest_remainder_matches_the_reference_and_breaks_ties_low():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 9, size=int(rng.integers(1, 6)))
        if sizes.sum() == 0:
            continue
        total = int(rng.integers(0, sizes.sum() + 1))
        assert largest_remainder(total, sizes).tolist() == reference_largest_remainder(
            total, sizes.tolist()
        )
    assert largest_remainder(6, np.array([5, 2, 1])).tolist() == [4, 1, 1]  # .75 .5 .75
    assert largest_remainder(1, np.array([2, 2])).tolist() == [1, 0]


@pytest.mark.parametrize("budget", ["loss", "proportional"])
@pytest.mark.parametrize("tau", [1.0, 0.5, float("inf")])
def test_keep_mix_slap_equals_the_reference(budget, tau):
    spec = SelectionSpec(keep_mix=True, budget=budget, tau=tau)
    for seed in range(6):
        losses, features, groups = batch(seed)
        n_keep = n_keep_for(len(losses), 0.3)
        kept, weights = select_with(
            spec, losses, features, n_keep, np.random.default_rng(seed), groups
        )
        expected = reference_keep_mix_slap(
            losses, features, groups, n_keep, np.random.default_rng(seed), spec
        )
        assert kept.tolist() == expected and np.all(weights == 1)
        counts = [int(np.isin(kept, np.flatnonzero(groups == g)).sum()) for g in range(3)]
        assert counts == reference_largest_remainder(n_keep, np.bincount(groups).tolist())


@pytest.mark.parametrize("method", METHODS)
def test_keep_mix_keeps_each_groups_share_for_every_method(method):
    losses, features, groups = batch(3, size=30)
    n_keep = n_keep_for(30, 0.4)
    spec = SelectionSpec(method=method, keep_mix=True)
    kept, _ = select_with(spec, losses, features, n_keep, np.random.default_rng(1), groups)
    shares = np.bincount(groups[kept], minlength=3).tolist()
    if method == "full":
        assert kept.tolist() == list(range(30))
        return
    assert shares == reference_largest_remainder(n_keep, np.bincount(groups).tolist())
    if method == "online_hard":  # the highest losses of each group
        for g in range(3):
            rows = np.flatnonzero(groups == g)
            top = rows[np.argsort(-losses[rows], kind="stable")[: shares[g]]]
            assert sorted(top.tolist()) == sorted(set(kept.tolist()) & set(rows.tolist()))


def test_proportional_budget_follows_the_strata_sizes_without_a_draw():
    losses = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 5.0, 5.1, 9.9])  # width strata of 5, 2, 1
    strata = loss_strata(losses, 3, "width")
    assert np.bincount(strata).tolist() == [5, 2, 1]
    rng = np.random.default_rng(0)
    budgets = stratum_budgets(losses, strata, 6, 3, 1.0, "proportional", rng)
    assert budgets.tolist() == [4, 1, 1]
    assert rng.random() == np.random.default_rng(0).random()  # no draw was made
    features = np.random.default_rng(1).normal(size=(8, 4))
    spec = SelectionSpec(budget="proportional")
    kept, _ = select_with(spec, losses, features, 6, np.random.default_rng(2))
    assert np.bincount(strata[kept], minlength=3).tolist() == [4, 1, 1]


def test_tau_inf_draws_the_budget_uniformly():
    losses = np.concatenate([np.zeros(12), np.full(4, 3.0), np.full(2, 8.0)])
    strata = loss_strata(losses, 3, "width")
    sizes = np.bincount(strata, minlength=3)
    runs = [
        stratum_budgets(losses, strata, 9, 3, float("inf"), "loss", np.random.default_rng(s))
        for s in range(3000)
    ]
    np.testing.assert_allclose(np.mean(runs, axis=0), 9 * sizes / sizes.sum(), atol=0.08)
    hot = [
        stratum_budgets(losses, strata, 9, 3, 1.0, "loss", np.random.default_rng(s))
        for s in range(300)
    ]
    assert np.mean(hot, axis=0)[2] > 1.9  # tau = 1: the two highest-loss rows nearly always


@pytest.mark.parametrize("method", METHODS)
def test_drop_top_removes_the_highest_losses_from_every_method(method):
    losses, features, groups = batch(5, size=20)
    losses[[3, 7]] = losses.max() + 1.0  # a tie at the top: the lower index goes first
    spec = SelectionSpec(method=method, drop_top=0.1)  # floor(0.1 * 20) = 2 rows
    for alpha in (0.0, 0.05, 0.3):
        n_keep = n_keep_for(20, alpha)
        kept, _ = select_with(spec, losses, features, n_keep, np.random.default_rng(0), groups)
        assert not {3, 7} & set(kept.tolist())
        assert len(kept) == min(n_keep, 18) if method != "full" else len(kept) == 18
    three = SelectionSpec(method="online_hard", drop_top=0.1)
    losses[[3, 7, 9]] = losses.max() + 1.0  # three tied at the top: 3 and 7 are dropped
    kept, _ = select_with(three, losses, None, 10, np.random.default_rng(0))
    assert 9 in kept.tolist() and not {3, 7} & set(kept.tolist())


def test_the_options_are_config_keys_and_sweep_arm_options():
    config = load_config(None, ["select.tau=inf", "select.budget=proportional"])
    assert (
        config.select.spec().tau == float("inf") and config.select.spec().budget == "proportional"
    )
    config = build_config(
        {
            "sweep": {
                "arms": [
                    {"method": "slap", "keep_mix": True, "drop_top": 0.05},
                    {"method": "slap", "tau": "inf"},
                    {"method": "slap", "budget": "proportional"},
                    {"method": "slap", "preconditioner": "factored"},
                    {"method": "random", "keep_mix": True},
                ],
                "alphas": [0.3],
                "seeds": [0],
                "modes": ["offline", "online"],
            }
        }
    )
    labels = [a.label() for a in config.sweep.arms]
    assert labels == [
        "slap-keep_mix-drop_top0.05", "slap-tauinf", "slap-proportional", "slap-factored",
        "random-keep_mix",
    ]  # fmt: skip
    from slap_ray.jobs.sweep import trial_config, trial_grid

    specs = {(s.arm, s.mode): s for s in trial_grid(config)}
    assert specs[("slap-keep_mix-drop_top0.05", "offline")].selection.drop_top == 0.05
    online = trial_config(
        {**config.model_dump(mode="json", by_alias=True)},
        specs[("slap-keep_mix-drop_top0.05", "online")],
        __import__("pathlib").Path("/tmp/sweep"),
    )
    assert online.select.keep_mix and online.select.drop_top == 0.05
    assert online.select.mode == "online"
    for bad in (["select.tau=0"], ["select.drop_top=1"], ["select.budget=even"]):
        with pytest.raises(Exception, match=bad[0].split("=")[0].split(".")[1]):
            load_config(None, bad)


def test_on_policy_keep_mix_and_drop_top():
    """The training step keeps the batch's sources in proportion and never trains the dropped
    rows; its gradient is that of the kept rows alone (the reference of test_onpolicy)."""
    from test_onpolicy import batch as token_batch
    from test_onpolicy import grads, reference_gradients

    from slap_ray.assets import load_causal_lm
    from slap_ray.core.onpolicy import SelectionSettings, onpolicy_step

    torch.manual_seed(0)
    model = load_causal_lm("tiny-bpe-untied").train()
    examples = token_batch(12, seed=4)
    sources = ["gsm8k"] * 6 + ["dolly"] * 4 + ["nq"] * 2
    spec = SelectionSpec(keep_mix=True, drop_top=0.25)
    settings = SelectionSettings(spec, alpha=0.0)  # keep all that drop_top leaves
    stats = onpolicy_step(
        model, examples, range(12), 12, settings, np.random.default_rng(2), pad_token_id=0,
        groups=sources,
    )  # fmt: skip
    dropped = np.argsort(-stats.losses, kind="stable")[:3]
    assert len(stats.kept) == 9 and not set(dropped.tolist()) & set(stats.kept.tolist())
    expected = reference_gradients(model, examples, stats.kept.tolist())
    for name, value in grads(model).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)
    mixed = onpolicy_step(
        model, examples, range(12), 12, SelectionSettings(SelectionSpec(keep_mix=True), alpha=0.5),
        np.random.default_rng(2), pad_token_id=0, groups=sources,
    )  # fmt: skip
    kept_sources = [sources[i] for i in mixed.kept]
    assert [kept_sources.count(s) for s in ("dolly", "gsm8k", "nq")] == [2, 3, 1]
