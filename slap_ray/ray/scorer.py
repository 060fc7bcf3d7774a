"""Scorer actors: each holds one model replica and scores composed batches (core.scoring).

``BatchScorer`` is the ``map_batches`` form: Ray Data feeds it a group of packed batches per
call (the tokens never pass through the driver) and it writes their scores itself, as one file,
so a killed run keeps every finished group.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from slap_ray.config import SlapConfig
from slap_ray.core.features import PreconditionerCache
from slap_ray.core.model import LogitsBuffer, device_for
from slap_ray.core.scoring import (
    ScoringSettings,
    ScoringState,
    Selection,
    calibrate_second_moment,
    score_batch,
)
from slap_ray.core.seeds import derive_seed
from slap_ray.files import atomic_path
from slap_ray.names import keep_column, weight_column
from slap_ray.ray.pool import fetch_table

SCORED_GLOB = "scored-*.parquet"
# Footer metadata of a scored file: the JSON list of the batch ids it holds (what resume skips).
SCORED_BATCHES_KEY = b"slap.batch_ids"


@dataclass(frozen=True, kw_only=True)
class ScorerSettings:
    """What every scorer replica needs (sent to the actors once): which model to load and how,
    the selections to run and the core's scoring settings. Built from the config
    (``from_config``), which holds every default."""

    model_name: str
    dtype: str
    use_gpu: bool
    torch_threads: int
    selections: tuple[Selection, ...]
    scoring: ScoringSettings

    @classmethod
    def from_config(cls, config: SlapConfig, selections: Sequence[Selection]) -> ScorerSettings:
        from slap_ray.assets import load_tokenizer

        s = config.select
        return cls(
            model_name=config.scoring_model,
            dtype=config.model.dtype,
            use_gpu=config.score.num_gpus_per_scorer > 0,
            # A CPU scorer runs as many torch threads as CPUs it holds.
            torch_threads=max(1, int(config.score.num_cpus_per_scorer)),
            selections=tuple(selections),
            scoring=ScoringSettings(
                pad_token_id=load_tokenizer(config.scoring_model).pad_token_id,
                micro_batch_size=config.score.micro_batch_size,
                num_strata=s.num_strata,
                strata=s.strata,
                eps=s.eps,
                vocab_chunk=config.score.vocab_chunk,
                projection_seed=derive_seed(config.seed, "projection"),
            ),
        )


class Scorer:
    """One model replica. Created as a Ray actor by ``scorer_actor``; plain class for testing."""

    def __init__(self, settings: ScorerSettings) -> None:
        from slap_ray.assets import load_causal_lm

        torch.set_num_threads(settings.torch_threads)
        self.device = device_for(settings.use_gpu, "score.num_gpus_per_scorer")
        dtype = getattr(torch, settings.dtype)
        self.model = load_causal_lm(settings.model_name, dtype=dtype).to(self.device).eval()
        self.selections = settings.selections
        self.settings = settings.scoring
        # The preconditioners are built once per second moment, and one N x V logits
        # allocation serves every batch.
        self.state = ScoringState(
            preconditioners=PreconditionerCache(), logits_buffer=LogitsBuffer()
        )

    def ready(self) -> bool:
        return True

    def set_second_moment(self, value: torch.Tensor | None) -> None:
        self.state.second_moment = None if value is None else value.to(self.device)

    def score(
        self, batch_id: int, input_ids: list, labels: list, groups: list | None = None
    ) -> dict[str, Any]:
        scores = score_batch(
            self.model, input_ids, labels, self.settings, selections=self.selections,
            batch_key=batch_id, state=self.state, groups=groups,
        )  # fmt: skip
        return {
            "batch_id": batch_id,
            "loss": scores.losses,
            "loss_stratum": scores.loss_strata,
            "keep": scores.keep,
            "weight": scores.weight,
            "num_tokens": scores.num_tokens,
            "forward_passes": scores.forward_passes,
        }


def scorer_actor(num_cpus: float, num_gpus: float):
    """The ``Scorer`` class as a Ray actor with the given resources."""
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(Scorer)


def _lists(values) -> list[list[int]]:
    return [list(map(int, x)) for x in values]


@ray.remote
def calibrate_task(settings: ScorerSettings, refs: list, beta2: float, path: str) -> bool:
    """The second-moment EMA over the calibration batches (packed rows behind ``refs``),
    computed by the model the scorers load and saved to ``path``; returns whether there was
    one."""
    from slap_ray.assets import load_causal_lm

    torch.set_num_threads(settings.torch_threads)
    table = fetch_table(refs)
    if table is None:
        return False
    frame = table.to_pandas().sort_values("batch_id")
    model = load_causal_lm(settings.model_name, dtype=getattr(torch, settings.dtype)).eval()
    batches = [(_lists(r["input_ids"]), _lists(r["labels"])) for _, r in frame.iterrows()]
    scoring = settings.scoring
    ema = calibrate_second_moment(
        model, batches, scoring.pad_token_id, beta2, scoring.micro_batch_size
    )
    if ema.value() is None:
        return False
    torch.save(ema.value().cpu(), path)
    return True


class BatchScorer:
    """``map_batches`` UDF: score each packed batch of the call, write them together as
    ``<scored_dir>/scored-<first batch id>.parquet`` (meta, loss, a keep and weight column per
    selection, the conversation, the scorer's node; the batch ids in the footer) and return
    one small row per batch."""

    def __init__(self, settings: ScorerSettings, moment_path: str | None, scored_dir: str) -> None:
        self.scorer = Scorer(settings)
        if moment_path and Path(moment_path).exists():
            self.scorer.set_second_moment(torch.load(moment_path))
        self.scored_dir = Path(scored_dir)
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, packed: pd.DataFrame) -> pd.DataFrame:
        scored = [self._scored(row) for _, row in packed.iterrows()]
        frames = [frame for frame, _ in scored]
        batch_ids = [int(b) for b in packed["batch_id"]]
        if frames:
            self._write(pd.concat(frames, ignore_index=True), batch_ids)
        return pd.DataFrame(
            {
                "batch_id": batch_ids,
                "rows": [len(frame) for frame in frames],
                "forward_passes": [passes for _, passes in scored],
            },
            columns=["batch_id", "rows", "forward_passes"],
        )

    def _scored(self, row: pd.Series) -> tuple[pd.DataFrame, int]:
        """One batch's scored rows, and how many forward passes over the batch made them."""
        batch_id = int(row["batch_id"])
        result = self.scorer.score(
            batch_id, _lists(row["input_ids"]), _lists(row["labels"]), list(row["cluster"])
        )
        frame = pd.DataFrame(
            {
                c: list(row[c])
                for c in ("id", "source", "task", "path", "line", "cluster", "num_tokens")
            }
        )
        frame["batch_id"] = batch_id
        frame["loss"] = np.asarray(result["loss"], dtype=np.float64)
        frame["loss_stratum"] = np.asarray(result["loss_stratum"], dtype=np.int64)
        for key, mask in result["keep"].items():
            frame[keep_column(key)] = np.asarray(mask, dtype=bool)
            frame[weight_column(key)] = np.asarray(result["weight"][key], dtype=np.float64)
        frame["messages"] = list(row["messages"])
        frame["tools"] = list(row["tools"])
        frame["scorer_node"] = self.node
        return frame, int(result["forward_passes"])

    def _write(self, frame: pd.DataFrame, batch_ids: list[int]) -> None:
        """Atomically: a killed call leaves no scored file."""
        table = pa.Table.from_pandas(frame, preserve_index=False)
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), SCORED_BATCHES_KEY: json.dumps(batch_ids)}
        )
        first = min(batch_ids)  # unique: a call's batches are scored nowhere else
        with atomic_path(self.scored_dir / f"scored-{first:06d}.parquet") as tmp:
            pq.write_table(table, tmp)
