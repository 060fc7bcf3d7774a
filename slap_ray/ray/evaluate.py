"""Ray: scoring a saved model on held-out rows, as one task on the cluster (a GPU when
``train.use_gpu``), with the same evaluation and generation check as the fine-tuning loop."""

from __future__ import annotations

from pathlib import Path

import ray

from slap_ray.config import SlapConfig


def evaluate_saved(config: SlapConfig, model_dir: Path, evaluation: dict) -> dict:
    """``{"eval": summary, "eval_rows": {loss_sum, tokens}, "generation": ... or None}`` for the
    saved model in ``model_dir`` (a run's ``model/``) over the tokenised ``evaluation`` table."""
    train = config.train
    task = ray.remote(_evaluate_task).options(
        num_cpus=train.torch_threads, num_gpus=1 if train.use_gpu else 0
    )
    return ray.get(task.remote(config, str(model_dir), evaluation))


def _evaluate_task(config: SlapConfig, model_dir: str, evaluation: dict) -> dict:
    import torch

    from slap_ray.assets import load_saved_model, load_tokenizer
    from slap_ray.core.evaluation import evaluate_rows, generation_check
    from slap_ray.core.model import device_for
    from slap_ray.core.onpolicy import SingleProcess

    torch.set_num_threads(config.train.torch_threads)
    device = device_for(config.train.use_gpu, "train.use_gpu")
    tokenizer = load_tokenizer(config.model.name)
    model = load_saved_model(config.model.name, model_dir).to(device)
    e = config.eval
    summary, rows = evaluate_rows(
        model, evaluation, SingleProcess(), e.micro_batch_size, tokenizer.pad_token_id
    )
    generation = None
    if e.generate_rows:
        generation = generation_check(
            model, evaluation, e.generate_rows, e.generate_metrics, e.max_new_tokens, tokenizer
        )
    return {"eval": summary, "eval_rows": rows, "generation": generation}
