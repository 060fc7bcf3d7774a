"""Held-out evaluation: response-token loss and perplexity per group, and the generation check
(exact match, chrF or ROUGE-L of greedy answers).

Pure PyTorch/NumPy; the trainer shards eval rows over workers and gathers the per-example sums.
"""

from __future__ import annotations

import functools
import math
import re
import string
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from slap_ray import vocabulary
from slap_ray.core.model import IGNORE_INDEX, forward_micro_batches, lm_head_of, unwrap
from slap_ray.names import GENERATION_ALL_ROWS

if TYPE_CHECKING:
    from slap_ray.core.onpolicy import Collective


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
    for micro in forward_micro_batches(model, input_ids, labels, pad_token_id, micro_batch_size):
        labelled = micro.aligned != IGNORE_INDEX
        token_loss = torch.nn.functional.cross_entropy(
            micro.logits, micro.aligned[labelled], reduction="none"
        )
        owner = torch.nonzero(labelled)[:, 0]
        per_row = torch.zeros(len(micro.rows), dtype=torch.float64, device=token_loss.device)
        per_row.index_add_(0, owner, token_loss.double())
        sums[micro.rows] = per_row.cpu().numpy()
        tokens[micro.rows] = micro.response_tokens.cpu().numpy()
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


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (``rouge-score``, Porter-stemmed, as published results report it)."""
    return float(_rouge_scorer().score(reference, candidate)["rougeL"].fmeasure)


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation (lower case; punctuation, articles and extra spaces out),
    as open-domain QA scores exact match (Natural Questions open included)."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


_PUNCTUATION = frozenset(string.punctuation)


def exact_match(candidate: str, reference: str) -> float:
    """1.0 when the normalised answers are equal, else 0.0."""
    return float(normalize_answer(candidate) == normalize_answer(reference))


def chrf(candidate: str, reference: str) -> float:
    """Sentence chrF (``sacrebleu``'s defaults: character 6-grams, beta 2), 0-100."""
    return float(_chrf_metric().sentence_score(candidate, [reference]).score)


@functools.cache
def _chrf_metric():
    from sacrebleu.metrics import CHRF

    return CHRF()


GENERATION_METRICS = {"exact_match": exact_match, "chrf": chrf, "rouge_l": rouge_l}
assert tuple(GENERATION_METRICS) == vocabulary.GENERATION_METRICS  # the names a config takes
ALL_ROWS = GENERATION_ALL_ROWS  # the plain check: the first rows of the eval set, ROUGE-L


def generation_plan(
    ids: Sequence[str], sources: Sequence[str], metrics: Mapping[str, str], rows: int
) -> list[tuple[int, str, str]]:
    """Which eval rows the generation check answers: (row index, group, metric) per row.

    With ``metrics`` (source -> metric) each listed source's first ``rows`` rows by id, scored
    with its metric, grouped by source; without, the table's first ``rows`` rows with ROUGE-L.
    """
    if not metrics:
        return [(i, ALL_ROWS, "rouge_l") for i in range(min(rows, len(ids)))]
    plan = []
    for source, metric in sorted(metrics.items()):
        mine = sorted((ids[i], i) for i in range(len(ids)) if sources[i] == source)
        plan += [(i, source, metric) for _, i in mine[:rows]]
    return plan


def summarize_generation(scored: Sequence[tuple[str, str, float]]) -> dict[str, dict]:
    """(group, metric, score) per answered row -> {group: {"metric", "score" (mean), "rows"}}."""
    groups: dict[str, dict] = {}
    for group, metric, score in scored:
        entry = groups.setdefault(group, {"metric": metric, "scores": []})
        entry["scores"].append(score)
    return {
        group: {
            "metric": e["metric"],
            "score": float(np.mean(e["scores"])),
            "rows": len(e["scores"]),
        }
        for group, e in sorted(groups.items())
    }


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


def evaluate_rows(
    model, table: dict, collective: Collective, micro_batch_size: int, pad_token_id: int
) -> tuple[dict, dict]:
    """Loss / perplexity of the eval rows, sharded over the collective's workers, identical
    result on each; and each row's response-loss sum and token count (the table's order, N
    rows), so that intervals can resample rows. ``table``: columns id, input_ids, labels,
    source, task (N each)."""
    start = time.perf_counter()
    mine = list(range(collective.rank, len(table["id"]), collective.world_size))
    model.eval()
    sums, tokens = example_loss_sums(
        model,
        [table["input_ids"][i] for i in mine],
        [table["labels"][i] for i in mine],
        pad_token_id,
        micro_batch_size,
    )
    model.train()
    parts = collective.all_gather((mine, sums.tolist(), tokens.tolist()))
    all_sums, all_tokens = np.zeros(len(table["id"])), np.zeros(len(table["id"]), dtype=np.int64)
    for rows, s, t in parts:
        all_sums[rows], all_tokens[rows] = s, t
    summary = summarize_losses(
        all_sums, all_tokens, {"source": table["source"], "task": table["task"]}
    )
    summary["overall"]["seconds"] = round(time.perf_counter() - start, 3)
    return summary, {"loss_sum": all_sums.tolist(), "tokens": all_tokens.tolist()}


def generation_check(
    model, table: dict, rows: int, metrics: dict[str, str], max_new_tokens: int, tokenizer
) -> dict:
    """Greedy answers to the planned eval rows (``generation_plan``), each scored against the
    row's last response; per group (source, or ``all``) the mean score, and a few samples."""
    scored, samples = [], []
    model.eval()
    for i, group, metric in generation_plan(table["id"], table["source"], metrics, rows):
        prompt, reference = last_response_split(table["input_ids"][i], table["labels"][i])
        new = greedy_generate(model, prompt, max_new_tokens, tokenizer.eos_token_id)
        reference_text = tokenizer.decode(reference, skip_special_tokens=True)
        text = tokenizer.decode(new, skip_special_tokens=True)
        scored.append((group, metric, GENERATION_METRICS[metric](text, reference_text)))
        samples.append({"id": table["id"][i], "generated": text, "reference": reference_text})
    model.train()
    groups = summarize_generation(scored)
    return {
        "rows": len(scored),
        "groups": groups,
        "rouge_l": groups[ALL_ROWS]["score"] if ALL_ROWS in groups else None,
        "samples": samples[:5],
    }
