"""Fine-tuning helpers without Ray: schedule, batch order, second moment, checkpoint round trip,
parameter counts and the FLOPs model, evaluation summaries and ROUGE-L."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slap_ray.assets import load_causal_lm
from slap_ray.config import TrainConfig
from slap_ray.core.evaluation import last_response_split, rouge_l, summarize_losses
from slap_ray.core.model import lm_head_of
from slap_ray.core.training import (
    BatchSchedule,
    adam_second_moment,
    add_lora,
    flops_estimate,
    load_training_state,
    parameter_counts,
    save_training_state,
    total_steps,
    warmup_cosine,
)
from slap_ray.core.training import (
    make_optimizer as make_adamw,
)


def test_warmup_then_cosine_to_zero():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_cosine(optimizer, total_steps=10, warmup_ratio=0.2)
    rates = []
    for _ in range(10):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert rates[2] > rates[5] > rates[9] > 0
    assert rates[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_batches_cover_each_epoch_once_and_depend_only_on_the_id_set():
    ids = [f"row-{i:03d}" for i in range(23)]
    schedule = BatchSchedule(ids, batch_size=5, seed=3)
    assert schedule.per_epoch == 5
    first_epoch = [ids[i] for step in range(5) for i in schedule.rows(step)]
    assert sorted(first_epoch) == ids and len(schedule.rows(4)) == 3
    second_epoch = [ids[i] for step in range(5, 10) for i in schedule.rows(step)]
    assert sorted(second_epoch) == ids and second_epoch != first_epoch
    shuffled = ids[::-1]
    other = BatchSchedule(shuffled, batch_size=5, seed=3)
    assert [shuffled[i] for i in other.rows(2)] == [ids[i] for i in schedule.rows(2)]
    assert total_steps(23, batch_size=5, epochs=2) == 10
    assert total_steps(23, batch_size=5, epochs=2, max_steps=4) == 4


def test_adam_second_moment_is_bias_corrected_exp_avg_sq():
    weight = torch.nn.Parameter(torch.ones(3, 2))
    optimizer = torch.optim.AdamW([weight], lr=0.1, betas=(0.9, 0.99))
    assert adam_second_moment(optimizer, weight) is None
    grads = [torch.full((3, 2), 2.0), torch.full((3, 2), 4.0)]
    for grad in grads:
        weight.grad = grad
        optimizer.step()
    raw = 0.99 * 0.01 * 4.0 + 0.01 * 16.0
    expected = torch.full((3, 2), raw / (1 - 0.99**2))
    torch.testing.assert_close(adam_second_moment(optimizer, weight), expected)


@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_checkpoint_round_trip_restores_weights_optimizer_and_state(finetuning, tmp_path):
    train = TrainConfig(finetuning=finetuning, lora_rank=2, learning_rate=1e-2)

    def build_model(name, train):
        model = load_causal_lm(name)
        if train.finetuning == "lora":
            model = add_lora(
                model, train.lora_rank, train.lora_alpha, 0.0, train.lora_target_modules
            )
        return model.train()

    def make_optimizer(model, train):
        return make_adamw(model, train.learning_rate)

    torch.manual_seed(0)
    model = build_model("tiny-bpe", train)
    optimizer = make_optimizer(model, train)
    scheduler = warmup_cosine(optimizer, 5, 0.0)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    save_training_state(tmp_path, model, optimizer, scheduler, {"step": 1, "history": [1.5]})
    if finetuning == "lora":
        assert not list((tmp_path / "model").glob("model*.safetensors"))  # adapter only

    torch.manual_seed(1)
    fresh = build_model("tiny-bpe", train)
    fresh_optimizer = make_optimizer(fresh, train)
    fresh_scheduler = warmup_cosine(fresh_optimizer, 5, 0.0)
    state = load_training_state(tmp_path, fresh, fresh_optimizer, fresh_scheduler)
    assert state == {"step": 1, "history": [1.5]}
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert fresh_scheduler.last_epoch == 1
    saved = [s["exp_avg_sq"] for s in optimizer.state.values()]
    restored = [s["exp_avg_sq"] for s in fresh_optimizer.state.values()]
    assert len(restored) == len(saved) and any(float(m.sum()) > 0 for m in restored)
    for a, b in zip(saved, restored, strict=True):
        torch.testing.assert_close(a, b)


def test_parameter_counts_and_flops_model():
    lora = add_lora(load_causal_lm("tiny-bpe"), 2, 16.0, 0.0, ["q_proj", "v_proj"])
    counts = parameter_counts(lora)
    assert 0 < counts["trainable"] < counts["forward"] == counts["total"]  # tied head
    untied = load_causal_lm("tiny-bpe-untied")
    untied_counts = parameter_counts(untied)
    embedding = untied.get_input_embeddings().weight.numel()
    assert untied_counts["forward"] == untied_counts["total"] - embedding
    assert untied_counts["trainable"] == untied_counts["total"]
    n = untied_counts["forward"]
    full = flops_estimate(untied_counts, 100, 70, lora=False)
    assert full == {"forward": 200.0 * n, "backward": 280.0 * n, "total": 480.0 * n}
    # SLAP_METHOD.md section 2 at alpha = 0.3: full FT (1 + 0.7 * 2) / 3 = 0.8 of the full batch
    ratio = (
        flops_estimate(untied_counts, 100, 70, False)["total"]
        / flops_estimate(untied_counts, 100, 100, False)["total"]
    )
    assert ratio == pytest.approx(0.8)
    lora_flops = flops_estimate(counts, 100, 70, lora=True)
    assert lora_flops["backward"] == 70 * (2 * counts["forward"] + 2 * counts["trainable"])
    assert lm_head_of(lora).requires_grad is False


def test_summaries_are_token_weighted_per_group():
    sums = np.array([2.0, 6.0, 3.0])
    tokens = np.array([1, 3, 3])
    out = summarize_losses(sums, tokens, {"source": ["a", "b", "b"]})
    assert out["overall"]["loss"] == pytest.approx(11 / 7)
    assert out["source=b"] == {
        "loss": pytest.approx(1.5),
        "perplexity": pytest.approx(math.exp(1.5)),
        "rows": 2,
        "tokens": 6,
    }


def test_rouge_l_and_response_split():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    # LCS "the cat on mat": 4 of 6 candidate and 5 reference tokens
    assert rouge_l("the cat was on the mat", "the cat on a mat") == pytest.approx(
        2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5)
    )
    assert rouge_l("", "x") == 0.0 and rouge_l("a b", "c d") == 0.0
    prompt, reference = last_response_split([1, 2, 3, 4, 5, 6], [-100, -100, 3, 4, -100, 6])
    assert prompt == [1, 2, 3, 4, 5] and reference == [6]


def test_scoring_cost_fraction_is_the_flops_model_ratio():
    from slap_ray.core.training import scoring_cost_fraction

    # 2 N_s T per scored row over 6 N_t T alpha per row of training pruned, per epoch.
    assert scoring_cost_fraction(100, 1000, 0.25) == pytest.approx(2 * 100 / (6 * 1000 * 0.25))
    assert scoring_cost_fraction(100, 1000, 0.25, epochs=2) == pytest.approx(100 / 1500)
    with pytest.raises(ValueError, match="alpha"):
        scoring_cost_fraction(100, 1000, 0.0)
