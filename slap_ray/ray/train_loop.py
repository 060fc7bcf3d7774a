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
from dataclasses import asdict
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
from slap_ray.core.evaluation import (
    example_loss_sums,
    greedy_generate,
    last_response_split,
    rouge_l,
    summarize_losses,
)
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

COUNTERS = ("forward_examples", "forward_tokens", "backward_examples", "backward_tokens")


def _evaluate(model, table: dict, collective, micro_batch_size: int, pad_token_id: int) -> dict:
    """Loss / perplexity of the eval rows, sharded over workers, identical result on each."""
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
    return summary


def _generation_eval(model, table: dict, rows: int, max_new_tokens: int, tokenizer) -> dict:
    scores, samples = [], []
    model.eval()
    for i in range(min(rows, len(table["id"]))):
        prompt, reference = last_response_split(table["input_ids"][i], table["labels"][i])
        new = greedy_generate(model, prompt, max_new_tokens, tokenizer.eos_token_id)
        reference_text = tokenizer.decode(reference, skip_special_tokens=True)
        text = tokenizer.decode(new, skip_special_tokens=True)
        scores.append(rouge_l(text, reference_text))
        samples.append({"id": table["id"][i], "generated": text, "reference": reference_text})
    model.train()
    return {
        "rouge_l": float(np.mean(scores)) if scores else None,
        "rows": len(scores),
        "samples": samples[:5],
    }


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


def train_loop_per_worker(settings: dict[str, Any]) -> None:
    """One data-parallel worker. ``settings``: see ``make_trainer``."""
    from slap_ray.assets import load_tokenizer

    train = TrainConfig.model_validate(settings["train"])
    torch.set_num_threads(train.torch_threads)
    context = ray.train.get_context()
    collective = TorchDistributed() if context.get_world_size() > 1 else SingleProcess()
    device_for(train.use_gpu, "train.use_gpu")  # a granted GPU torch cannot use is an error
    device = str(ray.train.torch.get_device()) if train.use_gpu else "cpu"
    table, eval_table = ray.get(settings["train_ref"]), ray.get(settings["eval_ref"])
    tokenizer = load_tokenizer(settings["model_name"])
    pad = tokenizer.pad_token_id
    # Adapter initialisation is random: seed it, identically on every worker.
    torch.manual_seed(derive_seed(settings["seed"], "init") % 2**63)
    model = build_model(settings["model_name"], train, device)
    optimizer = make_optimizer(
        model, train.learning_rate, train.adam_betas, train.adam_eps, train.weight_decay
    )
    steps = settings["total_steps"]
    scheduler = warmup_cosine(optimizer, steps, train.warmup_ratio)
    ema = None if lm_head_is_trained(model) else SecondMomentEMA(settings["beta2"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    frozen_at_load = _digest(frozen)
    selection = SelectionSettings(**settings["selection"])
    state: dict[str, Any] = {
        "step": 0,
        "history": [],
        "counters": dict.fromkeys(COUNTERS, 0),
        "base_eval": None,
        "ema": None,
        "resumed_from_step": None,
        "step_seconds": {},
        "trainable_digest_start": _digest(trainable),
    }
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_training_state(Path(folder), model, optimizer, scheduler)
        state["resumed_from_step"] = state["step"]
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
    if state["base_eval"] is None:
        state["base_eval"] = _evaluate(
            model, eval_table, collective, settings["eval_micro_batch"], pad
        )
    schedule = BatchSchedule(table["id"], train.batch_size, settings["seed"])
    autocast = _autocast(train.precision, device)
    micro = settings["micro_batch_size"]
    head = lm_head_of(model)

    def moment() -> torch.Tensor | None:
        if selection.preconditioner == "none":
            return None  # the ablation: raw gradient norms
        return ema.value() if ema is not None else adam_second_moment(optimizer, head)

    def report(final_metrics: dict | None = None) -> None:
        metrics = {"step": state["step"], **(final_metrics or {})}
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if collective.rank == 0:
                state["ema"] = None if ema is None else ema.state_dict()
                save_training_state(Path(folder), model, optimizer, scheduler, state)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(
                metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step-{state['step']:06d}"
            )

    while state["step"] < steps:
        step = state["step"]
        start = time.perf_counter()
        rows = schedule.rows(step)
        mine = list(range(collective.rank, len(rows), collective.world_size))
        weights = table.get("weight")
        stats = onpolicy_step(
            model,
            [(table["input_ids"][rows[k]], table["labels"][rows[k]]) for k in mine],
            mine,
            len(rows),
            selection,
            derive_rng(settings["seed"], "online-select", selection.method, selection.alpha, step),
            pad,
            micro_batch_size=micro,
            second_moment=moment(),
            lm_head_ema=ema,
            collective=collective,
            autocast=autocast,
            example_weights=None if weights is None else [weights[rows[k]] for k in mine],
        )
        grad_norm = None
        if stats.skipped:
            state["skipped_steps"] = state.get("skipped_steps", 0) + 1
        else:
            if train.max_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, train.max_grad_norm))
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for key in COUNTERS:
            state["counters"][key] += getattr(stats, key)
        elapsed = time.perf_counter() - start
        for key, value in {**stats.seconds, "step": elapsed}.items():
            state["step_seconds"][key] = state["step_seconds"].get(key, 0.0) + value
        state["history"].append(_history_entry(step, stats, scheduler, grad_norm, elapsed))
        if selection.method != "full":
            state["history"][-1]["kept_ids"] = [table["id"][rows[i]] for i in stats.kept.tolist()]
        state["step"] = step + 1
        if state["step"] % train.checkpoint_every == 0 and state["step"] < steps:
            report()

    final_eval = _evaluate(model, eval_table, collective, settings["eval_micro_batch"], pad)
    generation = None
    if settings["generate_rows"] and collective.rank == 0:
        generation = _generation_eval(
            model, eval_table, settings["generate_rows"], settings["max_new_tokens"], tokenizer
        )
    state["final_eval"] = final_eval
    state["generation"] = generation
    state["parameters"] = parameter_counts(model)
    state["frozen_weights_unchanged"] = _digest(frozen) == frozen_at_load
    state["trainable_digest_end"] = _digest(trainable)
    report({"eval_loss": final_eval["overall"]["loss"], "done": True})


def make_trainer(
    config: SlapConfig,
    train_table: dict,
    eval_table: dict,
    total_steps: int,
    storage_path: str,
    run_name: str,
) -> TorchTrainer:
    """The ``TorchTrainer`` of a run: scaling, storage, checkpoints and failure policy."""
    train, select = config.train, config.select
    online = select.mode == "online"
    selection = SelectionSettings(
        method=select.method if online else "full",
        alpha=train.alpha if online else 0.0,
        num_strata=select.num_strata,
        tau=select.tau,
        strata=select.strata,
        eps=select.eps,
        projection_dim=select.projection_dim,
        projection_seed=derive_seed(config.seed, "projection"),
        vocab_chunk=config.score.vocab_chunk,
        preconditioner=select.preconditioner,
        onpolicy=select.onpolicy,
        score_micro_batch_size=config.score.micro_batch_size,
    )
    from slap_ray.assets import resolve_model_path

    settings = {
        "train": train.model_dump(mode="json"),
        "model_name": resolve_model_path(config.model.name),
        "seed": derive_seed(config.seed if train.seed is None else train.seed, "train"),
        "beta2": select.beta2,
        "selection": asdict(selection),
        "micro_batch_size": train.resolved_micro_batch_size(select.mode, select.onpolicy),
        "total_steps": total_steps,
        "train_ref": ray.put(train_table),
        "eval_ref": ray.put(eval_table),
        "eval_micro_batch": config.eval.micro_batch_size,
        "generate_rows": config.eval.generate_rows,
        "max_new_tokens": config.eval.max_new_tokens,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=settings,
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
