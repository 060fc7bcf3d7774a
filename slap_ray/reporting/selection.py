"""report.md with PNG plots for a selection run (pandas + matplotlib, no Ray)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def keep_column(alpha: float) -> str:
    return f"keep_a{alpha:g}"


def weight_column(alpha: float) -> str:
    """A row's training weight at ``alpha`` (0 where pruned, InfoBatch's 1 / (1 - r), else 1)."""
    return f"weight_a{alpha:g}"


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


def write_selection_report(
    scores: pd.DataFrame, alphas: list[float], run_dir: Path, manifest: dict
) -> Path:
    """Plots (cluster sizes, loss kept vs pruned, kept fraction per source/task) and report.md."""
    scored = scores[scores["loss"].notna()]
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    images: list[tuple[str, str]] = []

    fig, ax = plt.subplots(figsize=(6, 3.5))
    scored["cluster"].value_counts().sort_index().plot.bar(ax=ax, color="#4c72b0")
    ax.set(xlabel="cluster", ylabel="rows", title="Distribution strata (k-means clusters)")
    images.append(("Cluster sizes", "plots/" + _save(fig, plots / "cluster_sizes.png")))

    middle = alphas[len(alphas) // 2]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    kept = scored[keep_column(middle)].astype(bool)
    ax.hist(
        [scored.loc[kept, "loss"], scored.loc[~kept, "loss"]],
        bins=40,
        stacked=True,
        label=["kept", "pruned"],
        color=["#55a868", "#c44e52"],
    )
    ax.set(
        xlabel="mean response-token loss",
        ylabel="rows",
        title=f"Loss, kept vs pruned (alpha={middle:g})",
    )
    ax.legend()
    images.append(("Loss histogram", "plots/" + _save(fig, plots / "loss_kept_vs_pruned.png")))

    tables = []
    for group in ("source", "task"):
        fractions = pd.DataFrame(
            {f"alpha={a:g}": scored.groupby(group)[keep_column(a)].mean() for a in alphas}
        )
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(fractions) + 1.8))
        fractions.plot.barh(ax=ax)
        ax.set(xlabel="kept fraction", title=f"Kept fraction per {group}")
        images.append(
            (f"Kept fraction per {group}", "plots/" + _save(fig, plots / f"kept_per_{group}.png"))
        )
        tables.append((group, fractions))

    counts = manifest.get("counts", {})
    output = counts.get("output", {})
    lines = [
        "# SLAP selection report",
        "",
        f"Method `{manifest.get('method')}`, alphas {', '.join(f'{a:g}' for a in alphas)}; "
        f"{output.get('rows', len(scores))} input rows: {output.get('scored', len(scored))} "
        f"scored, {output.get('rejected', 0)} rejected (rejected.jsonl), "
        f"{output.get('not_sampled', 0)} not sampled (data.max_rows).",
        "",
    ]
    if manifest.get("warnings"):
        lines += ["## Warnings", "", *(f"- {w}" for w in manifest["warnings"]), ""]
    lines += [
        "| alpha | kept rows | kept fraction |",
        "| ---: | ---: | ---: |",
    ]
    for alpha in alphas:
        n = int(scored[keep_column(alpha)].sum())
        lines.append(f"| {alpha:g} | {n} | {n / max(len(scored), 1):.3f} |")
    lines += ["", "## Stage timings (s)", "", "| stage | seconds |", "| --- | ---: |"]
    lines += [f"| {k} | {v} |" for k, v in manifest.get("timings_s", {}).items()]
    lines += ["", "## Row counts", "", "```", *(f"{k}: {v}" for k, v in counts.items()), "```", ""]
    for title, image in images:
        lines += [f"## {title}", "", f"![{title}]({image})", ""]
    for group, fractions in tables:
        lines += [f"## Kept fraction per {group}", "", *_markdown_table(fractions), ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
