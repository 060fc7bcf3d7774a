"""report.md of a fine-tuning run: eval before/after, compute accounting, training-loss plot."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from slap_ray.config import SlapConfig  # noqa: E402
from slap_ray.names import GENERATION_ALL_ROWS, PLOTS_DIR, REPORT  # noqa: E402


def _loss_plot(history: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] + 1 for h in history]
    ax.plot(steps, [h["loss"] for h in history], label="trained objective (kept rows)")
    ax.plot(steps, [h["batch_loss"] for h in history], label="whole-batch mean loss", alpha=0.6)
    ax.set(xlabel="optimizer step", ylabel="mean response-token loss", title="Training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _eval_table(base: dict, final: dict) -> list[str]:
    lines = [
        "| rows | n | tokens | base loss | final loss | base ppl | final ppl |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key in final:
        b, f = base.get(key, {}), final[key]
        lines.append(
            f"| {key} | {f['rows']} | {f['tokens']} | {_fmt(b.get('loss'))} | {_fmt(f['loss'])} "
            f"| {_fmt(b.get('perplexity'), 2)} | {_fmt(f['perplexity'], 2)} |"
        )
    return lines


def _compute_lines(compute: dict, manifest: dict) -> list[str]:
    """Examples and tokens forwarded and back-propagated, FLOPs, step and phase times."""
    flops = compute["flops_estimate"]
    return [
        "",
        "## Compute",
        "",
        "| quantity | value |",
        "| --- | ---: |",
        f"| examples forwarded | {compute['forward_examples']} |",
        f"| examples back-propagated | {compute['backward_examples']} |",
        f"| tokens forwarded | {compute['forward_tokens']} |",
        f"| tokens back-propagated | {compute['backward_tokens']} |",
        f"| parameters forwarded through (N) | {compute['parameters']['forward']} |",
        f"| parameters trained | {compute['parameters']['trainable']} |",
        f"| estimated forward FLOPs | {flops['forward']:.3e} |",
        f"| estimated backward FLOPs | {flops['backward']:.3e} |",
        f"| estimated total FLOPs | {flops['total']:.3e} |",
        "",
        "Mean seconds per step: "
        + ", ".join(f"{k} {v}" for k, v in compute["mean_step_seconds"].items()),
        "",
        "## Wall time per phase (s)",
        "",
        "| phase | seconds |",
        "| --- | ---: |",
        *(f"| {k} | {v} |" for k, v in manifest.get("timings_s", {}).items()),
        "",
        "## Training loss",
        "",
        "![Training loss](plots/train_loss.png)",
        "",
    ]


def write_train_report(
    config: SlapConfig,
    metrics: dict,
    run_dir: Path,
    manifest: dict,
    selection_report: Path | None = None,
) -> Path:
    plots = run_dir / PLOTS_DIR
    plots.mkdir(exist_ok=True)
    _loss_plot(metrics["history"], plots / "train_loss.png")
    compute, train = metrics["compute"], config.train
    prepare = manifest["counts"].get("prepare", {})
    mode = config.select.mode
    what = (
        f"on-policy `{config.select.method}` at alpha {train.alpha:g} per batch of {train.batch_size}"
        if mode == "online"
        else f"offline selection ({prepare.get('train_origin')})"
    )
    lines = [
        "# SLAP fine-tuning report",
        "",
        f"Model `{config.model.name}`, {train.finetuning} fine-tuning, {what}; "
        f"{prepare.get('train_rows')} training rows, {compute['steps']} optimizer steps "
        f"on {train.num_workers} Ray Train worker(s); {prepare.get('eval_rows')} eval rows.",
        "",
    ]
    if selection_report is not None:
        lines += [f"Selection report: [{selection_report.name}]"
                  f"({os.path.relpath(selection_report, run_dir)})", ""]  # fmt: skip
    lines += ["## Held-out evaluation (response tokens only)", ""]
    lines += _eval_table(metrics["base_eval"], metrics["final_eval"])
    generation = metrics.get("generation")
    if generation:
        lines += ["", *_generation_lines(generation)]
    lines += _compute_lines(compute, manifest)
    path = run_dir / REPORT
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _generation_lines(generation: dict) -> list[str]:
    """The generation check: its score per group (a source, or the eval set's first rows)."""
    plain = {"metric": "rouge_l", "score": generation.get("rouge_l"), "rows": generation["rows"]}
    groups = generation.get("groups") or {GENERATION_ALL_ROWS: plain}  # an older metrics.json
    scores = "; ".join(
        f"{'first eval rows' if group == GENERATION_ALL_ROWS else group}: "
        f"{GENERATION_LABELS[e['metric']]} {_fmt(e['score'])} ({e['rows']} rows)"
        for group, e in groups.items()
    )
    return [f"Greedy generation on {generation['rows']} eval prompts: {scores}."]


GENERATION_LABELS = {"exact_match": "exact match", "chrf": "chrF", "rouge_l": "ROUGE-L F1"}
