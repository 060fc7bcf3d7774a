"""`slap sweep`: how much data can be dropped, with which method, at what compute.

One selection pass scores every composed batch once and selects for every (arm, alpha, seed)
of the grid from those losses and features; then Ray Tune runs one trial per (arm, mode,
alpha, seed) plus the full-data reference, each fine-tuning with Ray Train on exactly the ids
its arm kept, and the results are tabulated (``results.csv``, ``results.md``, plots).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from slap_ray.config import SlapConfig, build_config, config_to_dict
from slap_ray.core.scoring import Selection
from slap_ray.errors import JobFailed
from slap_ray.files import atomic_path, write_text_atomic
from slap_ray.jobs.rundir import locked_run_dir
from slap_ray.jobs.storage import storage_for
from slap_ray.names import (
    ARMS_DIR,
    FULL_ARM,
    MANIFEST,
    METRICS,
    PLOTS_DIR,
    RESOLVED_CONFIG,
    RUN_RECORDS,
    keep_column,
    sweep_key,
    trial_name,
    weight_column,
)
from slap_ray.reporting.manifest import Manifest
from slap_ray.selection_spec import SelectionSpec

log = logging.getLogger("slap_ray.sweep")
SELECTION_DIR, TRIALS_DIR, TUNE_DIR, EXPERIMENT = "selection", "trials", "tune", "sweep"
BASE_EVAL_DIR = "base_eval"  # the untrained model's evaluation, computed by the first trial
DIAGNOSTICS = "diagnostics.csv"  # in the selection folder: what each arm keeps
OWNED = (
    "results.csv", "results.md", "answer.txt", PLOTS_DIR, *RUN_RECORDS,
    SELECTION_DIR, TRIALS_DIR, TUNE_DIR, BASE_EVAL_DIR,
)  # fmt: skip
FULL = FULL_ARM
TRIAL_RESULT = "trial_result.json"  # written last: the trial is done, its row is final


@dataclass(frozen=True)
class TrialSpec:
    """One trial of the grid: an arm's selection spec at (mode, alpha, seed), or the full-data
    reference (arm ``full``). Crosses to the Tune trial as ``as_dict()``."""

    arm: str
    mode: str
    alpha: float
    seed: int
    selection: SelectionSpec

    @property
    def is_full(self) -> bool:
        return self.arm == FULL

    @property
    def is_offline_arm(self) -> bool:
        """Selected from the sweep's one scoring pass (not online, not the reference)."""
        return self.mode == "offline" and not self.is_full

    @property
    def name(self) -> str:
        return trial_name(self.arm, self.mode, self.alpha, self.seed)

    @property
    def selection_key(self) -> str:
        return sweep_key(self.arm, self.alpha, self.seed)

    def as_dict(self) -> dict:
        return {**asdict(self), "selection": self.selection.model_dump(), "name": self.name}

    @classmethod
    def from_dict(cls, values: dict) -> TrialSpec:
        values = {k: v for k, v in values.items() if k != "name"}
        return cls(**{**values, "selection": SelectionSpec(**values["selection"])})

    def row(self) -> dict:
        """The trial's parameters as results.csv shows them (no options for the reference)."""
        options = {} if self.is_full else self.selection.model_dump(exclude={"method"})
        return {"arm": self.arm, "method": self.selection.method, "mode": self.mode,
                "alpha": self.alpha, "seed": self.seed, **options}  # fmt: skip


def trial_grid(config: SlapConfig) -> list[TrialSpec]:
    """Every trial: (arm, mode, alpha, seed) of each arm, then the full-data reference."""
    sweep, base = config.sweep, config.select.spec()
    specs = [
        TrialSpec(arm.label(), mode, float(alpha), int(seed), arm.spec(base))
        for arm in sweep.arms
        for mode in arm.modes or sweep.modes
        for alpha in sorted(arm.alphas or sweep.alphas)
        for seed in sweep.seeds
    ]
    if sweep.full_data:
        full = SelectionSpec(method=FULL)
        specs += [TrialSpec(FULL, "offline", 0.0, int(seed), full) for seed in sweep.seeds]
    return sorted(specs, key=lambda spec: _run_order(spec, sweep))


def _run_order(spec: TrialSpec, sweep) -> tuple:
    """Seed by seed, full data first, then the middle alpha (every arm), then the others: a
    stopped sweep's partial table already compares the arms with each other and with full data."""
    labels = [FULL] + [a.label() for a in sweep.arms]
    middle = sorted(sweep.alphas)[len(sweep.alphas) // 2]
    return (spec.seed, not spec.is_full, spec.alpha != middle, labels.index(spec.arm),
            spec.mode, spec.alpha)  # fmt: skip


def grid_selections(config: SlapConfig, specs: list[TrialSpec]) -> list[Selection]:
    """The offline trials' selections, all made from the one scoring pass."""
    return [
        Selection(spec.selection_key, spec.alpha, spec.seed, spec.selection)
        for spec in specs
        if spec.is_offline_arm
    ]


def arm_view(selection_dir: Path, spec: TrialSpec, arms: str = ARMS_DIR) -> Path:
    """Where an (arm, seed) pair's kept lists live, laid out as a `slap select` run."""
    return selection_dir / arms / spec.arm / f"seed-{spec.seed}"


def selection_finished(selection_dir: Path) -> bool:
    """A sweep's selection pass is done once its scores and every arm view are written
    (``arms/`` appears whole, see ``write_arm_views``)."""
    return (selection_dir / "scores.parquet").exists() and (selection_dir / ARMS_DIR).is_dir()


def write_diagnostics(selection_dir: Path, specs: list[TrialSpec]) -> Path:
    """``diagnostics.csv``: what each offline (arm, seed) keeps, before any training."""
    from slap_ray.reporting.diagnostics import selection_diagnostics

    keys = {(s.arm, s.alpha, s.seed): s.selection_key for s in specs if s.is_offline_arm}
    scores = pd.read_parquet(selection_dir / "scores.parquet")
    path = selection_dir / DIAGNOSTICS
    with atomic_path(path) as tmp:
        selection_diagnostics(scores, keys).to_csv(tmp, index=False)
    return path


def write_arm_views(selection_dir: Path, specs: list[TrialSpec]) -> None:
    """Per (arm, seed): ``kept/alpha-<a>.txt|.parquet`` and a manifest naming its alphas, so
    `slap finetune` reads them like any selection. Written into ``arms.partial/`` and renamed
    to ``arms/`` at the end: a kill between two arms leaves no ``arms/`` that a resumed sweep
    would take for a finished selection."""
    from slap_ray.jobs.select import write_kept

    scores = pd.read_parquet(selection_dir / "scores.parquet")
    groups: dict[tuple[str, int], list[TrialSpec]] = {}
    for spec in specs:
        if spec.is_offline_arm:
            groups.setdefault((spec.arm, spec.seed), []).append(spec)
    staging = f"{ARMS_DIR}.partial"
    shutil.rmtree(selection_dir / staging, ignore_errors=True)  # a killed run's half
    for members in groups.values():
        view = arm_view(selection_dir, members[0], staging)
        view.mkdir(parents=True, exist_ok=True)
        alphas = sorted({m.alpha for m in members})
        frame = scores[["id"]].copy()
        for m in members:
            frame[keep_column(m.alpha)] = scores[keep_column(m.selection_key)]
            frame[weight_column(m.alpha)] = scores[weight_column(m.selection_key)]
        kept = write_kept([frame], alphas, view / "kept")
        method = members[0].selection.method
        manifest = {"alphas": alphas, "method": method, "kept_per_alpha": kept}
        (view / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    (selection_dir / staging).mkdir(exist_ok=True)  # a grid of full-data trials has no arms
    shutil.rmtree(selection_dir / ARMS_DIR, ignore_errors=True)
    (selection_dir / staging).rename(selection_dir / ARMS_DIR)


def trial_config(tree: dict, spec: TrialSpec, sweep_dir: Path) -> SlapConfig:
    """The fine-tuning config of one trial: the sweep's config with the trial's arm, alpha and
    training seed (the data sample stays that of ``seed``, so every trial sees one pool)."""
    tree = json.loads(json.dumps(tree))
    tree["output_dir"] = str(sweep_dir / TRIALS_DIR / spec.name)
    tree["resume"] = True  # a restored trial continues from its Ray Train checkpoint
    tree["progress"] = False
    tree["train"]["seed"] = spec.seed
    if spec.mode == "online":
        tree["select"].update(mode="online", **spec.selection.model_dump())
        tree["train"].update(alpha=spec.alpha, selection_dir=None)
    elif spec.is_full:
        tree["select"]["mode"] = "offline"
        tree["train"].update(alpha=0.0, selection_dir=None)
    else:
        tree["select"]["mode"] = "offline"
        view = arm_view(sweep_dir / SELECTION_DIR, spec)
        tree["train"].update(alpha=spec.alpha, selection_dir=str(view))
    return build_config(tree)


def _train_trial(config: SlapConfig, spec: TrialSpec, done: Path, base_eval_dir: Path) -> None:
    from slap_ray.jobs.finetune import OWNED as FINETUNE_OWNED
    from slap_ray.jobs.finetune import finetune_into
    from slap_ray.reporting.sweep import trial_row

    with locked_run_dir(config.output_dir, FINETUNE_OWNED, resume=True) as run_dir:
        finetune_into(config, run_dir, base_eval_dir=base_eval_dir)
        metrics = json.loads((run_dir / METRICS).read_text())
        manifest = json.loads((run_dir / MANIFEST).read_text())
        write_text_atomic(done, json.dumps(trial_row(spec.row(), metrics, manifest)))


def run_trial(params: dict) -> None:
    """The Tune function trainable: fine-tune and evaluate one trial, then report its metrics."""
    from ray import tune

    from slap_ray.ray.tune import outside_trial_placement_group

    spec, shared = TrialSpec.from_dict(params["trial"]), params["shared"]
    config = trial_config(shared["config"], spec, Path(shared["sweep_dir"]))
    done = Path(config.output_dir) / TRIAL_RESULT
    trained_now = not done.is_file()
    if trained_now:  # else a trial killed after finishing but before Tune heard of it
        base_eval_dir = Path(shared["sweep_dir"]) / BASE_EVAL_DIR
        outside_trial_placement_group(_train_trial, config, spec, done, base_eval_dir)
    tune.report({**json.loads(done.read_text(encoding="utf-8")), "trained_now": trained_now})


def _name_of(trial: dict) -> str:
    """A trial's name from its ``TrialSpec.as_dict()`` (what Tune holds)."""
    return trial["name"]


def _untrained(sweep_dir: Path, specs: list[TrialSpec]) -> int:
    trials = sweep_dir / TRIALS_DIR
    return sum(not (trials / s.name / TRIAL_RESULT).is_file() for s in specs)


def _select_once(config: SlapConfig, sweep_dir: Path, specs: list[TrialSpec], manifest: Manifest):
    """Run the selection pass unless a finished one is there (resume); count the runs."""
    from slap_ray.jobs.select import select_into

    folder = sweep_dir / SELECTION_DIR
    done = selection_finished(folder)
    if not done:
        folder.mkdir(exist_ok=True)
        tree = config_to_dict(config)
        tree["output_dir"] = str(folder)
        tree["resume"] = config.resume
        # The selection's own kept lists and report count the alphas the sweep trains at.
        tree["select"]["alphas"] = sorted({s.alpha for s in specs if s.is_offline_arm}) or [0.0]
        select_config = build_config(tree)
        select_into(select_config, folder, grid_selections(config, specs))
        write_arm_views(folder, specs)
    if not (folder / DIAGNOSTICS).is_file():  # also for a selection from before it existed
        write_diagnostics(folder, specs)
    counts = json.loads((folder / MANIFEST).read_text())["counts"]
    manifest.count(
        "selection",
        runs_this_session=0 if done else 1,
        batches_scored=counts["score"]["batches"],
        selections=len(grid_selections(config, specs)),
    )


def finished_rows(sweep_dir: Path, specs: list[TrialSpec]) -> list[dict]:
    """The rows of every trial that has finished so far (its ``trial_result.json``)."""
    rows = []
    for spec in specs:
        done = sweep_dir / TRIALS_DIR / spec.name / TRIAL_RESULT
        if done.is_file():
            rows.append({**json.loads(done.read_text(encoding="utf-8")), "error": None})
    return rows


def write_partial_results(config: SlapConfig, sweep_dir: Path, specs: list[TrialSpec]) -> None:
    """results.csv/md of the trials finished so far, so a long sweep always has a table."""
    from slap_ray.reporting.sweep import write_results

    rows = finished_rows(sweep_dir, specs)
    if rows:
        write_results(rows, config, sweep_dir, planned=len(specs))


def _absolute_paths(config: SlapConfig) -> dict:
    """The config tree with input globs made absolute: trials run in their own directories."""
    from slap_ray.ray.stages import EMBEDDED

    tree = config_to_dict(config)
    for section in ("data", "eval"):
        tree[section]["paths"] = [
            p if p in EMBEDDED or Path(p).is_absolute() else str(Path(p).resolve())
            for p in tree[section]["paths"]
        ]
    return tree


def sweep_into(config: SlapConfig, sweep_dir: Path) -> Path:
    """The whole sweep in a locked run directory; returns the path of results.md."""
    from slap_ray.config import write_resolved_config
    from slap_ray.ray.runtime import check_resources, ray_session
    from slap_ray.ray.tune import TuneRun, run_trials
    from slap_ray.reporting.sweep import write_results

    specs = trial_grid(config)
    write_resolved_config(config, sweep_dir / RESOLVED_CONFIG)
    manifest = Manifest("sweep")
    manifest.count("trials", planned=len(specs))
    try:
        with ray_session(config.ray, sweep_dir, "sweep"):
            check_resources(config, "finetune")
            with manifest.stage("selection"):
                _select_once(config, sweep_dir, specs, manifest)
            shared = {"config": _absolute_paths(config), "sweep_dir": str(sweep_dir.resolve())}
            with manifest.stage("trials"):
                tune_run = TuneRun(
                    storage_for(config, sweep_dir, TUNE_DIR), EXPERIMENT,
                    config.sweep.max_concurrent_trials, config.sweep.trial_cpus, config.resume,
                )  # fmt: skip
                rows = run_trials(
                    run_trial, [s.as_dict() for s in specs], shared, tune_run, _name_of,
                    on_trial_done=lambda: write_partial_results(config, sweep_dir, specs),
                    untrained=lambda: _untrained(sweep_dir, specs),
                )  # fmt: skip
        failed = [r for r in rows if r["error"]]
        manifest.count("trials", finished=len(rows) - len(failed), failed=len(failed))
        if len(failed) < len(rows):
            with manifest.stage("results"):
                report = write_results(rows, config, sweep_dir)
    finally:
        manifest.write(sweep_dir / MANIFEST)
    if failed:
        names = ", ".join(_name_of(r["trial"]) for r in failed[:5])
        first = failed[0]["error"]
        raise JobFailed(
            f"sweep: {len(failed)} of {len(rows)} trial(s) failed ({names}); first: {first}; "
            f"see {sweep_dir / 'logs' / 'sweep.log'}"
        )
    return report


def run_sweep(config: SlapConfig) -> Path:
    with locked_run_dir(config.output_dir, OWNED, config.resume) as sweep_dir:
        return sweep_into(config, sweep_dir)


def main_sweep(config: SlapConfig) -> int:
    report = run_sweep(config)
    frame = pd.read_csv(Path(config.output_dir) / "results.csv")
    answer = (Path(config.output_dir) / "answer.txt").read_text(encoding="utf-8")
    print(answer.rstrip())
    print(f"slap sweep: {len(frame)} trials; results: {report}")
    return 0
