"""Fine-tuning building blocks without Ray: LoRA wrapping, AdamW + warmup/cosine, batch order,
second-moment source, checkpoint state, compute model. Functions take plain arguments.

The Ray Train worker loop (``slap_ray.ray.train_loop``) strings these together; so do the step
benchmark and the unit tests, without a cluster.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from slap_ray.core.model import lm_head_of, unwrap
from slap_ray.core.seeds import id_rank_key

STATE_FILE = "training_state.pt"
MODEL_DIR = "model"


def add_lora(
    model: torch.nn.Module,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str],
) -> torch.nn.Module:
    """Wrap a causal LM with peft LoRA adapters; the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def lm_head_is_trained(model: torch.nn.Module) -> bool:
    return bool(lm_head_of(model).requires_grad)


def make_optimizer(
    model: torch.nn.Module,
    learning_rate: float,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters."""
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=learning_rate,
        betas=tuple(betas),
        eps=eps,
        weight_decay=weight_decay,
    )


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ceil(warmup_ratio * total) steps, then cosine decay to 0."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adam_second_moment(
    optimizer: torch.optim.Optimizer, param: torch.Tensor
) -> torch.Tensor | None:
    """Adam's bias-corrected ``exp_avg_sq`` of ``param`` (SLAP's s_hat), None before any step."""
    state = optimizer.state.get(param)
    if not state or "exp_avg_sq" not in state:
        return None
    beta2 = next(
        g["betas"][1] for g in optimizer.param_groups if any(p is param for p in g["params"])
    )
    step = float(state["step"])
    return state["exp_avg_sq"] / (1.0 - beta2**step)


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
    return math.ceil(num_rows / batch_size)


def total_steps(num_rows: int, batch_size: int, epochs: int, max_steps: int | None = None) -> int:
    """Optimizer steps of a run: every epoch's batches, capped at ``max_steps``."""
    steps = epochs * steps_per_epoch(num_rows, batch_size)
    return min(steps, max_steps) if max_steps else steps


def epoch_order(ids: list[str], seed: int, epoch: int) -> list[int]:
    """Row indices in the seeded shuffle of one epoch, keyed by row id: the batches depend only
    on the set of ids, not on input order or the number of workers."""
    stage = f"train-order-{epoch}"
    return sorted(range(len(ids)), key=lambda i: (id_rank_key(seed, stage, ids[i]), ids[i]))


class BatchSchedule:
    """Global batch ``step`` -> row indices (the last batch of an epoch may be smaller)."""

    def __init__(self, ids: list[str], batch_size: int, seed: int) -> None:
        self.ids, self.batch_size, self.seed = ids, batch_size, seed
        self.per_epoch = steps_per_epoch(len(ids), batch_size)
        self._orders: dict[int, list[int]] = {}

    def rows(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.per_epoch)
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.ids, self.seed, epoch)}
        return self._orders[epoch][index * self.batch_size : (index + 1) * self.batch_size]


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """``forward``: weights a token's forward multiplies through (all but the input-embedding
    lookup; a tied LM head counts once); ``trainable``: weights that get gradients."""
    base = unwrap(model)
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    embedding = base.get_input_embeddings().weight
    tied = embedding is lm_head_of(model)
    forward = total if tied else total - embedding.numel()
    trainable = sum(p.numel() for p in unique.values() if p.requires_grad)
    return {"total": total, "forward": forward, "trainable": trainable}


def flops_estimate(
    counts: dict[str, int], forward_tokens: int, backward_tokens: int, lora: bool
) -> dict[str, float]:
    """FLOPs model of SLAP_METHOD.md section 2: 2N per forward token; per backward token 4N
    for full fine-tuning, and 2N (activation gradients through every layer) + 2N_trainable
    (weight gradients) with LoRA, i.e. about one forward."""
    n = counts["forward"]
    per_backward = (2 * n + 2 * counts["trainable"]) if lora else 4 * n
    forward = 2.0 * n * forward_tokens
    backward = float(per_backward) * backward_tokens
    return {"forward": forward, "backward": backward, "total": forward + backward}


def scoring_cost_fraction(
    scoring_parameters: int, trained_parameters: int, alpha: float, epochs: int = 1
) -> float:
    """Scoring FLOPs over the training FLOPs the selection prunes (FLOPs model of section 2).

    Scoring forwards every row once (2 N_score per token); full fine-tuning of a row costs
    6 N_train per token per epoch, and an alpha fraction of the rows is pruned. Token counts are
    taken as equal under both tokenizers, and the features' cost is left out:
    N_score / (3 N_train alpha epochs).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must satisfy 0 < alpha < 1, got {alpha}")
    return scoring_parameters / (3.0 * trained_parameters * alpha * epochs)


def save_training_state(
    directory: Path, model, optimizer, scheduler, state: dict[str, Any]
) -> None:
    """Model (adapter weights only for LoRA), optimizer, scheduler and loop state into a folder."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory / MODEL_DIR)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **state},
        directory / STATE_FILE,
    )


def load_training_state(directory: Path, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore what ``save_training_state`` wrote; returns the loop state."""
    from safetensors.torch import load_file

    folder = directory / MODEL_DIR
    if (folder / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
    else:
        weights = {}
        for shard in sorted(folder.glob("*.safetensors")):
            weights.update(load_file(shard))
        missing, unexpected = unwrap(model).load_state_dict(weights, strict=False)
        real_missing = [k for k in missing if not k.endswith("lm_head.weight")]
        if real_missing or unexpected:
            raise ValueError(
                f"checkpoint mismatch: missing {real_missing}, unexpected {unexpected}"
            )
    saved = torch.load(directory / STATE_FILE, weights_only=False, map_location="cpu")
    optimizer.load_state_dict(saved.pop("optimizer"))
    scheduler.load_state_dict(saved.pop("scheduler"))
    return saved
