"""Chat-template tokenisation: assistant-only labels, truncation, rejection and padding."""

from __future__ import annotations

import copy

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerBase

from slap_ray import assets
from slap_ray.core.model import pad_batch
from slap_ray.data.tokenize import (
    IGNORE_INDEX,
    ChatTemplateError,
    InvalidConversation,
    NoResponseTokens,
    TokenizedExample,
    tokenize_conversation,
    tokenize_rows,
)

END = "<|im_end|>\n"
SHAREGPT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome is the capital of Italy."},
    {"role": "user", "content": "Thanks! Which one is larger?"},
    {"role": "assistant", "content": "Paris has more inhabitants than Rome within city limits."},
]

pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer and ChatML template, via the tiny model (no full conversion needed)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        return assets.load_tokenizer("tiny-random")


def labelled_spans(example: TokenizedExample) -> list[list[int]]:
    """Maximal runs of labelled positions, as token ids (checked against input_ids)."""
    spans: list[list[int]] = []
    current: list[int] = []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(label)
    if current:
        spans.append(current)
    return spans


def unlabelled_text(example: TokenizedExample, tokenizer: PreTrainedTokenizerBase) -> str:
    return tokenizer.decode(
        [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab == -100]
    )


def test_multi_turn_labels_every_assistant_turn_only(tokenizer: PreTrainedTokenizerBase) -> None:
    example = tokenize_conversation(SHAREGPT, tokenizer, max_length=2048)
    assistant = [m["content"] for m in SHAREGPT if m["role"] == "assistant"]
    decoded = [tokenizer.decode(span) for span in labelled_spans(example)]
    assert decoded == [content + END for content in assistant]
    labelled_text = "".join(decoded)
    for message in SHAREGPT:
        if message["role"] == "user":
            assert message["content"] not in labelled_text
            assert message["content"] in unlabelled_text(example, tokenizer)
    assert "<|im_start|>" not in labelled_text and "system" not in labelled_text
    assert "You are a helpful AI assistant" in unlabelled_text(example, tokenizer)
    assert example.num_response_tokens == sum(len(span) for span in labelled_spans(example))
    assert example.num_tokens == len(example.input_ids)


def test_explicit_system_prompt_is_not_labelled(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "system", "content": "Answer tersely."}, *SHAREGPT[:2]]
    example = tokenize_conversation(messages, tokenizer, max_length=2048)
    text = tokenizer.decode(example.input_ids)
    assert text.startswith("<|im_start|>system\nAnswer tersely.") and "SmolLM" not in text
    spans = [tokenizer.decode(span) for span in labelled_spans(example)]
    assert spans == [SHAREGPT[1]["content"] + END]


def test_keep_response_drops_prompt_from_the_left(tokenizer: PreTrainedTokenizerBase) -> None:
    long_question = "Please consider the following. " * 60
    messages = [{"role": "user", "content": long_question}, *SHAREGPT[1:]]
    full = tokenize_conversation(messages, tokenizer, max_length=4096)
    example = tokenize_conversation(messages, tokenizer, max_length=64)
    assert full.num_tokens > 64 and example.num_tokens == 64
    assert example.input_ids == full.input_ids[-64:]
    # what was cut is counted (the run's manifest and report sum it)
    assert full.truncated_tokens == 0 and example.truncated_tokens == full.num_tokens - 64
    final = tokenizer.decode(labelled_spans(example)[-1])
    assert final == SHAREGPT[-1]["content"] + END


def test_keep_response_cuts_an_overlong_response_at_its_end(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    answer = "word " * 200
    messages = [{"role": "user", "content": "Say word many times."}]
    messages.append({"role": "assistant", "content": answer})
    example = tokenize_conversation(messages, tokenizer, max_length=32)
    assert example.num_tokens == 32
    # One header token is kept as context; everything after it is response.
    assert example.labels[0] == IGNORE_INDEX and all(lab != -100 for lab in example.labels[1:])
    kept = tokenizer.decode(example.input_ids[1:])
    assert len(kept) > 50 and answer.startswith(kept)


def test_keep_response_drops_trailing_unanswered_turn_first(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    messages = [*SHAREGPT[:2], {"role": "user", "content": "Tell me more. " * 40}]
    example = tokenize_conversation(messages, tokenizer, max_length=64)
    assert example.num_tokens == 64
    assert tokenizer.decode(example.input_ids).startswith("<|im_start|>system")
    assert [tokenizer.decode(s) for s in labelled_spans(example)] == [SHAREGPT[1]["content"] + END]


def test_right_truncation(tokenizer: PreTrainedTokenizerBase) -> None:
    full = tokenize_conversation(SHAREGPT, tokenizer, max_length=4096)
    example = tokenize_conversation(SHAREGPT, tokenizer, max_length=50, truncation="right")
    assert example.input_ids == full.input_ids[:50] and example.labels == full.labels[:50]
    assert example.truncated_tokens == full.num_tokens - 50
    with pytest.raises(NoResponseTokens, match="right truncation to 20 tokens"):
        tokenize_conversation(SHAREGPT, tokenizer, max_length=20, truncation="right")


def test_rejections(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(NoResponseTokens, match="no assistant turn"):
        tokenize_conversation(SHAREGPT[:1], tokenizer, max_length=64)
    with pytest.raises(InvalidConversation, match="role 'human'"):
        tokenize_conversation([{"role": "human", "content": "hi"}], tokenizer, max_length=64)
    with pytest.raises(InvalidConversation):
        tokenize_conversation([], tokenizer, max_length=64)
    with pytest.raises(ValueError, match="truncation"):
        tokenize_conversation(SHAREGPT, tokenizer, max_length=64, truncation="left")  # type: ignore[arg-type]
    assert issubclass(NoResponseTokens, ValueError)


def test_token_merge_across_turn_boundary_is_reported(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [SHAREGPT[0], {"role": "assistant", "content": "\n\n\nParis."}]
    with pytest.raises(ChatTemplateError, match="tokens merge across the boundary"):
        tokenize_conversation(messages, tokenizer, max_length=64)


def test_template_without_prefix_property_is_an_error(tokenizer: PreTrainedTokenizerBase) -> None:
    broken = copy.deepcopy(tokenizer)
    # Renders only the last message: earlier renderings are not prefixes of later ones.
    broken.chat_template = (
        "{{ messages[-1]['role'] + ': ' + messages[-1]['content'] }}"
        "{% if add_generation_prompt %}{{ ' assistant:' }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="renders earlier turns differently"):
        tokenize_conversation(SHAREGPT, broken, max_length=256)


def test_tokenize_rows_keeps_and_rejects(tokenizer: PreTrainedTokenizerBase) -> None:
    rows = [
        {"id": "ok", "source": "s", "task": "t", "messages": SHAREGPT},
        # Ray batches deliver list columns as numpy arrays of dicts.
        {"id": "np", "source": "s", "task": "t", "messages": np.array(SHAREGPT[:2], dtype=object)},
        {"id": "none", "source": "s", "task": "t", "messages": SHAREGPT[:1]},
        {"id": "bad", "source": "s", "task": "t", "messages": [{"role": "x", "content": "y"}]},
    ]
    kept, rejected = tokenize_rows(rows, tokenizer, max_length=256, truncation="keep_response")
    assert [row["id"] for row in kept] == ["ok", "np"]
    for row in kept:
        assert set(row) == {
            "id", "input_ids", "labels", "num_tokens", "num_response_tokens", "truncated_tokens"
        }  # fmt: skip
        assert row["num_tokens"] == len(row["input_ids"]) == len(row["labels"])
        assert 0 < row["num_response_tokens"] < row["num_tokens"]
    assert {r["id"]: r["reason"].split(":")[0] for r in rejected} == {
        "none": "no_response_tokens",
        "bad": "invalid_conversation",
    }


def padded(examples, pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """The model's batch of tokenised examples, padded as the scorer and trainer pad them."""
    ids, mask, labels = pad_batch(
        [e.input_ids for e in examples], [e.labels for e in examples], pad_token_id,
        pad_to_multiple_of=pad_to_multiple_of,
    )  # fmt: skip
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_pad_batch_pads_right() -> None:
    examples = [
        TokenizedExample(input_ids=[5, 6, 7], labels=[-100, 6, 7]),
        TokenizedExample(input_ids=[8], labels=[-100]),
    ]
    batch = padded(examples, pad_token_id=2)
    assert all(t.shape == (2, 3) and t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    wide = padded(examples, pad_token_id=2, pad_to_multiple_of=8)
    assert wide["input_ids"].shape == (2, 8) and wide["labels"][:, 3:].eq(-100).all()
    with pytest.raises(ValueError):
        pad_batch([], [], pad_token_id=0)


def test_padded_batch_trains_the_tiny_model(tokenizer: PreTrainedTokenizerBase) -> None:
    examples = [
        tokenize_conversation(SHAREGPT, tokenizer, max_length=128),
        tokenize_conversation(SHAREGPT[:2], tokenizer, max_length=128),
    ]
    batch = padded(examples, pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=16)
    model = assets.load_causal_lm("tiny-random")
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 0
