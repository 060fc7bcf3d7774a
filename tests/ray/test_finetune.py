"""Ray Train fine-tuning with the tiny model and 2 CPU workers: on-policy LoRA, resume after a
kill, and the saved adapter reloaded outside Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from recording import assert_matches_recording

from slap_ray.config import build_config
from slap_ray.core.selection import n_keep_for
from slap_ray.jobs.finetune import run_finetune

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]


def train_config(pool: Path, shared: Path, out: Path, *overrides: str):
    return build_config(
        {
            "output_dir": str(out),
            "progress": False,
            "data": {"paths": [str(pool / "*.jsonl")], "max_length": 96, "max_rows": 60},
            "model": {"name": "tiny-bpe"},
            "select": {"mode": "online", "method": "slap"},
            "train": {
                "alpha": 0.3,
                "batch_size": 10,
                "learning_rate": 0.01,
                "epochs": 2,
                "num_workers": 2,
                "checkpoint_every": 4,
            },
            "eval": {"paths": [str(shared / "eval" / "*.jsonl")], "max_rows": 32},
        },
        list(overrides),
    )


@pytest.fixture(scope="module")
def online_run(ray_cluster, pool_subset, shared_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("online")
    run_finetune(train_config(pool_subset, shared_data, out))
    return out


def load(run: Path, name: str) -> dict:
    return json.loads((run / name).read_text())


def test_online_lora_two_workers_trains_adapters_only_and_lowers_eval_loss(online_run):
    metrics, manifest = load(online_run, "metrics.json"), load(online_run, "manifest.json")
    history = metrics["history"]
    assert [h["step"] for h in history] == list(range(12))  # 60 rows / B=10, 2 epochs
    for h in history:
        # Counted by the training loop (summed over both workers), not taken from the config.
        assert h["batch_size"] == 10 and h["backward_examples"] == n_keep_for(10, 0.3) == 7
        assert len(h["kept_ids"]) == 7 and np.isfinite(h["loss"])
    compute = metrics["compute"]
    assert compute["forward_examples"] == 120 and compute["backward_examples"] == 84
    assert compute["backward_tokens"] < compute["forward_tokens"]
    assert compute["flops_estimate"]["total"] > 0
    train = manifest["counts"]["train"]
    assert train["frozen_weights_unchanged"] is True and train["frozen_parameters"] > 0
    assert train["trainable_weights_changed"] is True
    base, final = metrics["base_eval"]["overall"], metrics["final_eval"]["overall"]
    assert np.isfinite(final["loss"]) and final["loss"] < base["loss"]
    assert set(metrics["final_eval"]) >= {"overall", "source=gsm8k", "task=math"}
    report = (online_run / "report.md").read_text()
    assert "Held-out evaluation" in report and "tokens back-propagated" in report
    assert (online_run / "plots" / "train_loss.png").stat().st_size > 0


def test_onpolicy_kept_ids_equal_the_recording(online_run):
    """On-policy SLAP on two workers: the rows each step kept, in the order the step kept them."""
    history = load(online_run, "metrics.json")["history"]
    kept = {f"step-{h['step']}": list(h["kept_ids"]) for h in history}
    assert_matches_recording("on-policy finetune (slap, 2 workers)", kept)


def test_recompute_mode_selects_like_kept_graphs_through_ray_train(
    online_run, pool_subset, shared_data, tmp_path
):
    """select.onpolicy=recompute on two Ray Train workers: the first step keeps the rows the
    kept-graphs run kept (same model state), every kept row is forwarded a second time and
    counted, and training follows the same course."""
    run_finetune(
        train_config(
            pool_subset,
            shared_data,
            tmp_path,
            "select.onpolicy=recompute",
            "score.micro_batch_size=5",
        )  # fmt: skip
    )
    ours, reference = load(tmp_path, "metrics.json"), load(online_run, "metrics.json")
    assert ours["history"][0]["kept_ids"] == reference["history"][0]["kept_ids"]
    assert [h["backward_examples"] for h in ours["history"]] == [7] * 12
    compute = ours["compute"]
    assert compute["forward_examples"] == 120 + 84 and compute["backward_examples"] == 84
    final = ours["final_eval"]["overall"]["loss"]
    assert final == pytest.approx(reference["final_eval"]["overall"]["loss"], rel=1e-2)


def test_saved_adapter_loads_outside_ray_with_the_same_eval_loss(online_run, shared_data):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slap_ray.assets import resolve_model_path
    from slap_ray.core.evaluation import example_loss_sums
    from slap_ray.data.tokenize import tokenize_conversation

    adapter = load_file(online_run / "model" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-bpe"))
    model = PeftModel.from_pretrained(base, str(online_run / "model")).eval()
    tokenizer = AutoTokenizer.from_pretrained(online_run / "model")
    metrics = load(online_run, "metrics.json")
    wanted = set(metrics["eval_ids"])
    rows = {}
    for path in sorted((shared_data / "eval").glob("*.jsonl")):
        for line in path.open(encoding="utf-8"):
            record = json.loads(line)
            if record["id"] in wanted:
                rows[record["id"]] = tokenize_conversation(record["messages"], tokenizer, 96)
    examples = [rows[i] for i in metrics["eval_ids"]]
    sums, tokens = example_loss_sums(
        model, [e.input_ids for e in examples], [e.labels for e in examples], 0
    )
    expected = metrics["final_eval"]["overall"]["loss"]
    assert abs(sums.sum() / tokens.sum() - expected) < 1e-4 * expected


def test_slap_evaluate_rescores_the_saved_adapter_without_training(online_run, tmp_path):
    """`slap evaluate` from the run's own config.yaml: the same held-out rows, token counts and
    per-row losses as the run's final evaluation (which two workers computed, sharded), and the
    generation check when asked for: a saved model re-scored without training again."""
    from slap_ray.config import load_config
    from slap_ray.jobs.evaluate import run_evaluate

    overrides = [
        f"output_dir={tmp_path / 'rescored'}", f"eval.model_dir={online_run / 'model'}",
        "eval.generate_rows=1", "eval.generate_metrics={gsm8k: exact_match}",
        "eval.max_new_tokens=4",
    ]  # fmt: skip
    path = run_evaluate(load_config([str(online_run / "config.yaml")], overrides))
    ours, trained = json.loads(path.read_text()), load(online_run, "metrics.json")
    assert ours["eval_ids"] == trained["eval_ids"]
    assert ours["eval_rows"]["tokens"] == trained["eval_rows"]["tokens"]
    np.testing.assert_allclose(
        ours["eval_rows"]["final_loss_sum"], trained["eval_rows"]["final_loss_sum"], rtol=1e-4
    )
    for key, entry in trained["final_eval"].items():
        assert ours["final_eval"][key]["loss"] == pytest.approx(entry["loss"], rel=1e-4), key
    (gsm8k,) = ours["generation"]["groups"].values()
    assert gsm8k["metric"] == "exact_match" and gsm8k["rows"] == 1
    manifest = load(tmp_path / "rescored", "manifest.json")
    assert manifest["model_dir"] == str((online_run / "model").resolve())
    assert manifest["counts"]["prepare"]["eval_rows"] == len(trained["eval_ids"])


def registered_checkpoint(storage: Path) -> str:
    """The latest checkpoint Ray Train has registered (its run snapshot, written once a
    reported checkpoint is persisted), or "". A checkpoint folder alone is not resumable: the
    kill can land between writing it and registering it."""
    try:
        snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return ""
    return (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name", "")


def test_killed_run_resumes_from_its_checkpoint(
    online_run, pool_subset, shared_data, tmp_path, kill_job
):
    out = tmp_path / "run"
    config = train_config(pool_subset, shared_data, out, "train.checkpoint_every=1")
    storage = out / "ray_train" / "finetune"
    kill_job(
        "finetune.py", config, tmp_path, lambda: registered_checkpoint(storage) >= "step-000002",
        "checkpoint step-000002 registered", timeout_s=300,
    )  # fmt: skip
    assert not (out / "metrics.json").exists()

    run_finetune(config.model_copy(update={"resume": True}))
    manifest, metrics = load(out, "manifest.json"), load(out, "metrics.json")
    resumed = manifest["counts"]["train"]["resumed_from_step"]
    assert resumed is not None and 1 <= resumed < 12
    assert [h["step"] for h in metrics["history"]] == list(range(12))
    # Same data order, seeds and restored optimizer state: the uninterrupted run's result.
    reference = load(online_run, "metrics.json")
    assert [h["kept_ids"] for h in metrics["history"]] == [
        h["kept_ids"] for h in reference["history"]
    ]
    final, expected = metrics["final_eval"]["overall"]["loss"], reference["final_eval"]
    assert abs(final - expected["overall"]["loss"]) < 1e-4
