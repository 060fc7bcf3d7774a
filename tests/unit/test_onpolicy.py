"""On-policy SLAP step: counts from the loop, gradient against a direct autograd reference.

The reference forwards only the kept examples through the plain Hugging Face model (its own
``forward(labels=...)`` path, not ours) and differentiates the mean of their mean losses.
Data parallelism is checked with two threads sharing a barrier-based collective.
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from slap_ray.assets import TINY_BPE_VOCAB, load_causal_lm
from slap_ray.core.features import SecondMomentEMA, lm_head_example_gradient_sum
from slap_ray.core.model import forward_response_logits, pad_batch, shift_labels
from slap_ray.core.onpolicy import SelectionSettings, onpolicy_step
from slap_ray.core.scoring import calibrate_second_moment
from slap_ray.selection_spec import SelectionSpec


def batch(count: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(count):
        length, prompt = int(rng.integers(8, 24)), int(rng.integers(2, 6))
        tokens = rng.integers(1, TINY_BPE_VOCAB, size=length).tolist()
        examples.append((tokens, [-100] * prompt + tokens[prompt:]))
    return examples


def lora(model):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return get_peft_model(model, config)


def reference_gradients(model, examples, kept, weights=None):
    """d/dtheta of mean_j w_j loss_j over the kept rows, each loss from HF's own forward."""
    model.zero_grad(set_to_none=True)
    weights = np.ones(len(kept)) if weights is None else weights
    total = 0.0
    for j, w in zip(kept, weights, strict=True):
        ids = torch.tensor([examples[j][0]])
        labels = torch.tensor([examples[j][1]])
        total = total + w * model(input_ids=ids, labels=labels).loss
    (total / len(kept)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("method", ["slap", "online_hard", "infobatch"])
def test_step_backpropagates_kept_rows_and_matches_direct_gradient(mode, method):
    torch.manual_seed(0)
    model = load_causal_lm("tiny-bpe-untied").train()
    if mode == "lora":
        model = lora(model)
    examples = batch(10)
    settings = SelectionSettings(SelectionSpec(method=method), alpha=0.3)
    stats = onpolicy_step(
        model, examples, range(10), 10, settings, np.random.default_rng(5), pad_token_id=0
    )
    assert stats.local_backward_examples == 7 and stats.backward_examples == 7
    assert len(stats.kept) == 7 and stats.forward_examples == 10
    assert stats.backward_tokens == sum(len(examples[j][0]) for j in stats.kept)
    ours = grads(model)
    weights = None
    if method == "infobatch":
        from slap_ray.core.selection import select_weighted

        _, weights = select_weighted("infobatch", stats.losses, None, 7, np.random.default_rng(5))
    expected = reference_gradients(model, examples, stats.kept.tolist(), weights)
    assert set(ours) == set(expected)
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-4, atol=1e-6)
    if mode == "lora":
        assert all("lora_" in name for name in ours)


def test_pruned_rows_get_no_gradient_and_frozen_weights_none():
    model = lora(load_causal_lm("tiny-bpe-untied").train())
    examples = batch(10, seed=3)
    stats = onpolicy_step(
        model, examples, range(10), 10, SelectionSettings(alpha=0.3),
        np.random.default_rng(1), pad_token_id=0,
    )  # fmt: skip
    pruned = sorted(set(range(10)) - set(stats.kept.tolist()))
    assert len(pruned) == 3
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
    # The loss the step saw for each row is the loss of that row alone.
    for j in pruned:
        with torch.no_grad():
            alone = model(
                input_ids=torch.tensor([examples[j][0]]), labels=torch.tensor([examples[j][1]])
            )
        assert abs(stats.losses[j] - float(alone.loss)) < 1e-4


def test_full_batch_streams_and_equals_mean_loss_gradient():
    model = load_causal_lm("tiny-bpe").train()
    examples = batch(6, seed=2)
    stats = onpolicy_step(
        model, examples, range(6), 6, SelectionSettings(SelectionSpec(method="full"), alpha=0.0),
        np.random.default_rng(0), pad_token_id=0, micro_batch_size=4,
    )  # fmt: skip
    assert stats.backward_examples == 6 and stats.kept.tolist() == list(range(6))
    ours = grads(model)
    expected = reference_gradients(model, examples, list(range(6)))
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-4, atol=1e-6)


def test_lm_head_ema_gets_the_objectives_lm_head_gradient():
    model = load_causal_lm("tiny-bpe-untied").train()
    examples = batch(10, seed=4)
    ema = SecondMomentEMA(beta2=0.5)
    stats = onpolicy_step(
        model, examples, range(10), 10, SelectionSettings(alpha=0.3),
        np.random.default_rng(2), pad_token_id=0, lm_head_ema=ema,
    )  # fmt: skip
    # One update from zero: bias-corrected value is the squared gradient itself.
    torch.testing.assert_close(
        ema.value(), model.lm_head.weight.grad.float() ** 2, rtol=1e-3, atol=1e-10
    )
    assert stats.backward_examples == 7


class ThreadCollective:
    """Two threads standing in for two data-parallel workers."""

    def __init__(self, shared, rank, world_size):
        self.shared, self.rank, self.world_size = shared, rank, world_size

    def _exchange(self, value):
        self.shared["barrier"].wait()
        self.shared["slots"][self.rank] = value
        self.shared["barrier"].wait()
        out = list(self.shared["slots"])
        self.shared["barrier"].wait()
        return out

    def all_gather(self, obj):
        return self._exchange(obj)

    def all_reduce_sum_(self, tensor):
        values = self._exchange(tensor.clone())
        tensor.copy_(sum(values[1:], values[0]))


def steps_on_thread_workers(base, examples, workers: int, settings, seed: int):
    """One on-policy step on ``workers`` thread-workers (rows dealt round-robin, a thread
    collective) and the same step on one worker; returns (single, its stats, replicas, stats)."""
    total = len(examples)
    single = copy.deepcopy(base)
    expected = onpolicy_step(
        single, examples, range(total), total, settings, np.random.default_rng(seed),
        pad_token_id=0,
    )  # fmt: skip
    shared = {"barrier": threading.Barrier(workers), "slots": [None] * workers}
    replicas = [copy.deepcopy(base) for _ in range(workers)]
    results = [None] * workers

    def worker(rank):
        positions = list(range(rank, total, workers))
        results[rank] = onpolicy_step(
            replicas[rank], [examples[p] for p in positions], positions, total, settings,
            np.random.default_rng(seed), pad_token_id=0,
            collective=ThreadCollective(shared, rank, workers),
        )  # fmt: skip

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return single, expected, replicas, results


def test_two_workers_select_the_same_rows_and_sum_to_the_single_worker_gradient():
    torch.manual_seed(0)
    base = lora(load_causal_lm("tiny-bpe-untied").train())
    single, expected, replicas, results = steps_on_thread_workers(
        base, batch(10, seed=6), 2, SelectionSettings(alpha=0.3), seed=9
    )
    for result in results:
        assert result.kept.tolist() == expected.kept.tolist()
        assert result.backward_examples == 7
    assert sum(r.local_backward_examples for r in results) == 7
    reference = grads(single)
    for replica in replicas:
        for name, value in grads(replica).items():
            torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-7)


def test_example_gradient_sum_matches_autograd_on_lm_head():
    model = load_causal_lm("tiny-bpe-untied")
    examples = batch(4, seed=8)
    ids, mask, targets = pad_batch([e[0] for e in examples], [e[1] for e in examples], 0)
    aligned = shift_labels(targets)
    weights = torch.tensor([0.5, 0.0, 1.0, 2.0])
    with torch.no_grad():
        hidden, logits = forward_response_logits(model, ids, mask, aligned)
    ours = lm_head_example_gradient_sum(
        hidden, model.lm_head.weight, aligned, weights, logits=logits
    )
    model.zero_grad()
    total = sum(
        w * model(input_ids=torch.tensor([e[0]]), labels=torch.tensor([e[1]])).loss
        for w, e in zip(weights.tolist(), examples, strict=True)
    )
    total.backward()
    torch.testing.assert_close(ours, model.lm_head.weight.grad, rtol=1e-4, atol=1e-7)


def test_bf16_autocast_step_keeps_fp32_gradients():
    from functools import partial

    model = load_causal_lm("tiny-bpe").train()
    stats = onpolicy_step(
        model, batch(10, seed=11), range(10), 10, SelectionSettings(alpha=0.3),
        np.random.default_rng(0), pad_token_id=0,
        autocast=partial(torch.autocast, device_type="cpu", dtype=torch.bfloat16),
    )  # fmt: skip
    assert stats.backward_examples == 7 and np.all(np.isfinite(stats.losses))
    for p in model.parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def test_budget_of_zero_rows_skips_the_step():
    """alpha 0.9 keeps round(0.1 * 4) = 0 of a batch of 4, and 0 of a final batch of 1."""
    model = load_causal_lm("tiny-bpe").train()
    examples = batch(5, seed=12)
    for rows in (examples[:4], examples[4:]):
        stats = onpolicy_step(
            model, rows, range(len(rows)), len(rows), SelectionSettings(alpha=0.9),
            np.random.default_rng(0), pad_token_id=0,
        )  # fmt: skip
        assert stats.skipped and stats.backward_examples == 0 and len(stats.kept) == 0
        assert all(p.grad is None for p in model.parameters())
    # alpha 0.7 on a 1-row final batch: also nothing to keep
    stats = onpolicy_step(
        model, examples[:1], [0], 1, SelectionSettings(SelectionSpec(method="random"), alpha=0.7),
        np.random.default_rng(0), pad_token_id=0,
    )  # fmt: skip
    assert stats.skipped


def test_four_workers_on_a_three_row_batch():
    """Worker 3 gets no row of the short final batch; the step still agrees with one worker."""
    torch.manual_seed(0)
    base = lora(load_causal_lm("tiny-bpe-untied").train())
    settings = SelectionSettings(alpha=0.3)  # keeps round(0.7 * 3) = 2
    single, expected, replicas, results = steps_on_thread_workers(
        base, batch(3, seed=13), 4, settings, seed=4
    )
    assert results[3] is not None and results[3].local_backward_examples == 0
    for result in results:
        assert result.kept.tolist() == expected.kept.tolist() and result.backward_examples == 2
    reference = grads(single)
    for name, value in grads(replicas[3]).items():
        torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-7)


def test_offline_weighted_objective_equals_autograd():
    """Offline InfoBatch: each kept row trains with its weight, sum_j w_j loss_j / B."""
    model = load_causal_lm("tiny-bpe-untied").train()
    examples = batch(6, seed=14)
    weights = [1.0, 2.5, 1.0, 0.5, 1.0, 1.25]
    stats = onpolicy_step(
        model, examples, range(6), 6, SelectionSettings(SelectionSpec(method="full"), alpha=0.0),
        np.random.default_rng(0), pad_token_id=0, micro_batch_size=4, example_weights=weights,
    )  # fmt: skip
    ours = grads(model)
    expected = reference_gradients(model, examples, list(range(6)), weights)
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-4, atol=1e-6)
    losses = stats.losses
    assert stats.objective == pytest.approx(float(np.dot(weights, losses) / 6))


def test_offline_calibration_equals_the_online_ema_after_the_same_batches():
    """SLAP_METHOD.md section 1: both paths fold in the LM-head gradient of the mean over
    examples of their mean response loss (not a token-weighted batch loss)."""
    model = lora(load_causal_lm("tiny-bpe-untied")).train()
    batches = [batch(6, seed=20), batch(5, seed=21)]
    online = SecondMomentEMA(beta2=0.9)
    for rows in batches:
        onpolicy_step(
            model, rows, range(len(rows)), len(rows), SelectionSettings(SelectionSpec(method="full"), alpha=0.0),
            np.random.default_rng(0), pad_token_id=0, micro_batch_size=2, lm_head_ema=online,
        )  # fmt: skip
        model.zero_grad(set_to_none=True)  # no optimizer step: the model stays as it was
    offline = calibrate_second_moment(
        model,
        [([e[0] for e in rows], [e[1] for e in rows]) for rows in batches],
        pad_token_id=0,
        beta2=0.9,
        micro_batch_size=4,
    )
    assert offline.steps == online.steps == 2
    torch.testing.assert_close(offline.value(), online.value(), rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("method", ["slap", "infobatch"])
def test_recompute_keeps_the_same_rows_and_gradient_as_kept_graphs(mode, method):
    """Recompute (no-grad scoring forward, then forward + backward of the kept rows only)
    selects the same rows as kept graphs from the same model state, and its gradient is the
    autograd gradient of the kept rows' objective."""
    torch.manual_seed(0)
    base = load_causal_lm("tiny-bpe-untied").train()
    if mode == "lora":
        base = lora(base)
    examples = batch(12, seed=11)
    outcomes, emas = {}, {}
    for onpolicy in ("kept_graphs", "recompute"):
        model = copy.deepcopy(base)
        emas[onpolicy] = SecondMomentEMA(beta2=0.5) if mode == "lora" else None
        settings = SelectionSettings(
            SelectionSpec(method=method), alpha=0.3, onpolicy=onpolicy, score_micro_batch_size=5
        )
        stats = onpolicy_step(
            model, examples, range(12), 12, settings, np.random.default_rng(4), pad_token_id=0,
            micro_batch_size=1 if onpolicy == "kept_graphs" else 3, lm_head_ema=emas[onpolicy],
        )  # fmt: skip
        outcomes[onpolicy] = (stats, grads(model), model)
    if mode == "lora":  # the frozen head's EMA sees the same objective gradient
        torch.testing.assert_close(
            emas["recompute"].value(), emas["kept_graphs"].value(), rtol=1e-4, atol=1e-12
        )
    graphs, recompute = outcomes["kept_graphs"][0], outcomes["recompute"][0]
    assert recompute.kept.tolist() == graphs.kept.tolist() and len(recompute.kept) == 8
    np.testing.assert_allclose(recompute.losses, graphs.losses, rtol=1e-5)
    assert recompute.backward_examples == 8 and recompute.backward_tokens == graphs.backward_tokens
    # The kept rows are forwarded twice, and the counters say so.
    kept_tokens = sum(len(examples[j][0]) for j in recompute.kept)
    assert recompute.forward_examples == 12 + 8
    assert recompute.forward_tokens == graphs.forward_tokens + kept_tokens
    assert recompute.seconds["recompute"] > 0
    weights = None
    if method == "infobatch":
        from slap_ray.core.selection import select_weighted

        _, weights = select_weighted("infobatch", graphs.losses, None, 8, np.random.default_rng(4))
    model = outcomes["recompute"][2]
    ours = outcomes["recompute"][1]
    expected = reference_gradients(model, examples, recompute.kept.tolist(), weights)
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours[name], outcomes["kept_graphs"][1][name], rtol=1e-4,
                                   atol=1e-6)  # fmt: skip


def test_recompute_on_two_workers_sums_to_the_single_worker_gradient():
    torch.manual_seed(0)
    base = lora(load_causal_lm("tiny-bpe-untied").train())
    settings = SelectionSettings(alpha=0.3, onpolicy="recompute")
    single, expected, replicas, results = steps_on_thread_workers(
        base, batch(10, seed=6), 2, settings, seed=9
    )
    for result in results:
        assert result.kept.tolist() == expected.kept.tolist()
    assert sum(r.local_backward_examples for r in results) == 7
    reference = grads(single)
    for replica in replicas:
        for name, value in grads(replica).items():
            torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-7)


def test_unknown_onpolicy_mode_and_preconditioner_are_refused():
    """The config refuses them with the setting's name; the core's types refuse them too."""
    with pytest.raises(AssertionError, match="graphs"):
        SelectionSettings(onpolicy="graphs")
    with pytest.raises(ValueError, match="preconditioner"):
        SelectionSpec(preconditioner="shampoo")


def test_factored_preconditioner_selects_on_policy():
    """The factored option runs inside the training step and keeps the step's budget."""
    model = load_causal_lm("tiny-bpe-untied").train()
    examples = batch(10, seed=8)
    moment = torch.rand_like(model.lm_head.weight, dtype=torch.float32) * 1e-4 + 1e-8
    stats = onpolicy_step(
        model, examples, range(10), 10, SelectionSettings(SelectionSpec(preconditioner="factored"), alpha=0.3),
        np.random.default_rng(3), pad_token_id=0, second_moment=moment,
    )  # fmt: skip
    assert len(stats.kept) == 7 and stats.backward_examples == 7
