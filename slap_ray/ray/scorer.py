"""Scorer actors: each holds one model replica and scores composed batches (core.scoring)."""

from __future__ import annotations

from typing import Any

import ray
import torch

from slap_ray.core.model import device_for
from slap_ray.core.scoring import calibrate_second_moment, score_batch


class Scorer:
    """One model replica. Created as a Ray actor by ``scorer_actor``; plain class for testing."""

    def __init__(self, model_name: str, dtype: str, settings: dict[str, Any]) -> None:
        from slap_ray.assets import load_causal_lm, load_tokenizer

        torch.set_num_threads(int(settings.pop("torch_threads", 1)))
        self.device = device_for(settings.pop("use_gpu", False), "score.num_gpus_per_scorer")
        self.model = load_causal_lm(model_name, dtype=getattr(torch, dtype)).to(self.device).eval()
        self.pad_token_id = load_tokenizer(model_name).pad_token_id
        self.settings = settings
        self.second_moment: torch.Tensor | None = None

    def ready(self) -> bool:
        return True

    def set_second_moment(self, value: torch.Tensor | None) -> None:
        self.second_moment = None if value is None else value.to(self.device)

    def calibrate(self, batches: list[tuple[list, list]], beta2: float) -> torch.Tensor | None:
        ema = calibrate_second_moment(
            self.model, batches, self.pad_token_id, beta2, self.settings["micro_batch_size"]
        )
        return None if ema.value() is None else ema.value().cpu()

    def score(self, batch_id: int, input_ids: list, labels: list) -> dict[str, Any]:
        scores = score_batch(
            self.model,
            input_ids,
            labels,
            batch_key=batch_id,
            pad_token_id=self.pad_token_id,
            second_moment=self.second_moment,
            **self.settings,
        )
        return {
            "batch_id": batch_id,
            "loss": scores.losses,
            "loss_stratum": scores.loss_strata,
            "keep": scores.keep,
            "weight": scores.weight,
            "num_tokens": scores.num_tokens,
        }


def scorer_actor(num_cpus: float, num_gpus: float):
    """The ``Scorer`` class as a Ray actor with the given resources."""
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(Scorer)
