"""Chat-template tokenisation with assistant-only labels, truncation and collation.

Labels follow the Hugging Face convention (``labels[t] == input_ids[t]`` where trained, -100
elsewhere) and cover every assistant turn: its content plus the template's end-of-turn tokens
(for ChatML ``<|im_end|>`` and the trailing newline), so the model learns to stop. Role headers
(``<|im_start|>assistant\\n``), system and user text are never labelled.

Assistant spans are found by rendering the conversation progressively with the tokenizer's own
chat template: ``messages[:i]`` with a generation prompt ends where assistant turn ``i``'s content
starts, ``messages[:i + 1]`` ends where the turn ends. This relies on no template internals, but
only holds if each rendering is a token prefix of the full one; that is checked, never assumed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from slap_ray.core.model import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

from slap_ray.data.schemas import ROLES, TOOL_FIELDS  # noqa: E402  (one definition)
from slap_ray.vocabulary import TRUNCATIONS, Truncation  # noqa: E402


class NoResponseTokens(ValueError):
    """No trainable assistant token is left (no assistant turn, or truncation removed them)."""


class ChatTemplateError(ValueError):
    """The chat template cannot be split into turns by progressive rendering."""


class InvalidConversation(ValueError):
    """The messages do not follow the normalised ``{"role", "content"}`` schema."""


@dataclass(frozen=True)
class TokenizedExample:
    """One tokenised conversation: ``labels`` is ``input_ids`` masked to -100 off assistant turns."""

    input_ids: list[int]
    labels: list[int]
    truncated_tokens: int = 0  # tokens of the rendered conversation cut to fit max_length

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError("input_ids and labels must have the same length")

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_response_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def _validate(messages: Any) -> list[dict[str, Any]]:
    """Plain ``{role, content}`` dicts (with their tool fields); accepts any iterable (Ray
    batches hold numpy arrays)."""
    if messages is None or isinstance(messages, str | bytes | Mapping):
        raise InvalidConversation("messages must be a list of {role, content}")
    messages = list(messages)
    if not messages:
        raise InvalidConversation("messages is empty")
    clean: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidConversation(f"message {index} is not a mapping")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InvalidConversation(
                f"message {index} has role {role!r}; expected {sorted(ROLES)}"
            )
        calls = message.get("tool_calls")
        if not isinstance(content, str) and not (content is None and calls):
            raise InvalidConversation(f"message {index} content is not a string")
        extra = {f: message[f] for f in TOOL_FIELDS if message.get(f) is not None}
        clean.append({"role": role, "content": content, **extra})
    return clean


def _check_tool_support(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: Any
) -> None:
    """A row with tools, tool calls or tool results needs a chat template that renders them:
    one that never mentions them would drop them silently, so the row is rejected instead."""
    template = tokenizer.chat_template or ""
    needs = []
    if tools:
        needs.append("tools")
    if any(m.get("tool_calls") for m in messages):
        needs.append("tool_calls")
    if any(m["role"] == "tool" for m in messages):
        needs.append("tool")
    missing = [n for n in needs if n not in template]
    if missing:
        raise ChatTemplateError(
            f"this model's chat template cannot render {', '.join(missing)} (it never uses "
            "them): pick a model whose template supports tool use, or leave these rows out"
        )


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Token ids of the chat-template rendering, whatever container this transformers returns."""
    try:
        out = tokenizer.apply_chat_template(
            messages,
            tools=tools or None,
            tokenize=True,
            add_generation_prompt=add_generation_prompt,
            return_dict=False,
        )
    except Exception as error:  # jinja raises its own errors (e.g. "roles must alternate")
        raise ChatTemplateError(f"chat template failed: {error}") from error
    if isinstance(out, Mapping):  # BatchEncoding when return_dict is ignored
        out = out["input_ids"]
    if isinstance(out, torch.Tensor):
        out = out.tolist()
    if out and isinstance(out[0], list):  # a batch of one
        out = out[0]
    return [int(token) for token in out]


def _check_prefix(
    tokenizer: PreTrainedTokenizerBase,
    prefix: list[int],
    full: list[int],
    what: str,
) -> None:
    if full[: len(prefix)] == prefix:
        return
    text_prefix = tokenizer.decode(prefix)
    if tokenizer.decode(full).startswith(text_prefix):
        cause = (
            "the text is a prefix but tokens merge across the boundary "
            "(typically content that starts with repeated whitespace)"
        )
    else:
        cause = "the template renders earlier turns differently once later turns exist"
    raise ChatTemplateError(f"{what} is not a token prefix of the full conversation: {cause}")


def assistant_spans(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[list[int], list[tuple[int, int]]]:
    """Full token ids and the ``[start, end)`` token span of every assistant turn (tool-call
    turns included); ``tools``: the row's tool definitions, rendered by the template.

    A span starts after the assistant header and ends after the end-of-turn tokens.
    """
    clean = _validate(messages)
    _check_tool_support(tokenizer, clean, tools)
    full = _render(tokenizer, clean, tools=tools)
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(clean):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, clean[:index], add_generation_prompt=True, tools=tools)
        through = _render(tokenizer, clean[: index + 1], tools=tools)
        _check_prefix(tokenizer, before, full, f"the prompt before message {index}")
        _check_prefix(tokenizer, through, full, f"the rendering through message {index}")
        if len(through) < len(before):
            raise ChatTemplateError(f"assistant message {index} renders shorter than its prompt")
        spans.append((len(before), len(through)))
    return full, spans


def _window(
    length: int, spans: list[tuple[int, int]], max_length: int, truncation: Truncation
) -> tuple[int, int]:
    """The ``[start, end)`` token window kept under ``truncation``."""
    if length <= max_length:
        return 0, length
    if truncation == "right" or not spans:
        return 0, max_length
    resp_start, resp_end = spans[-1]
    if resp_end <= max_length:  # only unlabelled trailing turns need to go
        return 0, max_length
    # Drop from the left, but keep one token before the response (its header's last token) so
    # its first token is still predicted from something: label 0 can never be trained.
    start = min(resp_end - max_length, max(resp_start - 1, 0))
    return start, start + max_length


def tokenize_conversation(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    truncation: Truncation = "keep_response",
    tools: list[dict[str, Any]] | None = None,
) -> TokenizedExample:
    """Tokenise ``messages`` with the chat template, labelling assistant turns only.

    ``truncation="keep_response"`` drops the oldest tokens first (the prompt matters less than
    the answer being scored), never past the last assistant turn's start, and only then cuts
    that response's end; ``"right"`` keeps the first ``max_length`` tokens. Position 0 is
    never labelled, since no token predicts it. Raises :class:`NoResponseTokens` if no
    labelled token remains, :class:`ChatTemplateError` / :class:`InvalidConversation` on
    template or schema problems.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    ids, spans = assistant_spans(messages, tokenizer, tools)
    if not spans:
        raise NoResponseTokens("conversation has no assistant turn")
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    start, end = _window(len(ids), spans, max_length, truncation)
    cut = len(ids) - (end - start)
    ids, labels = ids[start:end], labels[start:end]
    labels[0] = IGNORE_INDEX
    example = TokenizedExample(input_ids=ids, labels=labels, truncated_tokens=cut)
    if example.num_response_tokens == 0:
        raise NoResponseTokens(
            f"{truncation} truncation to {max_length} tokens left no assistant token "
            f"(conversation has {len(spans)} assistant turn(s), last at tokens {spans[-1]})"
        )
    return example


def tokenize_rows(
    rows: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    truncation: Truncation = "keep_response",
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Tokenise normalised rows; a row that cannot be used becomes ``{"id", "reason"}``.

    Per-row problems are rejections rather than exceptions so one bad row cannot fail a whole
    Ray ``map_batches`` block; the reason's prefix names the class of problem for counting.
    """
    kept: list[dict[str, Any]] = []
    rejected: list[dict[str, str]] = []
    for row in rows:
        row_id = str(row.get("id"))
        try:
            example = tokenize_conversation(
                row.get("messages"), tokenizer, max_length, truncation, row.get("tools")
            )
        except NoResponseTokens as error:
            rejected.append({"id": row_id, "reason": f"no_response_tokens: {error}"})
        except ChatTemplateError as error:
            rejected.append({"id": row_id, "reason": f"chat_template: {error}"})
        except InvalidConversation as error:
            rejected.append({"id": row_id, "reason": f"invalid_conversation: {error}"})
        else:
            kept.append(
                {
                    "id": row_id,
                    "input_ids": example.input_ids,
                    "labels": example.labels,
                    "num_tokens": example.num_tokens,
                    "num_response_tokens": example.num_response_tokens,
                    "truncated_tokens": example.truncated_tokens,
                }
            )
    return kept, rejected
