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
    PreconditionerCache,
    SecondMomentEMA,
    lm_head_example_gradient_sum,
    lm_head_features,
    project_features,
    response_softmax_,
)
from slap_ray.core.model import LogitsBuffer, forward_micro_batches, lm_head_of
from slap_ray.core.seeds import derive_rng
from slap_ray.core.selection import loss_strata, n_keep_for, select_with
from slap_ray.names import alpha_key
from slap_ray.selection_spec import SelectionSpec


@dataclass
class BatchScores:
    """Per-example results of one batch, aligned with the rows passed in."""

    losses: np.ndarray  # (B,) float64, mean response-token loss
    loss_strata: np.ndarray  # (B,) int64, SLAP loss stratum (0 = lowest)
    keep: dict[str, np.ndarray] = field(default_factory=dict)  # selection key -> (B,) bool
    # selection key -> (B,) float64 training weight of each row (0 where pruned; InfoBatch's
    # 1 / (1 - r) on kept low-loss rows, 1 on every other kept row)
    weight: dict[str, np.ndarray] = field(default_factory=dict)
    num_tokens: int = 0
    forward_passes: int = 1  # over the whole batch: one, whatever the selections need


@dataclass(frozen=True)
class ScoringSettings:
    """How every batch of a run is forwarded and scored, fixed for the run. A run takes every
    value from its config (``ray.scorer.ScorerSettings``); the defaults, the config's, serve
    direct calls (tests, benches)."""

    pad_token_id: int  # the scoring model's tokenizer's
    micro_batch_size: int = 8  # rows per no-grad forward
    num_strata: int = 3  # the loss strata recorded beside each row's loss
    strata: str = "width"  # how those strata are cut (``selection.loss_strata``)
    eps: float = 1e-6  # added to sqrt(s_hat) when preconditioning the features
    vocab_chunk: int | None = None  # vocabulary rows per feature chunk (None: sized to memory)
    projection_seed: int = 0  # seeds the random projection of ``projection_dim`` selections


@dataclass
class ScoringState:
    """What a scorer carries across its batches: the second moment ``s_hat`` (V, H) that
    preconditions the features (None: s_hat = 1), a cache of the preconditioners built from it
    (building the exact one reads all of V x H; keyed on the moment, so replacing it is safe)
    and a reused logits buffer (``core.model.LogitsBuffer``). None: built afresh per call."""

    second_moment: torch.Tensor | None = None
    preconditioners: PreconditionerCache | None = None
    logits_buffer: LogitsBuffer | None = None


def losses_and_features(
    model: torch.nn.Module,
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    settings: ScoringSettings,
    state: ScoringState | None = None,
    *,
    with_features: bool = True,
    preconditioner: str = "adam",
) -> tuple[np.ndarray, torch.Tensor | None]:
    """Forward a batch in micro-batches: losses (B,) float64 and features (B, V) float32
    (None without ``with_features``: methods other than SLAP need the losses only).
    ``preconditioner``: ``adam`` | ``factored`` | ``none`` (see ``make_preconditioner``)."""
    kinds = (preconditioner,) if with_features else ()
    losses, features = losses_and_feature_sets(model, input_ids, labels, settings, state, kinds)
    return losses, features.get(preconditioner)


def losses_and_feature_sets(
    model: torch.nn.Module,
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    settings: ScoringSettings,
    state: ScoringState | None,
    kinds: Sequence[str],
) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """One forward of a batch in micro-batches: losses (B,) float64 and, for each
    preconditioner kind in ``kinds``, features (B, V) float32 from the same hidden states.

    Rows are grouped into micro-batches by length (ties by position) so little padding is
    forwarded; results come back in the input order.
    """
    state = state or ScoringState()
    eps = settings.eps
    losses = np.empty(len(input_ids), dtype=np.float64)
    weight = lm_head_of(model)
    cache = state.preconditioners if state.preconditioners is not None else PreconditionerCache()
    built = {kind: cache.get(state.second_moment, kind, eps) for kind in kinds}
    features = {kind: torch.empty(len(input_ids), weight.shape[0]) for kind in kinds}
    micro_batches = forward_micro_batches(
        model, input_ids, labels, settings.pad_token_id, settings.micro_batch_size,
        logits_buffer=state.logits_buffer,
    )  # fmt: skip
    for micro in micro_batches:
        rows = micro.rows
        micro_losses, probabilities = response_softmax_(
            micro.logits, micro.aligned, probabilities=bool(kinds)
        )
        losses[rows] = micro_losses.double().cpu().numpy()
        for kind in kinds:
            features[kind][rows] = lm_head_features(
                micro.hidden, weight, micro.aligned, eps=eps, vocab_chunk=settings.vocab_chunk,
                probabilities=probabilities, preconditioner=built[kind],
            ).cpu()  # fmt: skip
    return losses, features


@dataclass(frozen=True)
class Selection:
    """One selection of a scored batch: a selection spec at a pruning ratio and seed.

    ``key`` names its output (``keep_<key>``, ``weight_<key>``).
    """

    key: str
    alpha: float
    seed: int
    spec: SelectionSpec = SelectionSpec()


def selections_for(spec: SelectionSpec, alphas: Sequence[float], seed: int) -> list[Selection]:
    """The selections of a plain `slap select` run: one spec at every alpha."""
    return [Selection(alpha_key(a), a, seed, spec) for a in alphas]


def _features_for(
    model: torch.nn.Module,
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    selections: Sequence[Selection],
    settings: ScoringSettings,
    state: ScoringState,
) -> tuple[np.ndarray, dict[str, torch.Tensor], int]:
    """Losses (B,), the feature matrices the selections need, {preconditioner: (B, V)}, and
    how many forward passes over the batch made them (one: every kind comes from the same
    hidden states); no features when no selection is SLAP (the others rank by loss)."""
    wanted = sorted({s.spec.preconditioner for s in selections if s.spec.needs_features})
    # Without a second moment every kind is the raw norm: one computed kind serves them all.
    one_for_all = state.second_moment is None and len(wanted) > 1
    losses, features = losses_and_feature_sets(
        model, input_ids, labels, settings, state, wanted[:1] if one_for_all else wanted
    )
    if one_for_all:
        features = dict.fromkeys(wanted, features[wanted[0]])
    return losses, features, 1


def score_batch(
    model: torch.nn.Module,
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    settings: ScoringSettings,
    *,
    selections: Sequence[Selection],
    batch_key: object,
    state: ScoringState | None = None,
    groups: Sequence | None = None,
) -> BatchScores:
    """Score one composed batch and run every selection on it (SLAP_METHOD.md section 3, step 4).

    Losses and features do not depend on the selection, so one forward pass serves a whole grid
    of methods, alphas and seeds (a sweep scores each batch once). Each (seed, method, alpha,
    batch) gets its own derived RNG, keyed by ``batch_key``: results do not depend on which
    scorer ran it. ``state``: the second moment and the caller's caches, kept across batches
    (``ScoringState``). ``groups`` (B,): each row's distribution stratum (its cluster), which
    ``keep_mix`` selections keep in proportion.
    """
    state = state or ScoringState()
    losses, features, passes = _features_for(model, input_ids, labels, selections, settings, state)
    scores = BatchScores(
        forward_passes=passes,
        losses=losses,
        loss_strata=loss_strata(losses, settings.num_strata, settings.strata),
        num_tokens=sum(len(x) for x in input_ids),
    )
    for s in selections:
        matrix = features.get(s.spec.preconditioner)
        if matrix is not None and s.spec.projection_dim is not None:
            matrix = project_features(matrix, s.spec.projection_dim, settings.projection_seed)
        rng = derive_rng(s.seed, "select", s.spec.method, s.alpha, batch_key)
        n_keep = n_keep_for(len(losses), s.alpha)
        kept, weights = select_with(s.spec, losses, matrix, n_keep, rng, groups)
        scores.keep[s.key] = np.zeros(len(losses), dtype=bool)
        scores.keep[s.key][kept] = True
        scores.weight[s.key] = np.zeros(len(losses), dtype=np.float64)
        scores.weight[s.key][kept] = weights
    return scores


def calibrate_second_moment(
    model: torch.nn.Module,
    batches: Sequence[tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]]],
    pad_token_id: int,
    beta2: float = 0.999,
    micro_batch_size: int = 8,
    logits_buffer: LogitsBuffer | None = None,
) -> SecondMomentEMA:
    """EMA of squared LM-head gradients over calibration batches with the frozen model.

    Each batch contributes the LM-head gradient of the training objective of SLAP_METHOD.md
    section 1 (the mean over examples of their mean response-token loss), exactly what the
    on-policy trainer folds into its EMA for a full batch, so offline and online s_hat agree.
    """
    ema = SecondMomentEMA(beta2=beta2)
    weight = lm_head_of(model)
    for input_ids, labels in batches:
        total = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for micro in forward_micro_batches(
            model, input_ids, labels, pad_token_id, micro_batch_size, logits_buffer=logits_buffer
        ):
            scale = torch.full((len(micro.rows),), 1.0 / len(input_ids), device=weight.device)
            total += lm_head_example_gradient_sum(
                micro.hidden, weight, micro.aligned, scale, logits=micro.logits
            )
        ema.update(total)
    return ema
