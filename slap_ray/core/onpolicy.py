"""One on-policy SLAP training step (SLAP_METHOD.md sections 1-2), pure PyTorch.

Every example of the batch is forwarded *with* grad in micro-batches and its graph is kept;
losses and LM-head features go to ``select``; only the kept examples' losses enter the single
backward pass, so graphs of pruned micro-batches are never back-propagated. With
``micro_batch_size = 1`` the saving is exact per example; larger micro-batches save only where a
whole micro-batch is pruned (a batched graph cannot be split).

Data parallelism goes through a small ``Collective``: every worker forwards its share of the
global batch, losses and features are all-gathered, every worker runs the same seeded ``select``
on the whole batch (so the kept ids do not depend on the number of workers), back-propagates its
own kept examples scaled by 1 / n_keep, and gradients are summed across workers. The result is
the gradient of the (weighted) mean loss over the kept examples of the global batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from slap_ray.core.features import (
    IGNORE_INDEX,
    SecondMomentEMA,
    inverse_root,
    lm_head_example_gradient_sum,
    lm_head_features,
    project_features,
    response_token_losses_packed,
    shift_labels,
)
from slap_ray.core.scoring import pad_batch, unwrap
from slap_ray.core.selection import n_keep_for, select_weighted


class Collective(Protocol):
    """What a data-parallel step needs from its workers' process group."""

    rank: int
    world_size: int

    def all_gather(self, obj: Any) -> list[Any]: ...

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None: ...


class SingleProcess:
    """The trivial collective: one worker."""

    rank, world_size = 0, 1

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        return None


class TorchDistributed:
    """``torch.distributed`` (gloo or nccl) process group, as set up by e.g. Ray Train."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj)
        return out

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM)


@dataclass
class SelectionSettings:
    """How a batch is selected: method, pruning ratio and the method's options."""

    method: str = "slap"
    alpha: float = 0.3
    num_strata: int = 3
    tau: float = 1.0
    strata: str = "width"
    eps: float = 1e-6
    projection_dim: int | None = None
    projection_seed: int = 0
    vocab_chunk: int | None = None

    def options(self) -> dict[str, Any]:
        return {"num_strata": self.num_strata, "tau": self.tau, "strata": self.strata}


@dataclass
class StepStats:
    """What one step did, summed over workers (``local_*``: this worker only)."""

    batch_size: int
    kept: np.ndarray  # sorted positions in the global batch that were back-propagated
    losses: np.ndarray  # (batch_size,) per-example mean response loss at forward time
    objective: float  # the weighted mean loss over the kept examples (what was differentiated)
    forward_examples: int = 0
    forward_tokens: int = 0
    backward_examples: int = 0
    backward_tokens: int = 0
    local_backward_examples: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class _MicroBatch:
    rows: list[int]  # local row indices
    losses: torch.Tensor  # (b,) with graph
    hidden: torch.Tensor  # (b, T, H) detached
    logits: torch.Tensor  # (N, V) packed response logits, detached
    aligned: torch.Tensor  # (b, T)


def _forward(model, ids, mask, aligned, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states (b, T, H) and packed response logits (N, V), both with grad."""
    base = unwrap(model)
    with autocast():
        hidden = base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = base.get_output_embeddings()(hidden[aligned != IGNORE_INDEX])
    return hidden, logits.float()


def _micro_batches(lengths: Sequence[int], size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + size] for i in range(0, len(order), size)]


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def sum_gradients_(model: torch.nn.Module, collective: Collective) -> None:
    """Sum every trainable parameter's gradient across workers, in one flat all-reduce."""
    params = _trainable(model)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if collective.world_size == 1:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    collective.all_reduce_sum_(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def onpolicy_step(
    model: torch.nn.Module,
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    positions: Sequence[int],
    batch_size: int,
    settings: SelectionSettings,
    rng: np.random.Generator,
    pad_token_id: int,
    *,
    micro_batch_size: int = 1,
    second_moment: torch.Tensor | None = None,
    lm_head_ema: SecondMomentEMA | None = None,
    collective: Collective | None = None,
    autocast: Callable[[], Any] = nullcontext,
) -> StepStats:
    """Forward this worker's rows, select on the whole batch, back-propagate the kept rows.

    examples: this worker's (input_ids, labels) token lists; positions: their positions in the
    global batch of ``batch_size`` (all workers' positions together cover 0..batch_size-1).
    second_moment (V, H) preconditions the features (None: s_hat = 1). ``lm_head_ema``, when
    given (frozen LM head), is updated with the LM-head gradient of the step's objective.
    Leaves the summed gradient in ``.grad`` of every trainable parameter; does not step.
    """
    collective = collective or SingleProcess()
    # "gather" and "all_reduce" include waiting for the slowest worker.
    seconds = dict.fromkeys(
        ("forward", "features", "gather", "select", "backward", "all_reduce"), 0.0
    )
    n_keep = n_keep_for(batch_size, settings.alpha)
    streaming = settings.method == "full" or n_keep == batch_size
    needs_features = settings.method == "slap" and not streaming
    weight = unwrap(model).get_output_embeddings().weight
    local_losses = np.full(len(examples), np.nan)
    local_features: list[torch.Tensor | None] = [None] * len(examples)
    kept_graphs: list[_MicroBatch] = []
    local_backward = local_backward_tokens = 0
    device = weight.device
    preconditioner = (
        inverse_root(second_moment, settings.eps)
        if needs_features and second_moment is not None
        else None
    )
    ema_grad = None if lm_head_ema is None else torch.zeros_like(weight, dtype=torch.float32)

    for rows in _micro_batches([len(x[0]) for x in examples], micro_batch_size):
        start = time.perf_counter()
        ids, mask, targets = pad_batch(
            [examples[i][0] for i in rows], [examples[i][1] for i in rows], pad_token_id, device
        )
        aligned = shift_labels(targets)
        hidden, logits = _forward(model, ids, mask, aligned, autocast)
        losses = response_token_losses_packed(logits, aligned)
        local_losses[rows] = losses.detach().double().cpu().numpy()
        seconds["forward"] += time.perf_counter() - start
        if streaming:
            # Nothing is pruned: back-propagate now (plain gradient accumulation, bounded memory).
            start = time.perf_counter()
            (losses.sum() / batch_size).backward()
            seconds["backward"] += time.perf_counter() - start
            local_backward += len(rows)
            local_backward_tokens += int(mask.sum())
            if ema_grad is not None:
                scale = torch.full((len(rows),), 1.0 / batch_size, device=device)
                ema_grad += lm_head_example_gradient_sum(
                    hidden, weight, aligned, scale, logits=logits
                )
            continue
        micro = _MicroBatch(rows, losses, hidden.detach(), logits.detach(), aligned)
        kept_graphs.append(micro)
        if needs_features:
            start = time.perf_counter()
            features = lm_head_features(
                micro.hidden, weight, aligned, eps=settings.eps, vocab_chunk=settings.vocab_chunk,
                logits=micro.logits, preconditioner=preconditioner,
            )  # fmt: skip
            for k, i in enumerate(rows):
                local_features[i] = features[k]
            seconds["features"] += time.perf_counter() - start

    start = time.perf_counter()
    gathered = collective.all_gather(
        {
            "positions": list(positions),
            "losses": local_losses,
            "features": torch.stack(local_features).cpu().numpy() if needs_features else None,
            "tokens": [len(x[0]) for x in examples],
        }
    )
    order = np.concatenate([np.asarray(g["positions"], dtype=np.int64) for g in gathered])
    if sorted(order.tolist()) != list(range(batch_size)):
        raise ValueError(f"workers' positions do not cover the batch of {batch_size}: {order}")
    losses_global = np.empty(batch_size)
    losses_global[order] = np.concatenate([g["losses"] for g in gathered])
    tokens_global = np.empty(batch_size, dtype=np.int64)
    tokens_global[order] = np.concatenate([g["tokens"] for g in gathered])
    features_global = None
    if needs_features:
        features_global = np.empty((batch_size, weight.shape[0]), dtype=np.float32)
        features_global[order] = np.concatenate([g["features"] for g in gathered])
        if settings.projection_dim is not None:
            features_global = project_features(
                features_global, settings.projection_dim, settings.projection_seed
            )
    seconds["gather"] += time.perf_counter() - start
    start = time.perf_counter()
    if streaming:
        kept, kept_weights = np.arange(batch_size), np.ones(batch_size)
    else:
        kept, kept_weights = select_weighted(
            settings.method, losses_global, features_global, n_keep, rng, **settings.options()
        )
    seconds["select"] += time.perf_counter() - start

    if not streaming:
        start = time.perf_counter()
        weight_of = dict(zip(kept.tolist(), kept_weights.tolist(), strict=True))
        objective_terms = []
        for micro in kept_graphs:
            scale = torch.tensor(
                [weight_of.get(int(positions[i]), 0.0) / n_keep for i in micro.rows],
                device=device,
            )
            chosen = torch.nonzero(scale).squeeze(-1)
            if chosen.numel() == 0:
                continue  # this micro-batch's graph is dropped, never back-propagated
            objective_terms.append((micro.losses[chosen] * scale[chosen]).sum())
            local_backward += int(chosen.numel())
            local_backward_tokens += sum(len(examples[micro.rows[k]][0]) for k in chosen.tolist())
            if ema_grad is not None:
                ema_grad += lm_head_example_gradient_sum(
                    micro.hidden, weight, micro.aligned, scale, logits=micro.logits
                )
        if objective_terms:
            torch.stack(objective_terms).sum().backward()
        kept_graphs.clear()
        seconds["backward"] += time.perf_counter() - start

    start = time.perf_counter()
    sum_gradients_(model, collective)
    counts = torch.tensor(
        [local_backward, local_backward_tokens], dtype=torch.float64, device=device
    )
    collective.all_reduce_sum_(counts)
    if ema_grad is not None:
        collective.all_reduce_sum_(ema_grad)
        lm_head_ema.update(ema_grad)
    seconds["all_reduce"] += time.perf_counter() - start
    objective = float((losses_global[kept] * kept_weights).sum() / len(kept)) if len(kept) else 0.0
    return StepStats(
        batch_size=batch_size,
        kept=np.sort(kept),
        losses=losses_global,
        objective=objective,
        forward_examples=batch_size,
        forward_tokens=int(tokens_global.sum()),
        backward_examples=int(counts[0]),
        backward_tokens=int(counts[1]),
        local_backward_examples=local_backward,
        seconds=seconds,
    )
