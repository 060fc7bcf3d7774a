"""Model helpers written once: padding, label alignment, the micro-batched response forward.

Scoring, calibration, evaluation and the on-policy training step all forward token lists in
length-sorted micro-batches and need the LM head only at response positions; this module is
the one place that does it. Pure PyTorch, no Ray.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from slap_ray.errors import DeviceError

# The Hugging Face label value that is not trained on (prompt, padding).
IGNORE_INDEX = -100


def device_for(use_gpu: bool, setting: str) -> str:
    """``cuda`` when a GPU is asked for, ``cpu`` otherwise; a granted GPU that torch cannot see
    is an error naming the setting, never a silent fall-back to the CPU."""
    if not use_gpu:
        return "cpu"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise DeviceError(
            f"{setting}: a GPU was granted but torch {torch.__version__} sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={visible!r}); install a CUDA build of torch or set it to 0"
        )
    return "cuda"


def pad_batch(
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    pad_token_id: int,
    device: torch.device | str | None = None,
    pad_to_multiple_of: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad token lists: -> input_ids (B, T), attention_mask (B, T), labels (B, T).

    ``device``: where the tensors go (the model's device); CPU when None. ``pad_to_multiple_of``
    rounds T up (tensor-core friendly shapes).
    """
    if not input_ids:
        raise ValueError("pad_batch needs at least one example")
    width = max(len(x) for x in input_ids)
    if pad_to_multiple_of:
        width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(input_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    targets = torch.full_like(ids, IGNORE_INDEX)
    for row, (tokens, target) in enumerate(zip(input_ids, labels, strict=True)):
        ids[row, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
        targets[row, : len(target)] = torch.as_tensor(target, dtype=torch.long)
    if device is not None:
        return ids.to(device), mask.to(device), targets.to(device)
    return ids, mask, targets


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Align Hugging Face labels (B, T) with hidden states: out[:, t] = labels[:, t + 1].

    The last position predicts nothing and gets IGNORE_INDEX.
    """
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face causal LM inside a peft wrapper (LoRA layers stay injected), or itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_head_of(model: torch.nn.Module) -> torch.Tensor:
    """The output projection weight (V, H) of a Hugging Face causal LM (tied or not)."""
    return unwrap(model).get_output_embeddings().weight


class LogitsBuffer:
    """Reusable storage for the LM head's response logits (N, V), grown to the largest N seen.

    Without it every micro-batch allocates a fresh N x V tensor (189 MB at N = 960,
    V = 49,152): above glibc's mmap threshold, so the kernel maps and zero-fills new pages on
    first touch (60k page faults per composed batch of the scale bench), nearly as long as the
    LM-head GEMM itself on a CPU scorer. A scorer keeps one across its batches. Whatever a
    ``take`` returned is overwritten by the next ``take``.
    """

    def __init__(self) -> None:
        self._flat: torch.Tensor | None = None

    def take(
        self, rows: int, cols: int, dtype: torch.dtype, device: torch.device | str
    ) -> torch.Tensor:
        """A (rows, cols) contiguous view of the buffer, reallocated only when too small."""
        flat, device = self._flat, torch.device(device)
        if (
            flat is None
            or flat.numel() < rows * cols
            or flat.dtype != dtype
            or flat.device != device
        ):
            self._flat = flat = None  # free the old one before allocating the larger one
            self._flat = flat = torch.empty(rows * cols, dtype=dtype, device=device)
        return flat[: rows * cols].view(rows, cols)


def forward_response_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    aligned_labels: torch.Tensor,
    logits_buffer: LogitsBuffer | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states (B, T, H) and LM-head logits (N, V) at the N response positions only.

    Prompt and padding positions need no logits for losses or features, so the LM head (and
    the softmax over V) runs only where labels are, in row-major order. Grad follows the
    caller's mode (``torch.no_grad`` or not). ``logits_buffer``: where the logits go when no
    autograd or autocast is active and the head is a plain bias-free ``nn.Linear`` (the same
    GEMM, so the same values); otherwise a fresh tensor.
    """
    base = unwrap(model)
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)
    hidden = hidden.last_hidden_state
    head, response = base.get_output_embeddings(), hidden[aligned_labels != IGNORE_INDEX]
    plain = type(head) is torch.nn.Linear and head.bias is None
    if (
        logits_buffer is None
        or not plain
        or torch.is_grad_enabled()
        or torch.is_autocast_enabled(response.device.type)
    ):
        return hidden, head(response)
    out = logits_buffer.take(len(response), head.weight.shape[0], response.dtype, response.device)
    return hidden, torch.mm(response, head.weight.T, out=out)


def length_sorted_micro_batches(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Row indices grouped into micro-batches of ``size`` by length (ties by position)."""
    if size < 1:
        raise ValueError(f"micro-batch size must be >= 1, got {size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + size] for i in range(0, len(order), size)]


@dataclass
class MicroBatch:
    """One forwarded micro-batch: ``rows`` index the caller's lists; tensors on the model device.

    hidden (b, T, H), logits (N, V) float32 at the N response positions (row-major), aligned
    labels (b, T), attention mask (b, T).
    """

    rows: list[int]
    mask: torch.Tensor
    aligned: torch.Tensor
    hidden: torch.Tensor
    logits: torch.Tensor

    @property
    def response_tokens(self) -> torch.Tensor:
        """(b,) response-token count of each row."""
        return (self.aligned != IGNORE_INDEX).sum(dim=1)


def forward_micro_batches(
    model: torch.nn.Module,
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    pad_token_id: int,
    micro_batch_size: int,
    *,
    grad: bool = False,
    autocast: Callable[[], Any] = nullcontext,
    logits_buffer: LogitsBuffer | None = None,
) -> Iterator[MicroBatch]:
    """Forward token lists in length-sorted micro-batches (little padding), LM head at response
    positions only; ``grad=False`` runs without autograd (scoring, calibration, evaluation).
    ``logits_buffer``: see ``forward_response_logits``; a micro-batch's logits are then valid
    until the next one is forwarded."""
    device = lm_head_of(model).device
    for rows in length_sorted_micro_batches([len(x) for x in input_ids], micro_batch_size):
        ids, mask, targets = pad_batch(
            [input_ids[i] for i in rows], [labels[i] for i in rows], pad_token_id, device
        )
        aligned = shift_labels(targets)
        with torch.set_grad_enabled(grad), autocast():
            hidden, logits = forward_response_logits(model, ids, mask, aligned, logits_buffer)
        yield MicroBatch(rows, mask, aligned, hidden, logits.float())
