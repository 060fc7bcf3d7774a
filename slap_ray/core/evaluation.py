"""Held-out evaluation: response-token loss and perplexity per group, and ROUGE-L of generations.

Pure PyTorch/NumPy; the trainer shards eval rows over workers and gathers the per-example sums.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from slap_ray.core.features import IGNORE_INDEX, shift_labels
from slap_ray.core.scoring import forward_response_logits, lm_head_of, pad_batch, unwrap


@torch.no_grad()
def example_loss_sums(
    model: torch.nn.Module,
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    pad_token_id: int,
    micro_batch_size: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Per example: summed response-token cross-entropy (n,) float64 and response tokens (n,)."""
    sums = np.zeros(len(input_ids))
    tokens = np.zeros(len(input_ids), dtype=np.int64)
    order = sorted(range(len(input_ids)), key=lambda i: (len(input_ids[i]), i))
    device = lm_head_of(model).device
    for start in range(0, len(order), micro_batch_size):
        rows = order[start : start + micro_batch_size]
        ids, mask, targets = pad_batch(
            [input_ids[i] for i in rows], [labels[i] for i in rows], pad_token_id, device
        )
        aligned = shift_labels(targets)
        _, logits = forward_response_logits(model, ids, mask, aligned)
        labelled = aligned != IGNORE_INDEX
        token_loss = torch.nn.functional.cross_entropy(
            logits.float(), aligned[labelled], reduction="none"
        )
        owner = torch.nonzero(labelled)[:, 0]
        per_row = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(
            0, owner, token_loss.double()
        )
        sums[rows] = per_row.cpu().numpy()
        tokens[rows] = labelled.sum(dim=1).cpu().numpy()
    return sums, tokens


def summarize_losses(
    sums: np.ndarray, tokens: np.ndarray, groups: Mapping[str, Sequence[str]] | None = None
) -> dict[str, dict]:
    """Token-weighted loss and perplexity, overall and per value of each grouping.

    sums, tokens (n,) from ``example_loss_sums``; groups: e.g. {"source": [...], "task": [...]}
    with n labels each. Returns {"overall": {...}, "source=dolly": {...}, ...}, each with
    ``loss`` (mean over response tokens), ``perplexity`` = exp(loss), ``rows`` and ``tokens``.
    """

    def entry(mask: np.ndarray) -> dict:
        count = int(tokens[mask].sum())
        loss = float(sums[mask].sum() / count) if count else float("nan")
        return {
            "loss": loss,
            "perplexity": math.exp(loss) if count else float("nan"),
            "rows": int(mask.sum()),
            "tokens": count,
        }

    out = {"overall": entry(np.ones(len(sums), dtype=bool))}
    for name, labels in (groups or {}).items():
        values = np.asarray([str(x) for x in labels])
        for value in sorted(set(values.tolist())):
            out[f"{name}={value}"] = entry(values == value)
    return out


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased whitespace tokens (longest common subsequence)."""
    cand, ref = candidate.lower().split(), reference.lower().split()
    if not cand or not ref:
        return 0.0
    lcs = _lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def last_response_split(input_ids: Sequence[int], labels: Sequence[int]) -> tuple[list, list]:
    """(prompt tokens, reference tokens) around the last labelled (assistant) span."""
    labelled = [i for i, y in enumerate(labels) if y != IGNORE_INDEX]
    if not labelled:
        raise ValueError("example has no response tokens")
    end = labelled[-1] + 1
    start = end - 1
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(input_ids[:start]), list(input_ids[start:end])


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module, prompt_ids: Sequence[int], max_new_tokens: int, eos_token_id: int | None
) -> list[int]:
    """Greedy continuation of one prompt (new tokens only, eos excluded)."""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=lm_head_of(model).device)
    out = unwrap(model).generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    new = out[0, ids.shape[1] :].tolist()
    return new[: new.index(eos_token_id)] if eos_token_id in new else new
