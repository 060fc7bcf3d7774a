"""report.md with PNG plots for a selection run (pandas + matplotlib, no Ray)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from slap_ray.names import PLOTS_DIR, REPORT, keep_column  # noqa: E402


def _markdown_table(frame: pd.DataFrame) -> list[str]:
    header = "| " + " | ".join([frame.index.name or "", *map(str, frame.columns)]) + " |"
    rule = "| --- |" + " ---: |" * len(frame.columns)
    body = [
        "| " + " | ".join([str(i), *(f"{v:.3f}" for v in row)]) + " |"
        for i, row in frame.iterrows()
    ]
    return [header, rule, *body]


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


@dataclass
class SelectionSummary:
    """Small aggregates of a selection, all the report needs.

    ``groups``: one row per (cluster, source, task) with ``rows`` and a ``keep_a<alpha>`` count
    per alpha; ``loss_edges`` (B+1,) with ``loss_kept`` / ``loss_pruned`` (B,) histogram counts
    at the middle alpha.
    """

    groups: pd.DataFrame
    loss_edges: np.ndarray
    loss_kept: np.ndarray
    loss_pruned: np.ndarray


def scoring_cost(scoring_model: str, trained_model: str, alphas: list[float]) -> dict:
    """Scoring FLOPs as a fraction of the training FLOPs each alpha prunes (per epoch, full
    fine-tuning of ``trained_model``), or ``{"unknown": why}`` where a parameter count is
    unknown: a Hub id, or an alias not converted on this machine (counting never converts)."""
    from slap_ray.assets import parameter_count
    from slap_ray.core.training import scoring_cost_fraction

    scoring, trained = parameter_count(scoring_model), parameter_count(trained_model)
    if not scoring or not trained:
        unknown = {"score.model": scoring_model} if not scoring else {}
        unknown |= {"model.name": trained_model} if not trained else {}
        if scoring_model == trained_model:
            unknown = {"model.name": trained_model}  # score.model unset: one model to name
        names = " and ".join(f"{key} `{name}`" for key, name in unknown.items())
        return {"unknown": f"{names} not converted on this machine yet (or not a local folder)"}
    return {
        "scoring_parameters": scoring,
        "trained_parameters": trained,
        "fraction_per_alpha": {
            f"{a:g}": scoring_cost_fraction(scoring, trained, a) for a in alphas if a > 0
        },
    }


def scoring_cost_lines(scoring_model: str | None, cost: dict | None) -> list[str]:
    """The report's scoring-cost sentence; it says why where the cost is unknown."""
    if not cost:
        return []
    if "unknown" in cost:
        return ["", f"Scoring cost: unknown: {cost['unknown']}."]
    shares = ", ".join(f"alpha {a}: {f:.1%}" for a, f in cost["fraction_per_alpha"].items())
    if not shares:  # alpha 0 only: nothing pruned, nothing to weigh the scoring against
        return [
            "",
            f"Scoring cost (`{scoring_model}`): alpha 0 prunes no training to set it against.",
        ]
    return [
        "",
        f"Scoring cost (`{scoring_model}`, {cost['scoring_parameters']:,} parameters) as a "
        f"share of the training it prunes (one epoch of full fine-tuning of "
        f"{cost['trained_parameters']:,} parameters, FLOPs model): {shares}.",
    ]


def _selection_plots(summary: SelectionSummary, alphas: list[float], plots: Path):
    """The report's images (title, path) and its kept-fraction tables per source and task."""
    groups = summary.groups
    images: list[tuple[str, str]] = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    groups.groupby("cluster")["rows"].sum().sort_index().plot.bar(ax=ax, color="#4c72b0")
    ax.set(xlabel="cluster", ylabel="rows", title="Distribution strata (clusters)")
    images.append(("Cluster sizes", "plots/" + _save(fig, plots / "cluster_sizes.png")))

    middle = alphas[len(alphas) // 2]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    widths = np.diff(summary.loss_edges)
    left = summary.loss_edges[:-1]
    ax.bar(left, summary.loss_kept, widths, align="edge", label="kept", color="#55a868")
    ax.bar(
        left, summary.loss_pruned, widths, bottom=summary.loss_kept, align="edge",
        label="pruned", color="#c44e52",
    )  # fmt: skip
    title = f"Loss, kept vs pruned (alpha={middle:g})"
    ax.set(xlabel="mean response-token loss", ylabel="rows", title=title)
    ax.legend()
    images.append(("Loss histogram", "plots/" + _save(fig, plots / "loss_kept_vs_pruned.png")))

    tables = []
    for group in ("source", "task"):
        by = groups.groupby(group)
        fractions = pd.DataFrame(
            {f"alpha={a:g}": by[keep_column(a)].sum() / by["rows"].sum() for a in alphas}
        )
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(fractions) + 1.8))
        fractions.plot.barh(ax=ax)
        ax.set(xlabel="kept fraction", title=f"Kept fraction per {group}")
        image = "plots/" + _save(fig, plots / f"kept_per_{group}.png")
        images.append((f"Kept fraction per {group}", image))
        tables.append((group, fractions))
    return images, tables


def _summary_lines(groups: pd.DataFrame, alphas: list[float], manifest: dict) -> list[str]:
    """The report's opening: rows read, scored, rejected, cut; warnings; kept per alpha."""
    counts = manifest.get("counts", {})
    output, cut = counts.get("output", {}), counts.get("tokenize", {})
    lines = [
        "# SLAP selection report",
        "",
        f"Method `{manifest.get('method')}`, alphas {', '.join(f'{a:g}' for a in alphas)}; "
        f"{output.get('rows', 0)} input rows: {output.get('scored', 0)} "
        f"scored, {output.get('rejected', 0)} rejected (rejected.jsonl), "
        f"{output.get('not_sampled', 0)} not sampled (data.max_rows); "
        f"{cut.get('truncated_rows', 0)} cut to data.max_length "
        f"({cut.get('truncated_tokens', 0)} tokens dropped).",
        "",
    ]
    if manifest.get("warnings"):
        lines += ["## Warnings", "", *(f"- {w}" for w in manifest["warnings"]), ""]
    lines += ["| alpha (pruned) | kept rows | kept fraction |", "| ---: | ---: | ---: |"]
    scored = int(groups["rows"].sum())
    for alpha in alphas:
        n = int(groups[keep_column(alpha)].sum())
        lines.append(f"| {alpha:g} | {n} | {n / max(scored, 1):.3f} |")
    return lines


def write_selection_report(
    summary: SelectionSummary, alphas: list[float], run_dir: Path, manifest: dict
) -> Path:
    """Plots (cluster sizes, loss kept vs pruned, kept fraction per source/task) and report.md."""
    plots = run_dir / PLOTS_DIR
    plots.mkdir(exist_ok=True)
    images, tables = _selection_plots(summary, alphas, plots)
    lines = _summary_lines(summary.groups, alphas, manifest)
    lines += scoring_cost_lines(manifest.get("scoring_model"), manifest.get("scoring_cost"))
    lines += ["", "## Stage timings (s)", "", "| stage | seconds |", "| --- | ---: |"]
    lines += [f"| {k} | {v} |" for k, v in manifest.get("timings_s", {}).items()]
    counts = manifest.get("counts", {})
    lines += ["", "## Row counts", "", "```", *(f"{k}: {v}" for k, v in counts.items()), "```", ""]
    for title, image in images:
        lines += [f"## {title}", "", f"![{title}]({image})", ""]
    for group, fractions in tables:
        lines += [f"## Kept fraction per {group}", "", *_markdown_table(fractions), ""]
    path = run_dir / REPORT
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
