"""score_batch / losses_and_features on the tiny model: order-independent, equal to per-row."""

from __future__ import annotations

import numpy as np
import torch

from slap_ray.assets import TINY_BPE_VOCAB, load_causal_lm
from slap_ray.core.features import PreconditionerCache, lm_head_features
from slap_ray.core.model import (
    IGNORE_INDEX,
    LogitsBuffer,
    forward_micro_batches,
    pad_batch,
    shift_labels,
)
from slap_ray.core.scoring import (
    ScoringSettings,
    ScoringState,
    Selection,
    calibrate_second_moment,
    losses_and_features,
    score_batch,
    selections_for,
)
from slap_ray.selection_spec import SelectionSpec

SETTINGS = ScoringSettings(pad_token_id=0)


def rows(count: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for _ in range(count):
        length, prompt = int(rng.integers(6, 30)), int(rng.integers(2, 5))
        tokens = rng.integers(1, TINY_BPE_VOCAB, size=length).tolist()
        ids.append(tokens)
        labels.append([-100] * prompt + tokens[prompt:])
    return ids, labels


def test_micro_batched_scores_equal_one_row_at_a_time():
    model = load_causal_lm("tiny-bpe")
    ids, labels = rows()
    settings = ScoringSettings(pad_token_id=0, micro_batch_size=4)
    losses, features = losses_and_features(model, ids, labels, settings)
    for j in (0, 3, 9):
        one_ids, mask, targets = pad_batch([ids[j]], [labels[j]], 0)
        with torch.no_grad():
            hidden = model.model(input_ids=one_ids, attention_mask=mask).last_hidden_state
            aligned = shift_labels(targets)
            expected_loss = torch.nn.functional.cross_entropy(
                model.lm_head(hidden)[0], aligned[0], ignore_index=IGNORE_INDEX
            )  # the mean over the row's response tokens
            expected = lm_head_features(hidden, model.lm_head.weight, aligned)[0]
        assert abs(losses[j] - float(expected_loss)) < 1e-4
        torch.testing.assert_close(features[j], expected, rtol=1e-3, atol=1e-6)
    # Methods other than SLAP skip the (B, V) features and get the same losses.
    only, none = losses_and_features(model, ids, labels, settings, with_features=False)
    assert none is None
    np.testing.assert_array_equal(only, losses)


def test_score_batch_keeps_round_fraction_per_alpha_and_is_seeded():
    model = load_causal_lm("tiny-bpe")
    ids, labels = rows(12, seed=1)
    moment = calibrate_second_moment(model, [(ids[:6], labels[:6])], 0).value()
    kwargs = dict(
        batch_key=7,
        selections=selections_for(SelectionSpec(), [0.25, 0.5], 3),
        state=ScoringState(second_moment=moment),
    )
    first = score_batch(model, ids, labels, SETTINGS, **kwargs)
    again = score_batch(model, ids, labels, SETTINGS, **kwargs)
    assert first.keep["a0.25"].sum() == 9 and first.keep["a0.5"].sum() == 6
    for key in ("a0.25", "a0.5"):
        assert first.keep[key].tolist() == again.keep[key].tolist()
    assert np.all(np.isfinite(first.losses))


def test_one_scoring_pass_serves_a_grid_of_selections():
    """A sweep's arms, alphas and seeds come from one forward pass; each equals its own run."""
    model = load_causal_lm("tiny-bpe")
    ids, labels = rows(16, seed=2)
    moment = calibrate_second_moment(model, [(ids[:8], labels[:8])], 0).value()
    grid = [
        Selection("slap__a0.25__s0", 0.25, 0, SelectionSpec()),
        Selection("slap__a0.25__s1", 0.25, 1, SelectionSpec()),
        Selection("raw__a0.25__s0", 0.25, 0, SelectionSpec(preconditioner="none")),
        Selection("ccs__a0.5__s0", 0.5, 0, SelectionSpec(method="ccs", num_strata=2)),
        Selection("infobatch__a0.25__s0", 0.25, 0, SelectionSpec(method="infobatch")),
    ]
    common = dict(batch_key=3, state=ScoringState(second_moment=moment))
    together = score_batch(model, ids, labels, SETTINGS, selections=grid, **common)
    for s in grid:
        alone = score_batch(model, ids, labels, SETTINGS, selections=[s], **common)
        assert together.keep[s.key].tolist() == alone.keep[s.key].tolist(), s.key
        np.testing.assert_array_equal(together.weight[s.key], alone.weight[s.key])
    raw = score_batch(
        model, ids, labels, SETTINGS, selections=[Selection("x", 0.25, 0, SelectionSpec())],
        batch_key=3, state=ScoringState(second_moment=None),
    )  # fmt: skip
    assert raw.keep["x"].tolist() == together.keep["raw__a0.25__s0"].tolist()
    assert (together.weight["infobatch__a0.25__s0"] > 1).any()


def test_a_scorers_preconditioner_cache_gives_the_uncached_scores_and_follows_the_moment():
    """The scorer builds 1 / (sqrt(s_hat) + eps) once for all its batches, not per batch; the
    cache is keyed on the moment tensor, so a new second moment is never served a stale one,
    whoever replaces it."""
    from slap_ray.config import SlapConfig
    from slap_ray.ray.scorer import Scorer, ScorerSettings

    model = load_causal_lm("tiny-bpe")
    ids, labels = rows(12, seed=4)
    moment = calibrate_second_moment(model, [(ids[:6], labels[:6])], 0).value()
    common = dict(selections=selections_for(SelectionSpec(), [0.5], 0))
    cache = PreconditionerCache()
    cached_state = ScoringState(second_moment=moment, preconditioners=cache)
    for key in (1, 2):
        cached = score_batch(
            model, ids, labels, SETTINGS, batch_key=key, state=cached_state, **common
        )
        fresh = score_batch(
            model, ids, labels, SETTINGS, batch_key=key, state=ScoringState(second_moment=moment),
            **common,
        )  # fmt: skip
        assert cached.keep["a0.5"].tolist() == fresh.keep["a0.5"].tolist()
        np.testing.assert_array_equal(cached.losses, fresh.losses)
    assert cache.built == [("adam", 1e-6)]

    def features(moment, preconditioners=None):
        state = ScoringState(second_moment=moment, preconditioners=preconditioners)
        return losses_and_features(model, ids, labels, SETTINGS, state)[1]

    before = features(moment, cache)
    reshaped = moment * torch.rand(moment.shape, generator=torch.Generator().manual_seed(0))
    after = features(reshaped, cache)
    torch.testing.assert_close(after, features(reshaped))
    assert not torch.allclose(after, before)  # the new moment mattered
    config = SlapConfig(model={"name": "tiny-bpe"})
    scorer = Scorer(ScorerSettings.from_config(config, common["selections"]))
    scorer.set_second_moment(moment)
    scorer.score(1, ids, labels)
    assert scorer.state.preconditioners.built == [("adam", 1e-6)]
    scorer.set_second_moment(reshaped)
    again = scorer.score(1, ids, labels)
    expected = score_batch(
        model, ids, labels, SETTINGS, batch_key=1, state=ScoringState(second_moment=reshaped),
        **common,
    )  # fmt: skip
    assert again["keep"]["a0.5"].tolist() == expected.keep["a0.5"].tolist()
    assert scorer.state.preconditioners.built == [("adam", 1e-6)]


def test_a_reused_logits_buffer_gives_bitwise_the_scores_of_fresh_logits():
    """A scorer keeps one N x V logits buffer across batches (fresh ones cost a page-zeroing
    mmap each); the same GEMM writes into it, so losses, features and kept rows are identical
    while batches of more, then fewer, response tokens reuse and grow one allocation."""
    model = load_causal_lm("tiny-bpe")
    buffer = LogitsBuffer()
    small, large = rows(6, seed=5), rows(12, seed=6)
    storage = []
    for ids, labels in (small, large, small):
        settings = ScoringSettings(pad_token_id=0, micro_batch_size=4)
        reused = losses_and_features(
            model, ids, labels, settings, ScoringState(logits_buffer=buffer)
        )
        fresh = losses_and_features(model, ids, labels, settings)
        np.testing.assert_array_equal(reused[0], fresh[0])
        assert torch.equal(reused[1], fresh[1])
        storage.append(buffer.take(1, 1, torch.float32, torch.device("cpu")).data_ptr())
    assert storage[1] == storage[2]  # the smaller batch after the larger: no new allocation
    moment = calibrate_second_moment(model, [large], 0, logits_buffer=buffer).value()
    assert torch.equal(moment, calibrate_second_moment(model, [large], 0).value())
    common = dict(batch_key=3, selections=selections_for(SelectionSpec(), [0.5], 0))
    with_buffer = score_batch(
        model, *large, SETTINGS, state=ScoringState(moment, logits_buffer=buffer), **common
    )
    without = score_batch(model, *large, SETTINGS, state=ScoringState(moment), **common)
    assert with_buffer.keep["a0.5"].tolist() == without.keep["a0.5"].tolist()


def test_the_logits_buffer_is_left_alone_where_autograd_needs_the_logits():
    model = load_causal_lm("tiny-bpe")
    ids, labels = rows(4, seed=7)
    buffer = LogitsBuffer()
    (micro,) = forward_micro_batches(model, ids, labels, 0, 4, grad=True, logits_buffer=buffer)
    (plain,) = forward_micro_batches(model, ids, labels, 0, 4, logits_buffer=buffer)
    taken = buffer.take(*plain.logits.shape, torch.float32, torch.device("cpu"))
    assert plain.logits.data_ptr() == taken.data_ptr()  # no autograd: written into the buffer
    assert micro.logits.requires_grad and micro.logits.data_ptr() != taken.data_ptr()
    assert torch.equal(plain.logits, micro.logits.detach())


def test_one_forward_pass_serves_every_preconditioner_kind():
    """A sweep with `adam`, `factored` and `none` arms forwards each batch once, not once per
    kind: the model's forward runs as often as for a single kind (its micro-batches)."""
    model = load_causal_lm("tiny-bpe")
    ids, labels = rows(12, seed=4)
    moment = calibrate_second_moment(model, [(ids[:6], labels[:6])], 0).value()
    calls = []
    hook = model.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        grid = [
            Selection(kind, 0.5, 0, SelectionSpec(preconditioner=kind))
            for kind in ("adam", "factored", "none")
        ] + [Selection("random", 0.5, 0, SelectionSpec(method="random"))]
        settings = ScoringSettings(pad_token_id=0, micro_batch_size=4)
        common = dict(batch_key=1, state=ScoringState(second_moment=moment))
        scores = score_batch(model, ids, labels, settings, selections=grid, **common)
        together = len(calls)
        calls.clear()
        score_batch(model, ids, labels, settings, selections=grid[:1], **common)
    finally:
        hook.remove()
    assert together == len(calls) == 3  # 12 rows in micro-batches of 4, once
    assert scores.forward_passes == 1
    assert len({tuple(scores.keep[k].tolist()) for k in ("adam", "factored", "none")}) >= 2
