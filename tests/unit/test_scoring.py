"""score_batch / losses_and_features on the tiny model: order-independent, equal to per-row."""

from __future__ import annotations

import numpy as np
import torch

from slap_ray.assets import load_causal_lm
from slap_ray.core.features import lm_head_features, response_token_losses
from slap_ray.core.model import pad_batch, shift_labels
from slap_ray.core.scoring import calibrate_second_moment, losses_and_features, score_batch


def rows(count: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for _ in range(count):
        length, prompt = int(rng.integers(6, 30)), int(rng.integers(2, 5))
        tokens = rng.integers(1, 49152, size=length).tolist()
        ids.append(tokens)
        labels.append([-100] * prompt + tokens[prompt:])
    return ids, labels


def test_micro_batched_scores_equal_one_row_at_a_time():
    model = load_causal_lm("tiny-random")
    ids, labels = rows()
    losses, features = losses_and_features(model, ids, labels, 0, None, micro_batch_size=4)
    for j in (0, 3, 9):
        one_ids, mask, targets = pad_batch([ids[j]], [labels[j]], 0)
        with torch.no_grad():
            hidden = model.model(input_ids=one_ids, attention_mask=mask).last_hidden_state
            aligned = shift_labels(targets)
            expected_loss = response_token_losses(model.lm_head(hidden), aligned)[0]
            expected = lm_head_features(hidden, model.lm_head.weight, aligned)[0]
        assert abs(losses[j] - float(expected_loss)) < 1e-4
        torch.testing.assert_close(features[j], expected, rtol=1e-3, atol=1e-6)


def test_score_batch_keeps_round_fraction_per_alpha_and_is_seeded():
    model = load_causal_lm("tiny-random")
    ids, labels = rows(12, seed=1)
    moment = calibrate_second_moment(model, [(ids[:6], labels[:6])], 0).value()
    kwargs = dict(
        batch_key=7, seed=3, alphas=[0.25, 0.5], method="slap", pad_token_id=0, second_moment=moment
    )
    first = score_batch(model, ids, labels, **kwargs)
    again = score_batch(model, ids, labels, **kwargs)
    assert first.keep[0.25].sum() == 9 and first.keep[0.5].sum() == 6
    for alpha in (0.25, 0.5):
        assert first.keep[alpha].tolist() == again.keep[alpha].tolist()
    assert np.all(np.isfinite(first.losses))
