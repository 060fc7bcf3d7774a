"""Scoring one composed batch with a causal LM: losses, LM-head features, selection per alpha.

Model-level glue around ``features`` and ``selection``; pure PyTorch/NumPy, no Ray. The scorer
actors call ``score_batch`` and the calibration task calls ``calibrate_second_moment``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from slap_ray.core.features import (
    IGNORE_INDEX,
    SecondMomentEMA,
    inverse_root,
    lm_head_batch_gradient,
    lm_head_features,
    project_features,
    response_token_losses_packed,
    shift_labels,
)
from slap_ray.core.seeds import derive_rng, derive_seed
from slap_ray.core.selection import loss_strata, n_keep_for, select


def pad_batch(
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    pad_token_id: int,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad token lists: -> input_ids (B, T), attention_mask (B, T), labels (B, T).

    ``device``: where the tensors go (the model's device); CPU when None.
    """
    width = max(len(x) for x in input_ids)
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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face causal LM inside a peft wrapper (LoRA layers stay injected), or itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_head_of(model: torch.nn.Module) -> torch.Tensor:
    """The output projection weight (V, H) of a Hugging Face causal LM (tied or not)."""
    return unwrap(model).get_output_embeddings().weight


@dataclass
class BatchScores:
    """Per-example results of one batch, aligned with the rows passed in."""

    losses: np.ndarray  # (B,) float64, mean response-token loss
    loss_strata: np.ndarray  # (B,) int64, SLAP loss stratum (0 = lowest)
    keep: dict[float, np.ndarray] = field(default_factory=dict)  # alpha -> (B,) bool
    num_tokens: int = 0


@torch.no_grad()
def forward_response_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    aligned_labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states (B, T, H) and LM-head logits (N, V) at the N response positions only.

    Prompt and padding positions need no logits for losses or features, so the LM head (and
    the softmax over V) runs only where labels are, in row-major order.
    """
    base = unwrap(model)
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)
    hidden = hidden.last_hidden_state
    return hidden, base.get_output_embeddings()(hidden[aligned_labels != IGNORE_INDEX])


def losses_and_features(
    model: torch.nn.Module,
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    pad_token_id: int,
    second_moment: torch.Tensor | None,
    micro_batch_size: int,
    eps: float = 1e-6,
    vocab_chunk: int | None = None,
) -> tuple[np.ndarray, torch.Tensor]:
    """Forward a batch in micro-batches: losses (B,) float64 and features (B, V) float32.

    Rows are grouped into micro-batches by length (ties by position) so little padding is
    forwarded; results come back in the input order.
    """
    order = sorted(range(len(input_ids)), key=lambda i: (len(input_ids[i]), i))
    losses = np.empty(len(input_ids), dtype=np.float64)
    weight = lm_head_of(model)
    features = torch.empty(len(input_ids), weight.shape[0])
    preconditioner = None if second_moment is None else inverse_root(second_moment, eps)
    for start in range(0, len(order), micro_batch_size):
        rows = order[start : start + micro_batch_size]
        ids, mask, targets = pad_batch(
            [input_ids[i] for i in rows], [labels[i] for i in rows], pad_token_id, weight.device
        )
        aligned = shift_labels(targets)
        hidden, logits = forward_response_logits(model, ids, mask, aligned)
        losses[rows] = response_token_losses_packed(logits, aligned).double().cpu().numpy()
        features[rows] = lm_head_features(
            hidden, weight, aligned, eps=eps, vocab_chunk=vocab_chunk, logits=logits,
            preconditioner=preconditioner,
        ).cpu()  # fmt: skip
    return losses, features


def score_batch(
    model: torch.nn.Module,
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    *,
    batch_key: object,
    seed: int,
    alphas: Sequence[float],
    method: str,
    pad_token_id: int,
    second_moment: torch.Tensor | None = None,
    micro_batch_size: int = 8,
    num_strata: int = 3,
    tau: float = 1.0,
    strata: str = "width",
    eps: float = 1e-6,
    projection_dim: int | None = None,
    vocab_chunk: int | None = None,
) -> BatchScores:
    """Score one composed batch and select it at every alpha (SLAP_METHOD.md section 3, step 4).

    Losses and features do not depend on alpha, so one forward pass serves the whole grid.
    Each (batch, alpha) gets its own derived RNG: results do not depend on which scorer ran it.
    """
    losses, features = losses_and_features(
        model, input_ids, labels, pad_token_id, second_moment, micro_batch_size, eps, vocab_chunk
    )
    if projection_dim is not None:
        features = project_features(features, projection_dim, derive_seed(seed, "projection"))
    scores = BatchScores(
        losses=losses,
        loss_strata=loss_strata(losses, num_strata, strata),
        num_tokens=sum(len(x) for x in input_ids),
    )
    options = {"num_strata": num_strata, "tau": tau, "strata": strata}
    for alpha in alphas:
        rng = derive_rng(seed, "select", method, alpha, batch_key)
        kept = select(method, losses, features, n_keep_for(len(losses), alpha), rng, **options)
        mask = np.zeros(len(losses), dtype=bool)
        mask[kept] = True
        scores.keep[alpha] = mask
    return scores


def calibrate_second_moment(
    model: torch.nn.Module,
    batches: Sequence[tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]]],
    pad_token_id: int,
    beta2: float = 0.999,
    micro_batch_size: int = 8,
) -> SecondMomentEMA:
    """EMA of squared LM-head gradients over calibration batches with the frozen model.

    Each batch contributes the gradient of its token-mean response loss, accumulated over
    micro-batches weighted by their response-token counts (so it equals the whole-batch gradient).
    """
    ema = SecondMomentEMA(beta2=beta2)
    weight = lm_head_of(model)
    for input_ids, labels in batches:
        total = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        tokens = 0
        for start in range(0, len(input_ids), micro_batch_size):
            stop = start + micro_batch_size
            ids, mask, targets = pad_batch(
                input_ids[start:stop], labels[start:stop], pad_token_id, weight.device
            )
            aligned = shift_labels(targets)
            hidden, logits = forward_response_logits(model, ids, mask, aligned)
            count = int((aligned != IGNORE_INDEX).sum())
            total += lm_head_batch_gradient(hidden, weight, aligned, logits=logits) * count
            tokens += count
        ema.update(total / max(tokens, 1))
    return ema
