"""Ray Train: the per-worker fine-tuning loop and the ``TorchTrainer`` that runs it.

Each step calls ``core.onpolicy.onpolicy_step`` (offline mode is its alpha = 0 / ``full`` case);
everything else here is Ray Train plumbing: worker rank, the process group, checkpoints and
``ray.train.report``. Gradients are summed with one explicit all-reduce instead of DDP, because
the on-policy step forwards several micro-batches with their graphs kept before a single
backward, which DDP's per-forward reducer does not support.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from slap_ray.config import SlapConfig, TrainConfig
from slap_ray.core.evaluation import evaluate_rows, generation_check
from slap_ray.core.features import SecondMomentEMA
from slap_ray.core.model import device_for, lm_head_of
from slap_ray.core.onpolicy import (
    SelectionSettings,
    SingleProcess,
    TorchDistributed,
    onpolicy_step,
)
from slap_ray.core.seeds import derive_rng, derive_seed
from slap_ray.core.training import (
    BatchSchedule,
    adam_second_moment,
    add_lora,
    lm_head_is_trained,
    load_training_state,
    make_optimizer,
    parameter_counts,
    save_training_state,
    warmup_cosine,
)
from slap_ray.selection_spec import SelectionSpec

COUNTERS = ("forward_examples", "forward_tokens", "backward_examples", "backward_tokens")


def mix_groups(sources: list, tasks: list) -> list[str]:
    """The distribution stratum of each training row that on-policy ``keep_mix`` keeps in
    proportion: its source, or its task where no row has a known source."""
    known = any(s not in (None, "unknown") for s in sources)
    return [str(s) for s in sources] if known else [str(t) for t in tasks]


def _digest(params: list[torch.Tensor]) -> str:
    """sha256 of parameter values: proves frozen weights stayed bit-identical."""
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _autocast(precision: str, device: str):
    if precision == "bf16":
        return partial(torch.autocast, device_type=device.split(":")[0], dtype=torch.bfloat16)
    return nullcontext


def build_model(model_name: str, train: TrainConfig, device: str) -> torch.nn.Module:
    """The causal LM in train mode: LoRA adapters (base frozen) or every weight trainable."""
    from slap_ray.assets import load_causal_lm

    model = load_causal_lm(model_name).to(device)
    if train.finetuning == "lora":
        model = add_lora(
            model, train.lora_rank, train.lora_alpha, train.lora_dropout, train.lora_target_modules
        )
    return model.train()


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _history_entry(step: int, stats, scheduler, grad_norm: float | None, elapsed: float) -> dict:
    """One step's record; a skipped step (budget of 0 rows) has no loss and no kept ids."""
    return {
        "step": step,
        "loss": _finite_or_none(stats.objective),
        "batch_loss": _finite_or_none(float(np.mean(stats.losses))) if not stats.skipped else None,
        "lr": scheduler.get_last_lr()[0],
        "grad_norm": grad_norm,
        "batch_size": stats.batch_size,
        "backward_examples": stats.backward_examples,
        "skipped": stats.skipped,
        "kept_ids": None,
        "seconds": round(elapsed, 4),
    }


@dataclass(frozen=True)
class WorkerSettings:
    """What every training worker receives from the driver (``make_trainer``): the validated
    train config, where the tokenised tables are, and the run's resolved numbers."""

    train: TrainConfig
    model_name: str  # a resolved local folder
    seed: int
    beta2: float
    selection: SelectionSettings
    micro_batch_size: int
    total_steps: int
    train_ref: ray.ObjectRef  # dict of columns: id, input_ids, labels[, weight]
    eval_ref: ray.ObjectRef
    eval_micro_batch: int
    generate_rows: int
    generate_metrics: dict[str, str]  # source -> metric; empty: the first rows, ROUGE-L
    max_new_tokens: int
    # The untrained model's held-out evaluation (summary, per-row sums) when a sweep's earlier
    # trial already computed it for the same model and rows; None: evaluate before training.
    base_eval: tuple[dict, dict] | None = None


def train_loop_per_worker(config: dict[str, WorkerSettings]) -> None:
    """One data-parallel worker (``TorchTrainer`` passes ``{"settings": WorkerSettings}``)."""
    run = _WorkerRun(config["settings"])
    run.restore(ray.train.get_checkpoint())
    while run.state["step"] < run.settings.total_steps:
        run.step()
    run.finish()


class _WorkerRun:
    """The model, optimiser and run state of one worker, stepped by ``train_loop_per_worker``."""

    def __init__(self, settings: WorkerSettings) -> None:
        from slap_ray.assets import load_tokenizer

        train = settings.train
        self.settings, self.train = settings, train
        torch.set_num_threads(train.torch_threads)
        world_size = ray.train.get_context().get_world_size()
        self.collective = TorchDistributed() if world_size > 1 else SingleProcess()
        device_for(train.use_gpu, "train.use_gpu")  # a granted GPU torch cannot use is an error
        device = str(ray.train.torch.get_device()) if train.use_gpu else "cpu"
        self.table, self.eval_table = ray.get(settings.train_ref), ray.get(settings.eval_ref)
        self.tokenizer = load_tokenizer(settings.model_name)
        # Adapter initialisation is random: seed it, identically on every worker.
        torch.manual_seed(derive_seed(settings.seed, "init") % 2**63)
        self.model = build_model(settings.model_name, train, device)
        self.optimizer = make_optimizer(
            self.model, train.learning_rate, train.adam_betas, train.adam_eps, train.weight_decay
        )
        self.scheduler = warmup_cosine(self.optimizer, settings.total_steps, train.warmup_ratio)
        self.ema = None if lm_head_is_trained(self.model) else SecondMomentEMA(settings.beta2)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.frozen = [p for p in self.model.parameters() if not p.requires_grad]
        self.frozen_at_load = _digest(self.frozen)
        self.schedule = BatchSchedule(self.table["id"], train.batch_size, settings.seed)
        self.groups = mix_groups(self.table["source"], self.table["task"])
        self.autocast = _autocast(train.precision, device)
        self.head = lm_head_of(self.model)
        self.state: dict[str, Any] = {
            "step": 0,
            "history": [],
            "counters": dict.fromkeys(COUNTERS, 0),
            "base_eval": None,
            "ema": None,
            "resumed_from_step": None,
            "step_seconds": {},
            "trainable_digest_start": _digest(self.trainable),
        }

    def restore(self, checkpoint: ray.train.Checkpoint | None) -> None:
        """Continue from Ray Train's latest checkpoint, if any; evaluate the base model once."""
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                self.state = load_training_state(
                    Path(folder), self.model, self.optimizer, self.scheduler
                )
            self.state["resumed_from_step"] = self.state["step"]
            if self.ema is not None and self.state.get("ema"):
                self.ema.load_state_dict(self.state["ema"])
        if self.state["base_eval"] is None and self.settings.base_eval is not None:
            summary, rows = self.settings.base_eval
            summary = {**summary, "overall": {**summary["overall"], "seconds": 0.0}}
            self.state["base_eval"], self.state["base_eval_rows"] = summary, rows
        if self.state["base_eval"] is None:
            self.state["base_eval"], self.state["base_eval_rows"] = self.evaluate()

    def evaluate(self) -> tuple[dict, dict]:
        return evaluate_rows(
            self.model,
            self.eval_table,
            self.collective,
            self.settings.eval_micro_batch,
            self.tokenizer.pad_token_id,
        )

    def second_moment(self) -> torch.Tensor | None:
        if self.settings.selection.spec.preconditioner == "none":
            return None  # the ablation: raw gradient norms
        if self.ema is not None:
            return self.ema.value()
        return adam_second_moment(self.optimizer, self.head)

    def step(self) -> None:
        """One optimiser step on the schedule's next batch (this worker's share of its rows)."""
        step, selection, table = self.state["step"], self.settings.selection, self.table
        start = time.perf_counter()
        rows = self.schedule.rows(step)
        mine = list(range(self.collective.rank, len(rows), self.collective.world_size))
        weights = table.get("weight")
        stats = onpolicy_step(
            self.model,
            [(table["input_ids"][rows[k]], table["labels"][rows[k]]) for k in mine],
            mine,
            len(rows),
            selection,
            derive_rng(
                self.settings.seed, "online-select", selection.method, selection.alpha, step
            ),
            self.tokenizer.pad_token_id,
            micro_batch_size=self.settings.micro_batch_size,
            second_moment=self.second_moment(),
            lm_head_ema=self.ema,
            collective=self.collective,
            autocast=self.autocast,
            example_weights=None if weights is None else [weights[rows[k]] for k in mine],
            groups=[self.groups[r] for r in rows] if selection.spec.keep_mix else None,
        )
        grad_norm = self._apply(stats)
        elapsed = time.perf_counter() - start
        self._record(step, rows, stats, grad_norm, elapsed)
        self.state["step"] = step + 1
        every = self.train.checkpoint_every
        if self.state["step"] % every == 0 and self.state["step"] < self.settings.total_steps:
            self.report()

    def _apply(self, stats) -> float | None:
        """Clip and step the optimiser (a skipped step only advances the schedule)."""
        grad_norm = None
        if stats.skipped:
            self.state["skipped_steps"] = self.state.get("skipped_steps", 0) + 1
        else:
            if self.train.max_grad_norm:
                grad_norm = float(
                    torch.nn.utils.clip_grad_norm_(self.trainable, self.train.max_grad_norm)
                )
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _record(self, step: int, rows, stats, grad_norm: float | None, elapsed: float) -> None:
        state = self.state
        for key in COUNTERS:
            state["counters"][key] += getattr(stats, key)
        for key, value in {**stats.seconds, "step": elapsed}.items():
            state["step_seconds"][key] = state["step_seconds"].get(key, 0.0) + value
        state["history"].append(_history_entry(step, stats, self.scheduler, grad_norm, elapsed))
        if self.settings.selection.method != "full":
            kept = [self.table["id"][rows[i]] for i in stats.kept.tolist()]
            state["history"][-1]["kept_ids"] = kept

    def report(self, final_metrics: dict | None = None) -> None:
        """``ray.train.report`` with a checkpoint of the model and run state (rank 0 saves)."""
        metrics = {"step": self.state["step"], **(final_metrics or {})}
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if self.collective.rank == 0:
                self.state["ema"] = None if self.ema is None else self.ema.state_dict()
                save_training_state(
                    Path(folder), self.model, self.optimizer, self.scheduler, self.state
                )
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(
                metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step-{self.state['step']:06d}"
            )

    def finish(self) -> None:
        """Final evaluation, generation check and weight digests, reported with the last
        checkpoint."""
        final_eval, self.state["final_eval_rows"] = self.evaluate()
        generation = None
        if self.settings.generate_rows and self.collective.rank == 0:
            generation = generation_check(
                self.model,
                self.eval_table,
                self.settings.generate_rows,
                self.settings.generate_metrics,
                self.settings.max_new_tokens,
                self.tokenizer,
            )
        self.state["final_eval"] = final_eval
        self.state["generation"] = generation
        self.state["parameters"] = parameter_counts(self.model)
        self.state["frozen_weights_unchanged"] = _digest(self.frozen) == self.frozen_at_load
        self.state["trainable_digest_end"] = _digest(self.trainable)
        self.report({"eval_loss": final_eval["overall"]["loss"], "done": True})


def make_trainer(
    config: SlapConfig,
    train_table: dict,
    eval_table: dict,
    total_steps: int,
    storage_path: str,
    run_name: str,
    base_eval: tuple[dict, dict] | None = None,
) -> TorchTrainer:
    """The ``TorchTrainer`` of a run: scaling, storage, checkpoints and failure policy."""
    train, select = config.train, config.select
    online = select.mode == "online"
    selection = SelectionSettings(
        spec=select.spec() if online else SelectionSpec(method="full"),
        alpha=train.alpha if online else 0.0,
        eps=select.eps,
        projection_seed=derive_seed(config.seed, "projection"),
        vocab_chunk=config.score.vocab_chunk,
        onpolicy=select.onpolicy,
        score_micro_batch_size=config.score.micro_batch_size,
    )
    from slap_ray.assets import resolve_model_path

    settings = WorkerSettings(
        train=train,
        model_name=resolve_model_path(config.model.name),
        seed=derive_seed(config.seed if train.seed is None else train.seed, "train"),
        beta2=select.beta2,
        selection=selection,
        micro_batch_size=train.resolved_micro_batch_size(select.mode, select.onpolicy),
        total_steps=total_steps,
        train_ref=ray.put(train_table),
        eval_ref=ray.put(eval_table),
        eval_micro_batch=config.eval.micro_batch_size,
        generate_rows=config.eval.generate_rows,
        generate_metrics=dict(config.eval.generate_metrics),
        max_new_tokens=config.eval.max_new_tokens,
        base_eval=base_eval,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"settings": settings},
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker=dict(train.resources_per_worker),
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=train.num_checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=train.max_failures),
        ),
    )
