"""lm_head_features against per-example autograd on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slap_ray.core.features import (
    IGNORE_INDEX,
    SecondMomentEMA,
    factored_inverse_root,
    lm_head_features,
    make_preconditioner,
    response_softmax_,
    response_token_losses_packed,
    shift_labels,
)

VOCAB, HIDDEN = 97, 24


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four examples of different lengths, right padded, prompts masked with -100."""
    generator = torch.Generator().manual_seed(1)
    lengths, prompts = [12, 7, 10, 5], [5, 3, 2, 4]
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, (length, prompt) in enumerate(zip(lengths, prompts, strict=True)):
        input_ids[row, :length] = torch.randint(1, VOCAB, (length,), generator=generator)
        attention[row, :length] = 1
        labels[row, prompt:length] = input_ids[row, prompt:length]
    return input_ids, attention, labels


def autograd_reference(hidden, weight, aligned, second_moment=None, eps=1e-6):
    """Row norms of d(mean response loss of example j)/dW, one backward per example."""
    rows = []
    for j in range(hidden.shape[0]):
        w = weight.detach().clone().requires_grad_(True)
        mask = aligned[j] != IGNORE_INDEX
        logits = hidden[j][mask].detach() @ w.T
        loss = torch.nn.functional.cross_entropy(logits, aligned[j][mask])
        (grad,) = torch.autograd.grad(loss, w)
        denominator = (second_moment.sqrt() if second_moment is not None else 1.0) + eps
        rows.append((grad / denominator).norm(dim=1))
    return torch.stack(rows)


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def model_outputs(request):
    model = tiny_llama(request.param)
    input_ids, attention, labels = padded_batch()
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
    return model, hidden, shift_labels(labels)


@pytest.mark.parametrize("with_moment", [False, True], ids=["raw", "preconditioned"])
def test_features_match_autograd(model_outputs, with_moment):
    model, hidden, aligned = model_outputs
    weight = model.lm_head.weight
    moment = (
        torch.rand(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(3)) * 1e-3
        if with_moment
        else None
    )
    expected = autograd_reference(hidden, weight, aligned, moment)
    actual = lm_head_features(hidden, weight, aligned, second_moment=moment)
    assert actual.shape == (4, VOCAB) and actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("with_moment", [False, True])
@pytest.mark.parametrize("chunk", [1, 10, 33])
def test_chunked_equals_unchunked(model_outputs, with_moment, chunk):
    model, hidden, aligned = model_outputs
    moment = torch.full((VOCAB, HIDDEN), 0.5) if with_moment else None
    full = lm_head_features(hidden, model.lm_head.weight, aligned, moment, vocab_chunk=VOCAB)
    chunked = lm_head_features(hidden, model.lm_head.weight, aligned, moment, vocab_chunk=chunk)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-7)


def test_gram_and_explicit_paths_agree():
    """Many response tokens (R >= H) take the explicit path; few take the Gram path."""
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(VOCAB, 8, generator=generator)
    hidden = torch.randn(2, 20, 8, generator=generator)
    labels = torch.randint(0, VOCAB, (2, 20), generator=generator)
    labels[1, 3:] = IGNORE_INDEX  # example 1: 3 tokens (< H: Gram), example 0: 20 (>= H)
    expected = autograd_reference(hidden, weight, labels)
    torch.testing.assert_close(
        lm_head_features(hidden, weight, labels), expected, rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(
        lm_head_features(hidden[1:], weight, labels[1:]), expected[1:], rtol=1e-4, atol=1e-6
    )


def test_example_without_response_tokens_is_zero(model_outputs):
    model, hidden, aligned = model_outputs
    aligned = aligned.clone()
    aligned[2] = IGNORE_INDEX
    features = lm_head_features(hidden, model.lm_head.weight, aligned)
    assert torch.all(features[2] == 0)
    packed = model.lm_head(hidden[aligned != IGNORE_INDEX])
    assert torch.isnan(response_token_losses_packed(packed, aligned)[2])


def padded_response_losses(logits: torch.Tensor, aligned: torch.Tensor) -> torch.Tensor:
    """Reference: mean response-token cross-entropy per row from padded logits (B, T, V)."""
    token_loss = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), aligned, ignore_index=IGNORE_INDEX, reduction="none"
    )
    mask = aligned != IGNORE_INDEX
    return (token_loss * mask).sum(dim=1) / mask.sum(dim=1).float()


def test_response_losses_match_cross_entropy(model_outputs):
    model, hidden, aligned = model_outputs
    logits = model.lm_head(hidden)
    losses = response_token_losses_packed(logits[aligned != IGNORE_INDEX], aligned)
    torch.testing.assert_close(losses, padded_response_losses(logits, aligned))
    for j in range(4):
        mask = aligned[j] != IGNORE_INDEX
        ref = torch.nn.functional.cross_entropy(logits[j][mask], aligned[j][mask])
        torch.testing.assert_close(losses[j], ref)


def test_second_moment_ema_matches_adam():
    """SecondMomentEMA holds what torch's Adam holds in exp_avg_sq, bias-corrected."""
    generator = torch.Generator().manual_seed(5)
    param = torch.nn.Parameter(torch.zeros(6, 4))
    adam = torch.optim.Adam([param], betas=(0.9, 0.999))
    ema = SecondMomentEMA(beta2=0.999)
    assert ema.value() is None
    for _ in range(5):
        grad = torch.randn(6, 4, generator=generator)
        param.grad = grad.clone()
        adam.step()
        ema.update(grad)
    adam_state = adam.state[param]
    corrected = adam_state["exp_avg_sq"] / (1 - 0.999 ** int(adam_state["step"]))
    torch.testing.assert_close(ema.value(), corrected)
    restored = SecondMomentEMA()
    restored.load_state_dict(ema.state_dict())
    torch.testing.assert_close(restored.value(), ema.value())


@pytest.mark.parametrize("with_moment", [False, True])
def test_reusing_forward_logits_gives_the_same_features(model_outputs, with_moment):
    model, hidden, aligned = model_outputs
    moment = torch.full((VOCAB, HIDDEN), 0.25) if with_moment else None
    logits = model.lm_head(hidden)
    recomputed = lm_head_features(hidden, model.lm_head.weight, aligned, moment, vocab_chunk=20)
    reused = lm_head_features(
        hidden, model.lm_head.weight, aligned, moment, vocab_chunk=20, logits=logits
    )
    torch.testing.assert_close(reused, recomputed, rtol=1e-5, atol=1e-7)


def test_packed_response_logits_give_the_same_losses_and_features(model_outputs):
    model, hidden, aligned = model_outputs
    full = model.lm_head(hidden)
    packed = model.lm_head(hidden[aligned != IGNORE_INDEX])
    moment = torch.full((VOCAB, HIDDEN), 0.25)
    torch.testing.assert_close(
        response_token_losses_packed(packed, aligned), padded_response_losses(full, aligned)
    )
    for second in (None, moment):
        torch.testing.assert_close(
            lm_head_features(hidden, model.lm_head.weight, aligned, second, logits=packed),
            lm_head_features(hidden, model.lm_head.weight, aligned, second, logits=full),
            rtol=1e-5,
            atol=1e-7,
        )


@pytest.mark.parametrize("rows_per_block", [1, 3, None], ids=["1-row", "3-rows", "one-block"])
def test_softmax_in_place_gives_the_losses_and_features_of_the_logits(
    model_outputs, monkeypatch, rows_per_block
):
    """One in-place pass (losses + softmax, in row blocks) serves the scorer: the same losses
    as cross-entropy and, from the probabilities, the same features as from the logits, for
    every preconditioner, vocabulary chunking (targets in every chunk) and the Gram path."""
    from slap_ray.core import features as module

    if rows_per_block is not None:
        monkeypatch.setattr(module, "DEFAULT_BLOCK_ELEMENTS", VOCAB * rows_per_block)
    model, hidden, aligned = model_outputs
    aligned = aligned.clone()
    aligned[0, 6:9] = 5  # one target three times in an example: its one-hot rows add up
    weight = model.lm_head.weight
    with torch.no_grad():
        packed = model.lm_head(hidden[aligned != IGNORE_INDEX])
    expected_losses = response_token_losses_packed(packed, aligned)
    moment = torch.rand(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(5)) + 0.1

    def features(kind, chunk, **source):
        pre = make_preconditioner(moment, kind)
        return lm_head_features(
            hidden, weight, aligned, vocab_chunk=chunk, preconditioner=pre, **source
        )

    grid = [(kind, chunk) for kind in ("none", "adam", "factored") for chunk in (1, 10, VOCAB)]
    expected = {key: features(*key, logits=packed) for key in grid}
    losses, probabilities = response_softmax_(packed.clone(), aligned)
    torch.testing.assert_close(losses, expected_losses)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(len(probabilities)))
    for key in grid:
        ours = features(*key, probabilities=probabilities)
        torch.testing.assert_close(ours, expected[key], rtol=1e-5, atol=1e-7)
    only_losses, kept = response_softmax_(packed.clone(), aligned, probabilities=False)
    torch.testing.assert_close(only_losses, expected_losses)
    torch.testing.assert_close(kept, packed)


def test_features_take_logits_or_probabilities_not_both(model_outputs):
    model, hidden, aligned = model_outputs
    logits = model.lm_head(hidden).detach()
    with pytest.raises(ValueError, match="not both"):
        lm_head_features(hidden, model.lm_head.weight, aligned, logits=logits, probabilities=logits)


def test_precomputed_preconditioner_equals_second_moment_path():
    from slap_ray.core.features import inverse_root

    torch.manual_seed(3)
    hidden, weight = torch.randn(3, 7, 16), torch.randn(50, 16)
    labels = torch.randint(0, 50, (3, 7))
    labels[:, :2] = -100
    moment = torch.rand(50, 16) + 0.1
    expected = lm_head_features(hidden, weight, labels, moment, eps=1e-6)
    ours = lm_head_features(hidden, weight, labels, preconditioner=inverse_root(moment, 1e-6))
    torch.testing.assert_close(ours, expected)
    assert not torch.allclose(ours, lm_head_features(hidden, weight, labels))


def factored_reference(hidden, weight, aligned, moment, eps=1e-6):
    """Explicit float64 factored preconditioner P[v, h] = a[v] b[h] from Adafactor's row/column
    sums, applied elementwise to each example's autograd LM-head gradient."""
    moment = moment.double()
    rows, cols = moment.sum(1), moment.sum(0)
    a = 1.0 / (rows.sqrt() + eps)
    b = 1.0 / ((cols / rows.sum()).sqrt() + eps)
    explicit = a[:, None] * b[None, :]  # (V, H), what the factored option never builds
    out = []
    for j in range(hidden.shape[0]):
        w = weight.detach().double().clone().requires_grad_(True)
        mask = aligned[j] != IGNORE_INDEX
        loss = torch.nn.functional.cross_entropy(hidden[j][mask].double() @ w.T, aligned[j][mask])
        (grad,) = torch.autograd.grad(loss, w)
        out.append((grad * explicit).norm(dim=1))
    return torch.stack(out).float()


@pytest.mark.parametrize("tokens", [3, 20], ids=["gram", "explicit"])
def test_factored_features_match_an_explicit_factored_preconditioner(tokens):
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(VOCAB, 8, generator=generator)
    hidden = torch.randn(3, 20, 8, generator=generator)
    labels = torch.randint(0, VOCAB, (3, 20), generator=generator)
    labels[:, tokens:] = IGNORE_INDEX  # fewer tokens than H takes the T x T kernel path
    moment = torch.rand(VOCAB, 8, generator=generator) ** 2 * 1e-3 + 1e-7
    expected = factored_reference(hidden, weight, labels, moment)
    pre = make_preconditioner(moment, "factored")
    actual = lm_head_features(hidden, weight, labels, preconditioner=pre, vocab_chunk=17)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-7)


def test_factored_is_exact_for_a_rank_one_second_moment():
    """When s_hat really is r c^T, the factored features equal the exact Adam ones."""
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(VOCAB, 8, generator=generator)
    hidden = torch.randn(2, 6, 8, generator=generator)
    labels = torch.randint(0, VOCAB, (2, 6), generator=generator)
    moment = torch.outer(torch.rand(VOCAB, generator=generator) + 0.1,
                         torch.rand(8, generator=generator) + 0.1) * 1e-2  # fmt: skip
    exact = lm_head_features(hidden, weight, labels, second_moment=moment, eps=0.0)
    factored = lm_head_features(
        hidden, weight, labels, preconditioner=factored_inverse_root(moment, eps=0.0)
    )
    torch.testing.assert_close(factored, exact, rtol=1e-4, atol=1e-7)


def test_make_preconditioner_kinds():
    moment = torch.full((VOCAB, HIDDEN), 0.25)
    assert make_preconditioner(None, "adam") is None
    assert make_preconditioner(moment, "none") is None
    torch.testing.assert_close(make_preconditioner(moment, "adam"), torch.full_like(moment, 2.0),
                               rtol=1e-5, atol=0)  # fmt: skip
    assert make_preconditioner(moment, "factored").row.shape == (VOCAB,)
    with pytest.raises(ValueError, match="preconditioner"):
        make_preconditioner(moment, "shampoo")
