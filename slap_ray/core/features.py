"""Hessian-approximated LM-head gradient features (SLAP_METHOD.md section 1, step 4).

For example j with response positions t (labels != -100), the gradient of its mean-token loss
with respect to the LM-head weight W (V x H) is

    G_j = (1 / T_j) * sum_t (softmax(W h_t) - onehot(y_t)) outer h_t

and its feature is the row norm of the preconditioned gradient,

    f_j[v] = || G_j[v, :] / (sqrt(s_hat[v, :]) + eps) ||_2 ,

with s_hat the diagonal second moment (Adam's bias-corrected ``exp_avg_sq``) or 1 before any
exists. Everything here is closed form: no autograd, and memory bounded by chunking over
examples and vocabulary, so B x V x H is never allocated.
"""

from __future__ import annotations

import math

import numpy as np
import torch

IGNORE_INDEX = -100
# Elements of one (examples x vocab-chunk x hidden) gradient block: 2**24 float32 = 64 MiB.
DEFAULT_BLOCK_ELEMENTS = 1 << 24


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Align Hugging Face labels (B, T) with hidden states: out[:, t] = labels[:, t + 1].

    The last position predicts nothing and gets IGNORE_INDEX.
    """
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def response_token_losses(logits: torch.Tensor, aligned_labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over response tokens per example.

    logits (B, T, V), aligned_labels (B, T) -> (B,) float32. Rows without response tokens get NaN,
    so a caller cannot mistake them for zero-loss examples.
    """
    token_loss = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), aligned_labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    mask = aligned_labels != IGNORE_INDEX
    return (token_loss * mask).sum(dim=1) / mask.sum(dim=1).float()


def _gather_response_tokens(
    hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack each example's response positions to the front.

    hidden (B, T, H), labels (B, T) -> (h (B, R, H) float32 zero-padded, y (B, R) long with -100
    padding, counts (B,)), where R is the largest number of response tokens in the batch.
    """
    mask = labels != IGNORE_INDEX
    counts = mask.sum(dim=1)
    width = max(int(counts.max().item()) if counts.numel() else 0, 1)
    # A stable sort on ~mask moves response positions to the front in their original order.
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
    h = torch.gather(hidden, 1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])).float()
    y = torch.gather(labels, 1, order)
    valid = torch.arange(width, device=labels.device).unsqueeze(0) < counts.unsqueeze(1)
    h = h * valid.unsqueeze(-1)
    y = y.masked_fill(~valid, IGNORE_INDEX)
    return h, y, counts


def _log_normalizer(h: torch.Tensor, weight: torch.Tensor, vocab_chunk: int) -> torch.Tensor:
    """logsumexp over the vocabulary of W h for every packed token, chunked: (B, R, H) -> (B, R)."""
    running = torch.full(h.shape[:2], -math.inf, dtype=torch.float32, device=h.device)
    for start in range(0, weight.shape[0], vocab_chunk):
        logits = h @ weight[start : start + vocab_chunk].T
        running = torch.logaddexp(running, torch.logsumexp(logits, dim=-1))
    return running


def _residual_chunk(
    h: torch.Tensor, y: torch.Tensor, weight_chunk: torch.Tensor, lse: torch.Tensor, start: int
) -> torch.Tensor:
    """softmax(W h) - onehot(y) restricted to vocabulary rows [start, start + Vc): (B, R, Vc)."""
    residual = torch.exp(h @ weight_chunk.T - lse.unsqueeze(-1))
    in_chunk = (y >= start) & (y < start + weight_chunk.shape[0])
    b, r = torch.nonzero(in_chunk, as_tuple=True)
    residual[b, r, y[b, r] - start] -= 1.0
    return residual * (y != IGNORE_INDEX).unsqueeze(-1)


def lm_head_features(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    second_moment: torch.Tensor | None = None,
    eps: float = 1e-6,
    vocab_chunk: int | None = None,
) -> torch.Tensor:
    """Per-example row norms of the preconditioned LM-head gradient of the mean response loss.

    hidden (B, T, H): last hidden states (after the final norm). lm_head_weight (V, H).
    labels (B, T): aligned with ``hidden`` (label t is the token predicted from position t),
    IGNORE_INDEX where not trained. second_moment (V, H) or None (then s_hat = 1).
    Returns (B, V) float32; an example without response tokens gets all zeros.

    Memory: blocks of (examples x vocab_chunk x H) of at most ``DEFAULT_BLOCK_ELEMENTS`` floats,
    plus the packed response hidden states; B x V x H is never allocated.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} mismatch")
    weight = lm_head_weight.detach().float()
    vocab, width = weight.shape
    if second_moment is not None and second_moment.shape != weight.shape:
        raise ValueError(f"second_moment {tuple(second_moment.shape)} != weight {(vocab, width)}")
    with torch.no_grad():
        h, y, counts = _gather_response_tokens(hidden.detach(), labels)
        batch, packed = y.shape
        if vocab_chunk is None:
            vocab_chunk = max(256, DEFAULT_BLOCK_ELEMENTS // max(1, batch * max(width, packed)))
        vocab_chunk = min(vocab_chunk, vocab)
        lse = _log_normalizer(h, weight, vocab_chunk)
        scale = 1.0 / counts.clamp(min=1).float()
        features = torch.empty(batch, vocab, dtype=torch.float32, device=h.device)
        use_gram = second_moment is None and packed < width
        for start in range(0, vocab, vocab_chunk):
            weight_chunk = weight[start : start + vocab_chunk]
            residual = _residual_chunk(h, y, weight_chunk, lse, start)  # (B, R, Vc)
            if use_gram:
                # Gram form: ||sum_t e_t h_t||^2 = e^T (H H^T) e, cheaper than V x H when R < H.
                gram = h @ h.transpose(1, 2)  # (B, R, R)
                squared = (residual * (gram @ residual)).sum(dim=1).clamp(min=0)
                rows = squared.sqrt() / (1.0 + eps)
            else:
                grad = residual.transpose(1, 2) @ h  # (B, Vc, H)
                if second_moment is None:
                    rows = torch.linalg.vector_norm(grad, dim=-1) / (1.0 + eps)
                else:
                    chunk_moment = second_moment[start : start + vocab_chunk].float()
                    rows = torch.linalg.vector_norm(grad / (chunk_moment.sqrt() + eps), dim=-1)
            features[:, start : start + vocab_chunk] = rows * scale.unsqueeze(1)
    return features


def lm_head_batch_gradient(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    vocab_chunk: int | None = None,
) -> torch.Tensor:
    """LM-head weight gradient of the token-mean response loss of a whole batch: (V, H) float32.

    The quantity whose square an optimizer's second moment tracks; used to calibrate or update
    ``SecondMomentEMA`` when the LM head is frozen. Shapes as in ``lm_head_features``.
    """
    weight = lm_head_weight.detach().float()
    vocab = weight.shape[0]
    with torch.no_grad():
        h, y, counts = _gather_response_tokens(hidden.detach(), labels)
        total = max(int(counts.sum().item()), 1)
        vocab_chunk = min(vocab_chunk or 4096, vocab)
        lse = _log_normalizer(h, weight, vocab_chunk)
        flat_h = h.reshape(-1, h.shape[-1])
        grad = torch.empty_like(weight)
        for start in range(0, vocab, vocab_chunk):
            residual = _residual_chunk(h, y, weight[start : start + vocab_chunk], lse, start)
            grad[start : start + vocab_chunk] = residual.reshape(-1, residual.shape[-1]).T @ flat_h
    return grad / total


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
