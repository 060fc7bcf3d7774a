"""Results of `slap sweep`: results.csv (one row per trial), results.md (mean +- std over seeds,
paired differences against random with bootstrap intervals, the full-data reference) and plots.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from slap_ray.config import SlapConfig  # noqa: E402
from slap_ray.files import atomic_path, write_text_atomic  # noqa: E402
from slap_ray.selection_spec import SelectionSpec  # noqa: E402

KEYS = ["arm", "method", "mode", "alpha", "seed"]
OPTIONS = [name for name in SelectionSpec.model_fields if name != "method"]
FULL = "full"
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


def paired_interval(diffs: np.ndarray, samples: int, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the mean paired difference (scipy, percentile method); NaN
    with fewer than two pairs."""
    from scipy.stats import bootstrap

    if len(diffs) < 2 or np.allclose(diffs, diffs[0]):
        return (float("nan"), float("nan")) if len(diffs) < 2 else (diffs[0], diffs[0])
    result = bootstrap(
        (diffs,), np.mean, n_resamples=samples, method="percentile", random_state=seed
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _fmt(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def summary_table(frame: pd.DataFrame, samples: int) -> pd.DataFrame:
    """Per (arm, mode, alpha): mean and std over seeds, the paired difference against random
    at the same (mode, alpha, seed) with its interval, and the gap to full data."""
    full = frame[frame["arm"] == FULL].set_index("seed")["eval_loss"]
    rows = []
    for (arm, mode, alpha), group in frame.groupby(["arm", "mode", "alpha"], sort=True):
        entry = {
            "arm": arm, "mode": mode, "alpha": alpha, "seeds": len(group),
            "eval_loss_mean": group["eval_loss"].mean(),
            "eval_loss_std": group["eval_loss"].std(ddof=1) if len(group) > 1 else float("nan"),
            "flops_total_mean": group["flops_total"].mean(),
        }  # fmt: skip
        method = group["method"].iloc[0]
        random = frame[(frame["method"] == BASELINE) & (frame["mode"] == mode)]
        random = random[random["alpha"] == alpha].drop_duplicates("seed")
        random = random.set_index("seed")["eval_loss"]
        paired = group.set_index("seed")["eval_loss"].sub(random).dropna()
        if method not in (BASELINE, FULL) and len(paired):
            low, high = paired_interval(paired.to_numpy(), samples)
            entry.update(vs_random=paired.mean(), vs_random_low=low, vs_random_high=high)
        gap = group.set_index("seed")["eval_loss"].sub(full).dropna()
        if arm != FULL and len(gap):
            entry["vs_full_pct"] = 100.0 * (gap / full.reindex(gap.index)).mean()
        rows.append(entry)
    return pd.DataFrame(rows)


def _markdown(summary: pd.DataFrame, frame: pd.DataFrame) -> list[str]:
    lines = [
        "| arm | mode | alpha | seeds | eval loss (mean +- std) | vs random (95% CI) "
        "| vs full | FLOPs |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for _, r in summary.iterrows():
        versus = "-"
        if np.isfinite(r.get("vs_random", np.nan)):
            versus = (
                f"{r['vs_random']:+.4f} [{_fmt(r['vs_random_low'])}, {_fmt(r['vs_random_high'])}]"
            )
        full_gap = r.get("vs_full_pct", np.nan)
        lines.append(
            f"| {r['arm']} | {r['mode']} | {r['alpha']:g} | {r['seeds']} "
            f"| {_fmt(r['eval_loss_mean'])} +- {_fmt(r['eval_loss_std'])} | {versus} "
            f"| {'-' if not np.isfinite(full_gap) else f'{full_gap:+.2f}%'} "
            f"| {r['flops_total_mean']:.3g} |"
        )
    lines += ["", "Best arm per alpha (lowest mean eval loss):", ""]
    chosen = summary[summary["arm"] != FULL]
    for (mode, alpha), group in chosen.groupby(["mode", "alpha"]):
        best = group.loc[group["eval_loss_mean"].idxmin()]
        lines.append(f"- {mode}, alpha {alpha:g}: `{best['arm']}` ({_fmt(best['eval_loss_mean'])})")
    return lines


def _plots(frame: pd.DataFrame, summary: pd.DataFrame, plots: Path) -> list[tuple[str, str]]:
    images = []
    fig, ax = plt.subplots(figsize=(6.5, 4))
    full = frame[frame["arm"] == FULL]["eval_loss"]
    if len(full):
        mean, std = full.mean(), full.std(ddof=1) if len(full) > 1 else 0.0
        ax.axhspan(mean - std, mean + std, color="grey", alpha=0.25, label="full data (+- std)")
        ax.axhline(mean, color="grey", lw=1)
    for (arm, mode), group in summary[summary["arm"] != FULL].groupby(["arm", "mode"]):
        ax.errorbar(
            1 - group["alpha"], group["eval_loss_mean"], yerr=group["eval_loss_std"].fillna(0),
            marker="o", capsize=3, label=f"{arm} ({mode})",
        )  # fmt: skip
    ax.set(
        xlabel="fraction of data kept (1 - alpha)", ylabel="eval loss", title="Eval loss vs data"
    )
    ax.legend(fontsize=7)
    images.append(("Eval loss vs fraction kept", _save(fig, plots / "loss_vs_kept.png")))

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for arm, group in frame.groupby("arm"):
        ax.scatter(group["flops_total"], group["eval_loss"], label=arm, s=18)
    front = _pareto(frame[["flops_total", "eval_loss"]].to_numpy())
    ax.plot(front[:, 0], front[:, 1], "k--", lw=1, label="Pareto front")
    ax.set(xlabel="training FLOPs (estimate)", ylabel="eval loss", title="Eval loss vs compute")
    ax.legend(fontsize=7)
    images.append(("Eval loss vs FLOPs", _save(fig, plots / "loss_vs_flops.png")))

    tasks = [c for c in frame.columns if c.startswith("eval_loss[task=")]
    at = frame[(frame["alpha"].round(6) == 0.3) | (frame["arm"] == FULL)]
    if tasks and len(at):
        table = at.groupby("arm")[tasks].mean().T
        table.index = [t.removeprefix("eval_loss[task=").rstrip("]") for t in table.index]
        fig, ax = plt.subplots(figsize=(7, 0.3 * len(table) * max(1, len(table.columns)) + 2))
        table.plot.barh(ax=ax)
        ax.set(xlabel="eval loss", title="Per-task eval loss at alpha 0.3 (and full data)")
        images.append(("Per-task eval loss at alpha 0.3", _save(fig, plots / "per_task.png")))
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


def write_results(
    rows: list[dict], config: SlapConfig, sweep_dir: Path, planned: int | None = None
) -> Path:
    """results.csv, results.md and plots from the trials' reported rows (``planned``: the
    grid's size, when only some trials have finished)."""
    done = [
        {k: v for k, v in r.items() if k not in ("trial", "error")} for r in rows if not r["error"]
    ]
    frame = pd.DataFrame(done)
    frame = frame.sort_values(KEYS, kind="stable").reset_index(drop=True)
    keep = KEYS + OPTIONS + [c for c in frame.columns if c not in KEYS + OPTIONS]
    frame = frame[[c for c in keep if c in frame.columns]]
    with atomic_path(sweep_dir / "results.csv") as tmp:  # read while the sweep runs
        frame.to_csv(tmp, index=False)
    summary = summary_table(frame, config.sweep.bootstrap_samples)
    plots = sweep_dir / "plots"
    plots.mkdir(exist_ok=True)
    images = _plots(frame, summary, plots)
    lines = [
        "# SLAP budget sweep",
        "",
        f"Model `{config.model.name}`, {config.train.finetuning} fine-tuning, "
        f"{len(frame)} trials ({len(rows) - len(done)} failed"
        + (f", {planned - len(rows)} of {planned} not finished yet" if planned else "")
        + f"); seeds {config.sweep.seeds}. "
        "Eval loss: held-out response-token loss after training. `vs random`: mean paired "
        "difference to the `random` arm at the same mode, alpha and seed (negative = better), with a "
        "95% bootstrap interval over seeds. `vs full`: mean relative gap to the full-data run of "
        "the same seed.",
        "",
        *_markdown(summary, frame),
        "",
    ]
    for title, image in images:
        lines += [f"## {title}", "", f"![{title}]({image})", ""]
    return write_text_atomic(sweep_dir / "results.md", "\n".join(lines))
