"""Results of `slap sweep`: results.csv (one row per trial), results.md (mean +- std over seeds,
paired differences against random with bootstrap intervals, the full-data reference) and plots.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from slap_ray.config import SlapConfig  # noqa: E402
from slap_ray.files import atomic_path, write_text_atomic  # noqa: E402
from slap_ray.names import (  # noqa: E402
    FULL_ARM,
    GENERATION_ALL_ROWS,
    MANIFEST,
    METRICS,
    PLOTS_DIR,
    trial_name,
)
from slap_ray.reporting.intervals import (  # noqa: E402
    PRIMARY,
    PairedRows,
    bootstrap_interval,
    hierarchical_interval,
    t_interval,
)
from slap_ray.selection_spec import SelectionSpec  # noqa: E402
from slap_ray.vocabulary import GENERATION_METRICS  # noqa: E402

KEYS = ["arm", "method", "mode", "alpha", "seed"]
OPTIONS = [name for name in SelectionSpec.model_fields if name != "method"]
FULL = FULL_ARM
BASELINE = "random"


def trial_row(spec: dict, metrics: dict, manifest: dict) -> dict:
    """One trial as a flat row: parameters, eval losses, compute, wall time per phase."""
    final, base = metrics["final_eval"], metrics["base_eval"]
    compute = metrics["compute"]
    row = {k: spec.get(k) for k in KEYS + OPTIONS}
    row["kept_fraction"] = 1.0 - spec["alpha"]
    row["eval_loss"] = final["overall"]["loss"]
    row["base_eval_loss"] = base["overall"]["loss"]
    for group, values in final.items():
        if group != "overall":
            row[f"eval_loss[{group}]"] = values["loss"]
    for group, values in ((metrics.get("generation") or {}).get("groups") or {}).items():
        row[generation_column(values["metric"], group)] = values["score"]
    prepare = manifest["counts"].get("prepare", {})
    row["train_rows"] = prepare.get("train_rows")
    row["steps"] = compute["steps"]
    for key in ("forward_examples", "forward_tokens", "backward_examples", "backward_tokens"):
        row[key] = compute[key]
    for key, value in compute["flops_estimate"].items():
        row[f"flops_{key}"] = value
    for key, value in manifest.get("timings_s", {}).items():
        row[f"seconds_{key}"] = value
    return row


def add_macro(frame: pd.DataFrame) -> pd.DataFrame:
    """``macro_loss``: each trial's per-source losses averaged with equal weight (the second
    primary metric; from the ``eval_loss[source=...]`` columns, so any results.csv has it)."""
    sources = [c for c in frame.columns if c.startswith("eval_loss[source=")]
    frame = frame.copy()
    frame["macro_loss"] = frame[sources].mean(axis=1) if sources else np.nan
    return frame


def _fmt(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _paired(frame: pd.DataFrame, group: pd.DataFrame, metric: str) -> pd.Series:
    """Per seed: the arm's metric minus random's at the same mode and alpha."""
    mode, alpha = group["mode"].iloc[0], group["alpha"].iloc[0]
    random = frame[(frame["method"] == BASELINE) & (frame["mode"] == mode)]
    random = random[random["alpha"] == alpha].drop_duplicates("seed").set_index("seed")[metric]
    return group.set_index("seed")[metric].sub(random).dropna()


def _versus_random(frame, group, samples, row_pairs) -> dict:
    """Paired differences against random on both primary metrics, with three intervals."""
    entry: dict = {}
    hierarchical = hierarchical_interval(row_pairs, samples) if row_pairs else {}
    for metric in PRIMARY:
        paired = _paired(frame, group, metric)
        if not len(paired):
            continue
        entry[f"{metric}_vs_random"] = paired.mean()
        entry[f"{metric}_t"] = t_interval(paired.to_numpy())
        entry[f"{metric}_bootstrap"] = bootstrap_interval(paired.to_numpy(), samples)
        entry[f"{metric}_rows"] = hierarchical.get(metric, (np.nan, np.nan))
    if entry:
        entry["beats_random"] = all(
            np.isfinite(entry[f"{m}_{kind}"][1]) and entry[f"{m}_{kind}"][1] < 0
            for m in PRIMARY
            for kind in (("rows",) if row_pairs else ("t",))
        )
    return entry


def summary_table(
    frame: pd.DataFrame, samples: int, rows_of: Callable[[pd.Series], dict | None] | None = None
) -> pd.DataFrame:
    """Per (arm, mode, alpha): mean and std over seeds of both primary metrics, trained rows
    and tokens, the paired differences against random at the same (mode, alpha, seed) with
    their intervals (``rows_of`` gives a trial's held-out rows, for the row-level interval),
    and the gap to full data."""
    frame = add_macro(frame) if "macro_loss" not in frame else frame
    full = frame[frame["arm"] == FULL].set_index("seed")["eval_loss"]
    rows = []
    for (arm, mode, alpha), group in frame.groupby(["arm", "mode", "alpha"], sort=True):
        entry = {"arm": arm, "mode": mode, "alpha": alpha, "seeds": len(group)}
        for metric in PRIMARY:
            entry[f"{metric}_mean"] = group[metric].mean()
            entry[f"{metric}_std"] = group[metric].std(ddof=1) if len(group) > 1 else np.nan
        for column in ("flops_total", "flops_with_selection", "train_rows", "backward_tokens"):
            entry[f"{column}_mean"] = group[column].mean() if column in group else np.nan
        if group["method"].iloc[0] not in (BASELINE, FULL):
            pairs = _row_pairs(frame, group, rows_of) if rows_of else []
            entry.update(_versus_random(frame, group, samples, pairs))
        gap = group.set_index("seed")["eval_loss"].sub(full).dropna()
        if arm != FULL and len(gap):
            entry["vs_full_pct"] = 100.0 * (gap / full.reindex(gap.index)).mean()
        rows.append(entry)
    return pd.DataFrame(rows)


def _row_pairs(frame, group, rows_of) -> list[PairedRows]:
    """Each seed's (arm, random) held-out rows, where both trials kept them and agree on them."""
    mode, alpha = group["mode"].iloc[0], group["alpha"].iloc[0]
    random = frame[(frame["method"] == BASELINE) & (frame["mode"] == mode)]
    random = random[random["alpha"] == alpha].drop_duplicates("seed")
    random_of = {int(r["seed"]): r for _, r in random.iterrows()}
    pairs = []
    for _, trial in group.iterrows():
        if int(trial["seed"]) not in random_of:
            continue
        mine, theirs = rows_of(trial), rows_of(random_of[int(trial["seed"])])
        if not mine or not theirs or mine["ids"] != theirs["ids"]:
            return []  # an interval over part of the seeds would mislead: none
        pairs.append(
            PairedRows(
                arm=np.asarray(mine["final_loss_sum"]),
                random=np.asarray(theirs["final_loss_sum"]),
                tokens=np.asarray(mine["tokens"]),
                sources=np.asarray(mine["source"]),
            )  # fmt: skip
        )
    return pairs


def _interval(entry: pd.Series, metric: str) -> str:
    value = entry.get(f"{metric}_vs_random", np.nan)
    if not isinstance(value, float) or not np.isfinite(value):
        return "-"
    kind = "rows" if np.isfinite(entry[f"{metric}_rows"][0]) else "t"
    low, high = entry[f"{metric}_{kind}"]
    return f"{value:+.4f} [{_fmt(low)}, {_fmt(high)}]"


def _markdown(summary: pd.DataFrame, frame: pd.DataFrame) -> list[str]:
    lines = [
        "| arm | mode | alpha (pruned) | seeds | eval loss (token-weighted) | macro loss (per source) "
        "| eval vs random | macro vs random | beats random | trained rows | trained tokens "
        "| vs full | FLOPs (training + selection) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for _, r in summary.iterrows():
        full_gap = r.get("vs_full_pct", np.nan)
        beats = r.get("beats_random")
        lines.append(
            f"| {r['arm']} | {r['mode']} | {r['alpha']:g} | {r['seeds']} "
            f"| {_fmt(r['eval_loss_mean'])} +- {_fmt(r['eval_loss_std'])} "
            f"| {_fmt(r['macro_loss_mean'])} +- {_fmt(r['macro_loss_std'])} "
            f"| {_interval(r, 'eval_loss')} | {_interval(r, 'macro_loss')} "
            f"| {'-' if not isinstance(beats, bool) else ('**yes**' if beats else 'no')} "
            f"| {_fmt(r['train_rows_mean'], 1)} | {_fmt(r['backward_tokens_mean'], 0)} "
            f"| {'-' if not np.isfinite(full_gap) else f'{full_gap:+.2f}%'} "
            f"| {r['flops_with_selection_mean']:.3g} |"
        )
    lines += ["", *answer_lines(summary)]
    return lines


def answer_lines(summary: pd.DataFrame) -> list[str]:
    """The answer in a few lines: per (mode, alpha), the best arm on each primary metric with
    its paired interval against random (what the console prints last)."""
    lines = ["Best arm per alpha (lowest mean; paired difference to random, 95% interval):"]
    chosen = summary[summary["arm"] != FULL]
    for (mode, alpha), group in chosen.groupby(["mode", "alpha"]):
        for metric, title in (("eval_loss", "eval loss"), ("macro_loss", "macro loss")):
            if not group[f"{metric}_mean"].notna().any():
                continue
            best = group.loc[group[f"{metric}_mean"].idxmin()]
            lines.append(
                f"- {mode}, alpha {alpha:g}, {title}: `{best['arm']}` "
                f"{_fmt(best[f'{metric}_mean'])}, vs random {_interval(best, metric)}"
            )
    return lines


def generation_column(metric: str, group: str) -> str:
    """results.csv's column of a generation-check score: ``exact_match[source=nq_open]``."""
    return f"{metric}[{group}]" if group == GENERATION_ALL_ROWS else f"{metric}[source={group}]"


def _row_name(column: str) -> str:
    """``eval_loss[source=gsm8k]`` -> ``gsm8k``; ``chrf[source=ntrex]`` -> ``ntrex (chrf)``."""
    metric, _, group = column.rstrip("]").partition("[")
    group = group.removeprefix("source=")
    return group if metric == "eval_loss" else f"{group} ({metric})"


def generation_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.split("[")[0] in GENERATION_METRICS and "[" in c]


def per_source_lines(frame: pd.DataFrame, columns: list[str] | None = None) -> list[str]:
    """Per source (or per generation score): each arm's mean minus random's, paired over seeds
    (t-interval). ``columns``: the per-source losses when None."""
    if columns is None:
        columns = [c for c in frame.columns if c.startswith("eval_loss[source=")]
    arms = list(frame.loc[~frame["method"].isin([BASELINE, FULL]), "arm"].unique())
    if not columns or not arms or BASELINE not in set(frame["arm"]):
        return []
    lines = [
        "| source | " + " | ".join(arms) + " |",
        "| --- |" + " ---: |" * len(arms),
    ]
    for column in columns:
        cells = []
        for arm in arms:
            group = frame[frame["arm"] == arm]
            paired = _paired(frame, group, column)
            low, high = t_interval(paired.to_numpy())
            cells.append(
                f"{paired.mean():+.3f} [{_fmt(low, 3)}, {_fmt(high, 3)}]" if len(paired) else "-"
            )
        name = _row_name(column)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _colours(frame: pd.DataFrame) -> dict[str, object]:
    """One colour per arm in every plot (arms in sorted order, full data grey)."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    arms = sorted(a for a in frame["arm"].unique() if a != FULL)
    return {FULL: "grey", **{arm: cycle[i % len(cycle)] for i, arm in enumerate(arms)}}


def _plots(frame: pd.DataFrame, summary: pd.DataFrame, plots: Path) -> list[tuple[str, str]]:
    images, colour = [], _colours(frame)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    full = frame[frame["arm"] == FULL]["eval_loss"]
    if len(full):
        mean, std = full.mean(), full.std(ddof=1) if len(full) > 1 else 0.0
        ax.axhspan(mean - std, mean + std, color="grey", alpha=0.25, label="full data (+- std)")
        ax.axhline(mean, color="grey", lw=1)
    for (arm, mode), group in summary[summary["arm"] != FULL].groupby(["arm", "mode"]):
        ax.errorbar(
            1 - group["alpha"], group["eval_loss_mean"], yerr=group["eval_loss_std"].fillna(0),
            marker="o" if mode == "offline" else "s", capsize=3, label=f"{arm} ({mode})",
            color=colour[arm],
        )  # fmt: skip
    ax.set(
        xlabel="fraction of data kept (1 - alpha)", ylabel="eval loss", title="Eval loss vs data"
    )
    ax.legend(fontsize=7)
    images.append(("Eval loss vs fraction kept", _save(fig, plots / "loss_vs_kept.png")))

    fig, ax = plt.subplots(figsize=(6.5, 4))
    compute = (
        "flops_with_selection" if frame["flops_with_selection"].notna().all() else "flops_total"
    )
    for arm, group in frame.groupby("arm"):
        ax.scatter(group[compute], group["eval_loss"], label=arm, s=18, color=colour[arm])
    front = _pareto(frame[[compute, "eval_loss"]].to_numpy())
    ax.plot(front[:, 0], front[:, 1], "k--", lw=1, label="Pareto front")
    xlabel = "FLOPs: training + selection pass" if compute != "flops_total" else "training FLOPs"
    ax.set(xlabel=f"{xlabel} (estimate)", ylabel="eval loss", title="Eval loss vs compute")
    ax.legend(fontsize=7)
    images.append(("Eval loss vs FLOPs", _save(fig, plots / "loss_vs_flops.png")))

    tasks = [c for c in frame.columns if c.startswith("eval_loss[task=")]
    alphas = sorted(frame.loc[frame["arm"] != FULL, "alpha"].unique())
    if tasks and alphas:
        middle = alphas[len(alphas) // 2]  # an alpha the grid has
        at = frame[(frame["alpha"] == middle) | (frame["arm"] == FULL)]
        table = at.groupby("arm")[tasks].mean().T
        table.index = [t.removeprefix("eval_loss[task=").rstrip("]") for t in table.index]
        fig, ax = plt.subplots(figsize=(7, 0.3 * len(table) * max(1, len(table.columns)) + 2))
        table.plot.barh(ax=ax, color=[colour[a] for a in table.columns])
        title = f"Per-task eval loss at alpha {middle:g} (and full data)"
        ax.set(xlabel="eval loss", title=title)
        images.append((title, _save(fig, plots / "per_task.png")))
    return images


def _pareto(points: np.ndarray) -> np.ndarray:
    """Points not dominated in (FLOPs, loss), sorted by FLOPs."""
    order = points[np.lexsort((points[:, 1], points[:, 0]))]
    front, best = [], np.inf
    for x, y in order:
        if y < best:
            front.append((x, y))
            best = y
    return np.asarray(front)


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"plots/{path.name}"


FREE_SELECTION = (BASELINE, FULL)  # methods that never score the pool


def add_selection_cost(frame: pd.DataFrame, selection_dir: Path, scoring_model: str):
    """What the selection pass costs each offline arm that needs it (all but random and full):
    ``flops_selection`` = 2 N_score per scored token (one forward over the scored pool; the
    features and calibration left out), ``seconds_selection`` the pass's calibration and
    scoring time, and ``flops_with_selection`` = training + selection, the compute an arm pays
    to be used once. Unknown (NaN) where the scores or the scorer's size are not at hand."""
    from slap_ray.assets import parameter_count

    frame = frame.copy()
    scores, manifest = selection_dir / "scores.parquet", selection_dir / MANIFEST
    flops = seconds = float("nan")
    parameters = parameter_count(scoring_model)
    if scores.exists() and parameters:  # the pipeline writes a folder of parts
        table = pd.read_parquet(scores, columns=["batch_id", "num_tokens"])
        flops = 2.0 * parameters * float(table.loc[table["batch_id"].notna(), "num_tokens"].sum())
    if manifest.is_file():
        timings = json.loads(manifest.read_text(encoding="utf-8")).get("timings_s", {})
        seconds = float(timings.get("calibrate", 0.0) + timings.get("score", 0.0))
    # On-policy arms select inside training: their forwards are in the training FLOPs already.
    pays = ~frame["method"].isin(FREE_SELECTION) & (frame["mode"] == "offline")
    frame["flops_selection"] = np.where(pays, flops, 0.0)
    frame["seconds_selection"] = np.where(pays, seconds, 0.0)
    frame["flops_with_selection"] = frame["flops_total"] + frame["flops_selection"]
    return frame


def trial_rows_reader(sweep_dir: Path) -> Callable[[pd.Series], dict | None]:
    """A trial's held-out rows (ids, sources, tokens, loss sums) from its metrics.json, or None
    for a trial that did not keep them (older runs)."""

    def rows_of(trial: pd.Series) -> dict | None:
        name = trial_name(trial["arm"], trial["mode"], float(trial["alpha"]), int(trial["seed"]))
        path = sweep_dir / "trials" / name / METRICS
        if not path.is_file():
            return None
        metrics = json.loads(path.read_text(encoding="utf-8"))
        rows = metrics.get("eval_rows") or {}
        if "source" not in rows:
            return None
        return {**rows, "ids": metrics["eval_ids"]}

    return rows_of


INTRO = (
    "Two primary metrics, declared before the runs: **eval loss**, the held-out response-token "
    "loss (token-weighted, so long answers weigh more), and **macro loss**, each source's loss "
    "averaged with equal weight. `vs random`: the mean paired difference to the `random` arm at "
    "the same mode, alpha and seed (negative = better) with its 95% interval: held-out rows "
    "resampled within each source and seeds resampled, where the trials kept their rows, else "
    "Student's t over seeds. An arm **beats random** only if both intervals lie below 0. "
    "Trained tokens: response and prompt tokens back-propagated. FLOPs: the training estimate "
    "plus, for every arm that scores the pool (all but random and full), one forward pass over "
    "the scored pool (2 N per token). `vs full`: mean relative gap to "
    "the full-data run of the same seed."
)


GENERATION_INTRO = (
    "Greedy answers to held-out prompts (at most `eval.max_new_tokens` new tokens), scored "
    "against the reference response: `exact_match` after SQuAD normalisation (0-1), `chrf` "
    "(sacrebleu, 0-100), `rouge_l` (F1, 0-1)."
)


def write_results(
    rows: list[dict], config: SlapConfig, sweep_dir: Path, planned: int | None = None
) -> Path:
    """results.csv, results.md and plots from the trials' reported rows (``planned``: the
    grid's size, when only some trials have finished)."""
    done = [
        {k: v for k, v in r.items() if k not in ("trial", "error")} for r in rows if not r["error"]
    ]
    frame = add_macro(pd.DataFrame(done))
    frame = add_selection_cost(frame, sweep_dir / "selection", config.scoring_model)
    frame = frame.sort_values(KEYS, kind="stable").reset_index(drop=True)
    keep = KEYS + OPTIONS + [c for c in frame.columns if c not in KEYS + OPTIONS]
    frame = frame[[c for c in keep if c in frame.columns]]
    with atomic_path(sweep_dir / "results.csv") as tmp:  # read while the sweep runs
        frame.to_csv(tmp, index=False)
    summary = summary_table(frame, config.sweep.bootstrap_samples, trial_rows_reader(sweep_dir))
    plots = sweep_dir / PLOTS_DIR
    plots.mkdir(exist_ok=True)
    images = _plots(frame, summary, plots)
    lines = [
        "# SLAP budget sweep",
        "",
        f"Model `{config.model.name}`, {config.train.finetuning} fine-tuning, "
        f"{len(frame)} trials ({len(rows) - len(done)} failed"
        + (f", {planned - len(rows)} of {planned} not finished yet" if planned else "")
        + f"); seeds {config.sweep.seeds}. Alpha is the fraction of each batch PRUNED.",
        "",
        INTRO,
        "",
        *_markdown(summary, frame),
        "",
    ]
    diagnostics = sweep_dir / "selection" / "diagnostics.csv"
    if diagnostics.is_file():
        from slap_ray.reporting.diagnostics import diagnostics_lines

        lines += ["## What each arm keeps, before training (mean over seeds)", ""]
        lines += ["Share of the kept rows per source; the pool's share first.", ""]
        lines += [*diagnostics_lines(pd.read_csv(diagnostics)), ""]
    per_source = per_source_lines(frame)
    if per_source:
        lines += ["## Per source: arm minus random (paired over seeds, 95% t-interval)", ""]
        lines += [*per_source, ""]
    generation = per_source_lines(frame, generation_columns(frame))
    if generation:
        lines += ["## Generation check: arm minus random (higher is better; paired over seeds, "
                  "95% t-interval)", "", GENERATION_INTRO, ""]  # fmt: skip
        lines += [*generation, ""]
    for title, image in images:
        lines += [f"## {title}", "", f"![{title}]({image})", ""]
    write_text_atomic(sweep_dir / "answer.txt", "\n".join(answer_lines(summary)) + "\n")
    return write_text_atomic(sweep_dir / "results.md", "\n".join(lines))
