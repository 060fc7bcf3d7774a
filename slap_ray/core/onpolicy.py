"""One on-policy SLAP training step (SLAP_METHOD.md sections 1-2), pure PyTorch.

Two ways to spend the saving (``SelectionSettings.onpolicy``):

- ``kept_graphs``: every example of the batch is forwarded *with* grad in micro-batches and its
  graph is kept; losses and LM-head features go to ``select``; only the kept examples' losses
  enter the single backward pass, so graphs of pruned micro-batches are never back-propagated.
  With ``micro_batch_size = 1`` the saving is exact per example; larger micro-batches save only
  where a whole micro-batch is pruned (a batched graph cannot be split).
- ``recompute``: the batch is forwarded *without* grad in large micro-batches
  (``score_micro_batch_size``), losses and features select, then only the kept rows are
  forwarded again with grad and back-propagated in ordinary micro-batches. It pays a second
  forward of the kept rows but keeps batching on both passes, which wins wherever one row does
  not saturate the device.

Data parallelism goes through a small ``Collective``: every worker forwards its share of the
global batch, losses and features are all-gathered, every worker runs the same seeded ``select``
on the whole batch (so the kept ids do not depend on the number of workers), back-propagates its
own kept examples scaled by 1 / n_keep, and gradients are summed across workers. The result is
the gradient of the (weighted) mean loss over the kept examples of the global batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from slap_ray.core.features import (
    SecondMomentEMA,
    lm_head_example_gradient_sum,
    lm_head_features,
    make_preconditioner,
    project_features,
    response_token_losses_packed,
)
from slap_ray.core.model import MicroBatch, forward_micro_batches, lm_head_of
from slap_ray.core.selection import n_keep_for, select_with
from slap_ray.selection_spec import SelectionSpec
from slap_ray.vocabulary import ONPOLICY_MODES


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
    """How a training batch is selected: the selection spec at a pruning ratio, and how its
    features are computed (the config validated every value; this is the core's copy)."""

    spec: SelectionSpec = SelectionSpec()
    alpha: float = 0.3
    eps: float = 1e-6
    projection_seed: int = 0
    vocab_chunk: int | None = None
    onpolicy: str = "kept_graphs"  # or "recompute"
    # Rows per no-grad forward of the recompute mode's scoring pass (None: the whole batch).
    score_micro_batch_size: int | None = None

    def __post_init__(self) -> None:
        assert self.onpolicy in ONPOLICY_MODES, self.onpolicy

    @property
    def method(self) -> str:
        return self.spec.method


@dataclass
class StepStats:
    """What one step did, summed over workers (``local_*``: this worker only).

    ``skipped``: the budget kept no row (e.g. a 1-row final batch at alpha 0.7), so nothing was
    forwarded or back-propagated and the caller must not step the optimizer.
    """

    batch_size: int
    kept: np.ndarray  # sorted positions in the global batch that were back-propagated
    losses: np.ndarray  # (batch_size,) per-example mean response loss at forward time
    objective: float  # the weighted mean loss over the kept examples (what was differentiated)
    forward_examples: int = 0
    forward_tokens: int = 0
    backward_examples: int = 0
    backward_tokens: int = 0
    local_backward_examples: int = 0
    skipped: bool = False
    seconds: dict[str, float] = field(default_factory=dict)


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


class _Step:
    """One step on one worker: what it forwards and how (fixed for the step), and what it
    accumulates (timings, counters, the LM-head gradient for the EMA).

    ``examples``: this worker's (input_ids, labels); ``positions``: their positions in the
    global batch of ``batch_size``; ``micro_batch_size``: rows per forward with grad.
    """

    def __init__(
        self, model, examples, positions, batch_size, *, pad_token_id, micro_batch_size, autocast,
        collective: Collective, lm_head_ema: SecondMomentEMA | None,
    ) -> None:  # fmt: skip
        self.model, self.examples, self.positions = model, examples, positions
        self.batch_size, self.pad_token_id = batch_size, pad_token_id
        self.micro_batch_size, self.autocast = micro_batch_size, autocast
        self.collective, self.lm_head_ema = collective, lm_head_ema
        self.weight = lm_head_of(model)
        self.seconds = dict.fromkeys(
            ("forward", "features", "gather", "select", "recompute", "backward", "all_reduce"),
            0.0,
        )
        self.backward_examples = self.backward_tokens = 0
        self.local_weights: np.ndarray | None = None  # offline training weights of this worker
        self.local_losses = np.full(len(examples), np.nan)
        self.ema_grad = (
            None if lm_head_ema is None else torch.zeros_like(self.weight, dtype=torch.float32)
        )

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    def forward(self, *, grad=True, rows=None, micro_batch_size=None):
        """Forward this worker's rows (or the subset ``rows``), micro-batch by micro-batch
        (timed), in micro-batches of ``micro_batch_size`` (None: the step's); yields
        (micro-batch, per-row losses) with ``micro.rows`` indexing this worker's examples. A
        pass over every row records the losses in ``local_losses``."""
        subset = list(range(len(self.examples))) if rows is None else list(rows)
        if micro_batch_size is None:
            micro_batch_size = self.micro_batch_size
        micro_batches = forward_micro_batches(
            self.model, [self.examples[i][0] for i in subset],
            [self.examples[i][1] for i in subset], self.pad_token_id, micro_batch_size,
            grad=grad, autocast=self.autocast,
        )  # fmt: skip
        while True:
            with self.timed("forward" if rows is None else "recompute"):
                micro = next(micro_batches, None)
                if micro is None:
                    return
                micro.rows = [subset[k] for k in micro.rows]
                losses = response_token_losses_packed(micro.logits, micro.aligned)
                if rows is None:
                    self.local_losses[micro.rows] = losses.detach().double().cpu().numpy()
            yield micro, losses

    def backward_done(self, micro: MicroBatch, scale: torch.Tensor, chosen: list[int]) -> None:
        """Count the rows back-propagated and fold their LM-head gradient into the EMA term."""
        self.backward_examples += len(chosen)
        self.backward_tokens += sum(len(self.examples[micro.rows[k]][0]) for k in chosen)
        if self.ema_grad is not None:
            self.ema_grad += lm_head_example_gradient_sum(
                micro.hidden.detach(),
                self.weight,
                micro.aligned,
                scale,
                logits=micro.logits.detach(),
            )


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
    example_weights: Sequence[float] | None = None,
    groups: Sequence | None = None,
) -> StepStats:
    """Forward this worker's rows, select on the whole batch, back-propagate the kept rows.

    examples: this worker's (input_ids, labels) token lists (possibly none); positions: their
    positions in the global batch of ``batch_size`` (all workers' positions together cover
    0..batch_size-1). second_moment (V, H) preconditions the features (None: s_hat = 1).
    ``lm_head_ema``, when given (frozen LM head), is updated with the LM-head gradient of the
    step's objective. ``example_weights`` (offline ``full`` only): per-row training weights
    (offline InfoBatch), objective sum_j w_j loss_j / batch_size. ``groups`` (batch_size,):
    each global row's distribution stratum, for ``keep_mix``. Leaves the summed gradient in
    ``.grad`` of every trainable parameter; does not step.
    """
    collective = collective or SingleProcess()
    n_keep = n_keep_for(batch_size, settings.alpha)
    if settings.method != "full" and n_keep == 0:
        return StepStats(
            batch_size,
            np.empty(0, np.int64),
            np.full(batch_size, np.nan),
            float("nan"),
            skipped=True,
        )
    step = _Step(
        model, examples, positions, batch_size, pad_token_id=pad_token_id,
        micro_batch_size=micro_batch_size, autocast=autocast, collective=collective,
        lm_head_ema=lm_head_ema,
    )  # fmt: skip
    keeps_all = settings.method == "full" or n_keep == batch_size
    if keeps_all and not settings.spec.drop_top:
        chosen = _full_step(step, example_weights)
    else:
        chosen = _selecting_step(
            step, settings, n_keep, rng, second_moment=second_moment, groups=groups
        )
    backward_examples, backward_tokens = _reduce(step)
    return StepStats(
        batch_size=batch_size,
        kept=np.sort(chosen.kept),
        losses=chosen.losses,
        objective=float((chosen.losses[chosen.kept] * chosen.weights).sum() / len(chosen.kept)),
        forward_examples=batch_size + chosen.examples_recomputed,
        forward_tokens=int(chosen.tokens.sum()) + chosen.tokens_recomputed,
        backward_examples=backward_examples,
        backward_tokens=backward_tokens,
        local_backward_examples=step.backward_examples,
        seconds=step.seconds,
    )


@dataclass
class _Chosen:
    """A step's whole-batch losses (B,) and response tokens (B,), the kept positions (K,) with
    their objective weights (K,), and what was forwarded a second time (recompute mode)."""

    losses: np.ndarray
    tokens: np.ndarray
    kept: np.ndarray
    weights: np.ndarray
    tokens_recomputed: int = 0
    examples_recomputed: int = 0


def _full_step(step: _Step, example_weights: Sequence[float] | None) -> _Chosen:
    """Nothing pruned: every row back-propagated, weighted by ``example_weights`` if given."""
    batch_size = step.batch_size
    weights = (
        np.ones(len(step.examples))
        if example_weights is None
        else np.asarray(example_weights, float)
    )
    local_losses = _streaming_backward(step, weights)
    gathered = _gather(step, local_losses, None)
    losses, tokens, _ = _assemble(gathered, batch_size, None)
    kept, kept_weights = np.arange(batch_size), np.ones(batch_size)
    if example_weights is not None:
        kept_weights = np.empty(batch_size)
        kept_weights[np.concatenate([np.asarray(g["positions"], np.int64) for g in gathered])] = (
            np.concatenate([g["weights"] for g in gathered])
        )
    return _Chosen(losses, tokens, kept, kept_weights)


def _selecting_step(
    step: _Step,
    settings: SelectionSettings,
    n_keep: int,
    rng: np.random.Generator,
    *,
    second_moment: torch.Tensor | None,
    groups: Sequence | None,
) -> _Chosen:
    """Forward every row, select ``n_keep`` on the whole batch, back-propagate the kept rows
    (from the kept graphs, or by forwarding them again in recompute mode)."""
    needs_features = settings.spec.needs_features
    recompute = settings.onpolicy == "recompute"
    graphs, local_losses, local_features = _forward_scoring(
        step, settings, second_moment,
        micro_batch_size=(settings.score_micro_batch_size or step.batch_size) if recompute
        else step.micro_batch_size,
        keep_graphs=not recompute,
    )  # fmt: skip
    gathered = _gather(step, local_losses, local_features)
    losses, tokens, features = _assemble(
        gathered, step.batch_size, settings if needs_features else None
    )
    with step.timed("select"):
        kept, kept_weights = select_with(settings.spec, losses, features, n_keep, rng, groups)
    chosen = _Chosen(losses, tokens, kept, kept_weights)
    if recompute:
        _recompute_kept(step, chosen)
        chosen.tokens_recomputed, chosen.examples_recomputed = int(tokens[kept].sum()), len(kept)
    else:
        _backward_kept(step, graphs, chosen)
    return chosen


def _reduce(step: _Step) -> tuple[int, int]:
    """Sum gradients, back-propagated counts and the LM-head EMA term over workers; returns
    the whole batch's (backward examples, backward tokens)."""
    collective = step.collective
    with step.timed("all_reduce"):
        sum_gradients_(step.model, collective)
        counts = torch.tensor(
            [step.backward_examples, step.backward_tokens],
            dtype=torch.float64,
            device=step.weight.device,
        )
        collective.all_reduce_sum_(counts)
        if step.ema_grad is not None:
            collective.all_reduce_sum_(step.ema_grad)
            step.lm_head_ema.update(step.ema_grad)
    return int(counts[0]), int(counts[1])


def _streaming_backward(step: _Step, weights: np.ndarray) -> np.ndarray:
    """Nothing is pruned: back-propagate each micro-batch at once (plain gradient accumulation,
    bounded memory), row j scaled by weights[j] / batch_size. Returns this worker's per-row
    losses."""
    for micro, losses in step.forward():
        with step.timed("backward"):
            scale = torch.tensor(
                weights[micro.rows] / step.batch_size, dtype=torch.float32, device=losses.device
            )
            (losses * scale).sum().backward()
            step.backward_done(micro, scale, list(range(len(micro.rows))))
    step.local_weights = weights
    return step.local_losses


def _forward_scoring(
    step: _Step,
    settings: SelectionSettings,
    second_moment: torch.Tensor | None,
    *,
    micro_batch_size: int,
    keep_graphs: bool,
):
    """Forward every micro-batch, with grad and its graph kept (``keep_graphs``) or without
    grad; features where the method needs them, preconditioned by ``second_moment`` (V, H).
    Returns (graphs, local losses (n,), local features (n, V) or None); graphs is empty
    without ``keep_graphs``."""
    needs_features = settings.spec.needs_features
    local_features = (
        np.zeros((len(step.examples), step.weight.shape[0]), np.float32) if needs_features else None
    )
    preconditioner = make_preconditioner(
        second_moment if needs_features else None, settings.spec.preconditioner, settings.eps
    )
    graphs: list[tuple[MicroBatch, torch.Tensor]] = []
    for micro, losses in step.forward(grad=keep_graphs, micro_batch_size=micro_batch_size):
        if keep_graphs:
            graphs.append((micro, losses))
        if needs_features:
            with step.timed("features"):
                local_features[micro.rows] = lm_head_features(
                    micro.hidden.detach(), step.weight, micro.aligned, eps=settings.eps,
                    vocab_chunk=settings.vocab_chunk, logits=micro.logits.detach(),
                    preconditioner=preconditioner,
                ).cpu().numpy()  # fmt: skip
    return graphs, step.local_losses, local_features


def _recompute_kept(step: _Step, chosen: _Chosen) -> None:
    """Forward this worker's kept rows again, with grad, and back-propagate each micro-batch at
    once (gradient accumulation): the same gradient as ``_backward_kept`` for the same model."""
    positions = step.positions
    weight_of = dict(zip(chosen.kept.tolist(), chosen.weights.tolist(), strict=True))
    n_keep = len(chosen.kept)  # below the budget only where drop_top left fewer candidates
    mine = [i for i, p in enumerate(positions) if int(p) in weight_of]
    if not mine:
        return
    for micro, losses in step.forward(rows=mine):
        with step.timed("backward"):
            scale = torch.tensor(
                [weight_of[int(positions[i])] / n_keep for i in micro.rows], device=losses.device
            )
            (losses * scale).sum().backward()
            step.backward_done(micro, scale, list(range(len(micro.rows))))


def _gather(step: _Step, local_losses, local_features) -> list[dict]:
    with step.timed("gather"):
        return step.collective.all_gather(
            {
                "positions": list(step.positions),
                "losses": local_losses,
                "features": local_features,
                "tokens": [len(x[0]) for x in step.examples],
                "weights": step.local_weights,
            }
        )


def _assemble(gathered, batch_size, feature_settings):
    """The global batch's losses (B,), token counts (B,) and features (B, V or d) or None, in
    position order."""
    order = np.concatenate([np.asarray(g["positions"], dtype=np.int64) for g in gathered])
    if sorted(order.tolist()) != list(range(batch_size)):
        raise ValueError(f"workers' positions do not cover the batch of {batch_size}: {order}")
    losses = np.empty(batch_size)
    losses[order] = np.concatenate([g["losses"] for g in gathered])
    tokens = np.empty(batch_size, dtype=np.int64)
    tokens[order] = np.concatenate([np.asarray(g["tokens"], np.int64) for g in gathered])
    if feature_settings is None:
        return losses, tokens, None
    features = np.empty((batch_size, gathered[0]["features"].shape[1]), dtype=np.float32)
    features[order] = np.concatenate([g["features"] for g in gathered])
    if feature_settings.spec.projection_dim is not None:
        features = project_features(
            features, feature_settings.spec.projection_dim, feature_settings.projection_seed
        )
    return losses, tokens, features


def _backward_kept(step: _Step, graphs, chosen: _Chosen) -> None:
    """One backward through the kept rows' graphs; pruned micro-batches are never touched."""
    positions = step.positions
    n_keep = len(chosen.kept)  # below the budget only where drop_top left fewer candidates
    with step.timed("backward"):
        weight_of = dict(zip(chosen.kept.tolist(), chosen.weights.tolist(), strict=True))
        terms = []
        for micro, losses in graphs:
            scale = torch.tensor(
                [weight_of.get(int(positions[i]), 0.0) / n_keep for i in micro.rows],
                device=losses.device,
            )
            chosen = torch.nonzero(scale).squeeze(-1)
            if chosen.numel() == 0:
                continue  # this micro-batch's graph is dropped, never back-propagated
            terms.append((losses[chosen] * scale[chosen]).sum())
            step.backward_done(micro, scale, chosen.tolist())
        if terms:
            torch.stack(terms).sum().backward()
        graphs.clear()
