"""Hessian-approximated LM-head gradient features (SLAP_METHOD.md section 1, step 4).

For example j with response positions t (labels != -100), the gradient of its mean-token loss
with respect to the LM-head weight W (V x H) is

    G_j = (1 / T_j) * sum_t (softmax(W h_t) - onehot(y_t)) outer h_t

and its feature is the row norm of the preconditioned gradient,

    f_j[v] = || G_j[v, :] / (sqrt(s_hat[v, :]) + eps) ||_2 ,

with s_hat the diagonal second moment (Adam's bias-corrected ``exp_avg_sq``) or 1 before any
exists. Everything here is closed form: no autograd, and memory bounded by chunking over
examples and vocabulary, so B x V x H is never allocated.

The ``factored`` option replaces 1 / sqrt(s_hat) by an Adafactor-style rank-1 product
a[v] b[h] (``FactoredPreconditioner``). Then

    f_j[v] = a[v] * sqrt(e_v^T K e_v) / T_j,   K = H diag(b^2) H^T   (T_j x T_j),

with e_v the T_j residuals of vocabulary row v: O(T^2 (V + H)) per example instead of O(T V H).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from slap_ray.core.model import IGNORE_INDEX, shift_labels
from slap_ray.vocabulary import PRECONDITIONERS

__all__ = [
    "IGNORE_INDEX",
    "FactoredPreconditioner",
    "PreconditionerCache",
    "SecondMomentEMA",
    "factored_inverse_root",
    "inverse_root",
    "make_preconditioner",
    "lm_head_example_gradient_sum",
    "lm_head_features",
    "project_features",
    "response_softmax_",
    "response_token_losses_packed",
    "shift_labels",
]
# Elements of one (vocab-chunk x hidden) gradient block: 2**21 float32 = 8 MiB, so the block is
# still in cache when it is preconditioned and reduced (measured 1.5-1.75x faster than 64 MiB
# blocks for SmolLM2's V x H = 49152 x 576 on the development machine).
DEFAULT_BLOCK_ELEMENTS = 1 << 21


def _log_normalizer(h: torch.Tensor, weight: torch.Tensor, vocab_chunk: int) -> torch.Tensor:
    """logsumexp over the vocabulary of W h_t, chunked: h (T, H), weight (V, H) -> (T,)."""
    running = torch.full(h.shape[:1], -math.inf, dtype=torch.float32, device=h.device)
    for start in range(0, weight.shape[0], vocab_chunk):
        running = torch.logaddexp(
            running, torch.logsumexp(h @ weight[start : start + vocab_chunk].T, -1)
        )
    return running


class _ExampleResidual:
    """softmax(W h_t) - onehot(y_t) of one example's response tokens, served in vocab chunks.

    ``source`` is the forward pass's logits (T, V), or its softmax (T, V) when ``normalised``
    (``response_softmax_``); without it W h is recomputed per chunk after one chunked
    log-normaliser pass, so memory stays O(T x chunk).
    """

    def __init__(self, h, y, weight, source, vocab_chunk, normalised=False):
        self.h, self.y, self.weight = h, y, weight
        self.logits = None if normalised else source
        self.probabilities = source if normalised else None
        if normalised:
            self.lse = None
        elif source is not None:
            self.lse = torch.logsumexp(source, -1)
        else:
            self.lse = _log_normalizer(h, weight, vocab_chunk)

    def _targets_in(self, start: int, stop: int) -> torch.Tensor:
        return torch.nonzero((self.y >= start) & (self.y < stop)).squeeze(-1)

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        """(T, stop - start) residual block."""
        if self.probabilities is not None:
            residual = self.probabilities[:, start:stop].clone()
        else:
            z = (
                self.logits[:, start:stop]
                if self.logits is not None
                else self.h @ self.weight[start:stop].T
            )
            residual = torch.exp(z - self.lse.unsqueeze(-1))
        rows = self._targets_in(start, stop)
        residual[rows, self.y[rows] - start] -= 1.0
        return residual

    def gradient(self, start: int, stop: int, h: torch.Tensor) -> torch.Tensor:
        """(stop - start, H) block of sum_t residual_t outer h_t; from the softmax it needs no
        residual copy: the one-hot part is subtracted from the product's target rows."""
        if self.probabilities is None:
            return self.chunk(start, stop).T @ h
        grad = self.probabilities[:, start:stop].T @ h
        rows = self._targets_in(start, stop)
        return grad.index_add_(0, self.y[rows] - start, h[rows], alpha=-1.0)


def _examples(hidden, labels, per_token):
    """Yield (j, h (T_j, H), y (T_j,), rows (T_j, V) of ``per_token`` or None) for examples with
    response tokens.

    ``per_token`` (logits or their softmax) is (B, T, V), or (N, V) for the N labelled positions
    in row-major order.
    """
    offset = 0
    for j in range(hidden.shape[0]):
        positions = torch.nonzero(labels[j] != IGNORE_INDEX).squeeze(-1)
        count = positions.numel()
        if count == 0:
            continue
        if per_token is None:
            z = None
        elif per_token.dim() == 2:
            z = per_token[offset : offset + count].float()
        else:
            z = per_token[j, positions].float()
        offset += count
        yield j, hidden[j, positions].float(), labels[j, positions], z


def response_token_losses_packed(
    response_logits: torch.Tensor, aligned_labels: torch.Tensor
) -> torch.Tensor:
    """Per-example mean response loss from packed logits (N, V) of the labelled positions.

    aligned_labels (B, T) -> (B,) float32; NaN for rows without response tokens.
    """
    token_loss = torch.nn.functional.cross_entropy(
        response_logits.float(), aligned_labels[aligned_labels != IGNORE_INDEX], reduction="none"
    )
    return _packed_losses(token_loss, aligned_labels)


# Rows of (N, V) logits normalised at a time: a block of 2**21 float32 (8 MiB) stays in cache
# through max, exp and sum (one logsumexp over all N x V runs about 2x slower here).
def _row_block(vocab: int) -> int:
    return max(1, DEFAULT_BLOCK_ELEMENTS // max(vocab, 1))


def _packed_losses(token_loss: torch.Tensor, aligned_labels: torch.Tensor) -> torch.Tensor:
    """Per-example means (B,) of packed per-token losses (N,); NaN where a row has none."""
    mask = aligned_labels != IGNORE_INDEX
    rows = torch.nonzero(mask)[:, 0]
    sums = torch.zeros(
        aligned_labels.shape[0], dtype=torch.float32, device=token_loss.device
    ).index_add_(0, rows, token_loss)
    return sums / mask.sum(dim=1).float()


def response_softmax_(
    response_logits: torch.Tensor, aligned_labels: torch.Tensor, probabilities: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Losses and softmax of packed response logits in one pass, in place (no autograd).

    response_logits (N, V) float32 at the N labelled positions (row-major), aligned_labels
    (B, T) -> losses (B,) float32, the mean response-token cross-entropy lse - z[y] (NaN for
    rows without response tokens: ``response_token_losses_packed``'s, whose cross-entropy stays
    the autograd path of training), and the logits turned into their softmax in place, for
    ``lm_head_features(probabilities=...)``. ``probabilities=False``: losses only, logits kept.
    Works in row blocks that stay in cache; one log-normaliser serves losses and features.
    """
    targets = aligned_labels[aligned_labels != IGNORE_INDEX]
    token_loss = -response_logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    step = _row_block(response_logits.shape[1])
    for start in range(0, response_logits.shape[0], step):
        block = response_logits[start : start + step]
        if not probabilities:
            token_loss[start : start + step] += torch.logsumexp(block, -1)
            continue
        peak = block.amax(dim=-1, keepdim=True)
        total = block.sub_(peak).exp_().sum(dim=-1, keepdim=True)
        block.div_(total)
        token_loss[start : start + step] += (peak + total.log()).squeeze(1)
    return _packed_losses(token_loss, aligned_labels), response_logits


def _chunk_size(vocab_chunk: int | None, tokens: int, width: int, vocab: int) -> int:
    if vocab_chunk is None:
        vocab_chunk = max(256, DEFAULT_BLOCK_ELEMENTS // max(tokens, width, 1))
    return min(vocab_chunk, vocab)


def inverse_root(second_moment: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The elementwise preconditioner 1 / (sqrt(s_hat) + eps), (V, H) float32.

    Callers that featurise many micro-batches under one second moment (a training step, a
    scored batch) build it once and pass it to ``lm_head_features``: for V x H = 28M entries it
    costs as much as the features of a short example.
    """
    return 1.0 / (second_moment.float().sqrt() + eps)


@dataclass(frozen=True)
class FactoredPreconditioner:
    """A rank-1 preconditioner a[v] * b[h] standing in for 1 / (sqrt(s_hat[v, h]) + eps).

    row (V,) = a, col (H,) = b, float32.
    """

    row: torch.Tensor
    col: torch.Tensor


def factored_inverse_root(second_moment: torch.Tensor, eps: float = 1e-6) -> FactoredPreconditioner:
    """Adafactor's factorisation (Shazeer and Stern, 2018) of s_hat (V, H):

        s_hat[v, h] ~ R[v] C[h] / S,   R = row sums (V,), C = column sums (H,), S = sum(R),

    so 1 / sqrt(s_hat) ~ a[v] b[h] with a = 1 / (sqrt(R) + eps), b = 1 / (sqrt(C / S) + eps)
    (eps guards each factor). Only R and C are needed: V + H numbers instead of V x H.
    """
    moment = second_moment.float()
    rows, cols = moment.sum(dim=1), moment.sum(dim=0)
    total = rows.sum().clamp(min=torch.finfo(torch.float32).tiny)
    return FactoredPreconditioner(
        row=1.0 / (rows.sqrt() + eps), col=1.0 / ((cols / total).sqrt() + eps)
    )


def make_preconditioner(
    second_moment: torch.Tensor | None, kind: str, eps: float = 1e-6
) -> torch.Tensor | FactoredPreconditioner | None:
    """What ``lm_head_features`` takes as ``preconditioner`` for ``kind``: the exact
    elementwise ``adam`` one (V, H), the rank-1 ``factored`` one, or None (``none``, or no second
    moment yet: raw gradient norms)."""
    if kind not in PRECONDITIONERS:
        raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {kind!r}")
    if second_moment is None or kind == "none":
        return None
    if kind == "factored":
        return factored_inverse_root(second_moment, eps)
    return inverse_root(second_moment, eps)


class PreconditionerCache:
    """``make_preconditioner`` built once per (second moment, kind, eps), for callers that
    featurise many batches under one second moment (a scorer: building the exact one reads all
    of V x H). Keyed on the moment tensor itself: passing another tensor rebuilds, so a replaced
    moment can never serve a stale preconditioner. (Changing a moment in place is not seen.)
    """

    def __init__(self) -> None:
        self._moment: torch.Tensor | None = None
        self._built: dict[tuple[str, float], torch.Tensor | FactoredPreconditioner | None] = {}

    def get(
        self, second_moment: torch.Tensor | None, kind: str, eps: float = 1e-6
    ) -> torch.Tensor | FactoredPreconditioner | None:
        if second_moment is not self._moment:
            self._moment, self._built = second_moment, {}
        if (kind, eps) not in self._built:
            self._built[kind, eps] = make_preconditioner(second_moment, kind, eps)
        return self._built[kind, eps]

    @property
    def built(self) -> list[tuple[str, float]]:
        """The (kind, eps) pairs built for the current moment."""
        return list(self._built)


def lm_head_features(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    second_moment: torch.Tensor | None = None,
    eps: float = 1e-6,
    vocab_chunk: int | None = None,
    logits: torch.Tensor | None = None,
    preconditioner: torch.Tensor | FactoredPreconditioner | None = None,
    probabilities: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example row norms of the preconditioned LM-head gradient of the mean response loss.

    hidden (B, T, H): last hidden states (after the final norm). lm_head_weight (V, H).
    labels (B, T): aligned with ``hidden`` (label t is the token predicted from position t),
    IGNORE_INDEX where not trained. second_moment (V, H) or None (then s_hat = 1).
    logits, optional: the forward pass's own W h, reused instead of recomputed: (B, T, V), or
    (N, V) for only the N labelled positions in row-major order (the cheap forward computes the
    LM head only there). preconditioner, optional: ``inverse_root(second_moment, eps)`` built
    once by the caller (then ``second_moment`` may be omitted), or a ``FactoredPreconditioner``.
    probabilities, optional, instead of logits: their softmax (N, V) from ``response_softmax_``
    (the log-normaliser is then not computed again).
    Returns (B, V) float32; an example without response tokens gets all zeros.

    Work goes example by example (no padding waste) and vocabulary chunk by chunk: at most
    (T_j x chunk) and (chunk x H) blocks live at once; B x V x H is never allocated.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} mismatch")
    if probabilities is not None and logits is not None:
        raise ValueError("pass logits or their probabilities, not both")
    weight = lm_head_weight.detach().float()
    scaling = _Scaling.of(weight, second_moment, preconditioner, eps)
    features = torch.zeros(
        hidden.shape[0], weight.shape[0], dtype=torch.float32, device=hidden.device
    )
    source = probabilities if probabilities is not None else logits
    with torch.no_grad():
        for j, h, y, z in _examples(
            hidden.detach(), labels, None if source is None else source.detach()
        ):
            normalised = probabilities is not None
            residual_of = partial(_ExampleResidual, h, y, weight, z, normalised=normalised)
            features[j] = _example_row_norms(h, weight, scaling, vocab_chunk, residual_of)
    return features


@dataclass(frozen=True)
class _Scaling:
    """How the LM-head gradient is preconditioned: a dense (V, H) factor, or a factored one as
    a column (H,) and a row (V,) scale, or neither (raw norms, divided by 1 + eps)."""

    dense: torch.Tensor | None
    col: torch.Tensor | None
    row: torch.Tensor | None
    eps: float

    @classmethod
    def of(cls, weight: torch.Tensor, second_moment, preconditioner, eps: float) -> _Scaling:
        vocab, width = weight.shape
        if preconditioner is None and second_moment is not None:
            # Shared by every example of the call: computed once here.
            preconditioner = inverse_root(second_moment, eps)
        if isinstance(preconditioner, FactoredPreconditioner):
            if preconditioner.row.shape != (vocab,) or preconditioner.col.shape != (width,):
                raise ValueError(f"factored preconditioner does not match weight {(vocab, width)}")
            return cls(None, preconditioner.col, preconditioner.row, eps)
        if preconditioner is not None and preconditioner.shape != weight.shape:
            raise ValueError(
                f"second moment {tuple(preconditioner.shape)} != weight {(vocab, width)}"
            )
        return cls(preconditioner, None, None, eps)


def _example_row_norms(
    h: torch.Tensor,
    weight: torch.Tensor,
    scaling: _Scaling,
    vocab_chunk: int | None,
    residual_of: Callable[..., _ExampleResidual],
) -> torch.Tensor:
    """One example's (V,) feature: each vocabulary row's norm of its preconditioned gradient
    over the example's T response positions (h: (T, H)), divided by T, chunk by chunk."""
    tokens = h.shape[0]
    vocab, width = weight.shape
    chunk = _chunk_size(vocab_chunk, tokens, width, vocab)
    residual = residual_of(chunk)
    # Raw and factored norms are a row scale times ||sum_t e_t (b * h_t)||.
    scaled = h if scaling.col is None else h * scaling.col
    # Gram form: ||sum_t e_t h_t||^2 = e^T (H H^T) e, cheaper than V x H when T < H.
    gram = scaled @ scaled.T if scaling.dense is None and tokens < width else None
    out = torch.empty(vocab, dtype=torch.float32, device=h.device)
    for start in range(0, vocab, chunk):
        stop = min(start + chunk, vocab)
        if gram is not None:
            e = residual.chunk(start, stop)  # (T, Vc)
            rows = (e * (gram @ e)).sum(0).clamp(min=0).sqrt()
        else:
            grad = residual.gradient(start, stop, scaled)  # (Vc, H)
            if scaling.dense is not None:
                grad.mul_(scaling.dense[start:stop])
            rows = torch.linalg.vector_norm(grad, dim=-1)
        if scaling.row is not None:
            rows = rows * scaling.row[start:stop]
        elif scaling.dense is None:
            rows = rows / (1.0 + scaling.eps)
        out[start:stop] = rows / tokens
    return out


def lm_head_example_gradient_sum(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    example_weights: torch.Tensor,
    vocab_chunk: int | None = None,
    logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_j w_j G_j: the LM-head gradient of a weighted sum of per-example mean losses (V, H).

    With w_j = 1 / n over the n trained examples this is the gradient an optimizer sees when the
    objective is the mean over examples of their mean response-token loss (the on-policy
    trainer's objective). example_weights (B,); examples with weight 0 are skipped. Other
    shapes as in ``lm_head_features``.
    """
    weight = lm_head_weight.detach().float()
    vocab, width = weight.shape
    grad = torch.zeros_like(weight)
    with torch.no_grad():
        for j, h, y, z in _examples(
            hidden.detach(), labels, None if logits is None else logits.detach()
        ):
            scale = float(example_weights[j]) / h.shape[0]
            if scale == 0.0:
                continue
            chunk = _chunk_size(vocab_chunk, h.shape[0], width, vocab)
            residual = _ExampleResidual(h, y, weight, z, chunk)
            for start in range(0, vocab, chunk):
                stop = min(start + chunk, vocab)
                grad[start:stop] += residual.gradient(start, stop, h) * scale
    return grad


class SecondMomentEMA:
    """Adam-style bias-corrected EMA of squared LM-head gradients (``exp_avg_sq``).

    Used where the LM head is not trained by Adam (frozen, LoRA, offline scoring), so features
    are preconditioned by the same quantity Adam would hold.
    """

    def __init__(self, beta2: float = 0.999) -> None:
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"beta2 must be in [0, 1), got {beta2}")
        self.beta2 = beta2
        self.steps = 0
        self.exp_avg_sq: torch.Tensor | None = None

    def update(self, batch_grad: torch.Tensor) -> None:
        """Fold one batch gradient (V, H) into the running second moment."""
        squared = batch_grad.detach().float() ** 2
        if self.exp_avg_sq is None:
            self.exp_avg_sq = torch.zeros_like(squared)
        self.exp_avg_sq.mul_(self.beta2).add_(squared, alpha=1.0 - self.beta2)
        self.steps += 1

    def value(self) -> torch.Tensor | None:
        """Bias-corrected second moment (V, H), or None before any update (then s_hat = 1)."""
        if self.exp_avg_sq is None:
            return None
        return self.exp_avg_sq / (1.0 - self.beta2**self.steps)

    def state_dict(self) -> dict:
        return {"beta2": self.beta2, "steps": self.steps, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict) -> None:
        self.beta2 = float(state["beta2"])
        self.steps = int(state["steps"])
        self.exp_avg_sq = state["exp_avg_sq"]


def project_features(features: np.ndarray | torch.Tensor, dim: int, seed: int) -> np.ndarray:
    """Seeded Gaussian random projection (B, V) -> (B, dim), scaled to preserve distances.

    The projection matrix depends only on (V, dim, seed), so every scorer projects identically.
    """
    values = np.asarray(features.cpu() if isinstance(features, torch.Tensor) else features)
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(values.shape[1], dim, generator=generator, dtype=torch.float32)
    return (torch.from_numpy(values.astype(np.float32)) @ matrix).numpy() / math.sqrt(dim)
