"""The `slap` command: `slap {select,finetune,run,sweep,evaluate} --config CFG [dotted.key=value ...] [--resume]`.

- `select`: offline SLAP over the pool (kept ids per alpha, scores, report).
- `finetune`: Ray Train fine-tuning on a selection (`train.selection_dir`, `train.alpha`) or
  with on-policy selection (`select.mode=online`).
- `run`: select -> fine-tune -> evaluate -> report in one run directory.
- `sweep`: one selection pass, then a Ray Tune grid of fine-tuning trials over arms (methods and
  ablations), alphas, seeds and modes, plus the full-data reference; results table and plots.
- `evaluate`: a saved model (a fine-tuning run's `model/`) scored on held-out rows, no training.
- `config`: every setting with its value, default and description (after `--config` files and
  overrides).
- `export RUN_DIR --alpha A --format jsonl|parquet|hf --output PATH`: a selection's kept rows
  for any trainer.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from slap_ray.config import ConfigError, SlapConfig, load_config
from slap_ray.errors import slap_error_in

# One line per command for `slap --help`, then what each reads and writes for its own --help.
SUMMARY = {
    "select": "score and select the pool offline: kept ids per alpha, scores, report",
    "finetune": "fine-tune with Ray Train on a selection, or select on-policy while training",
    "run": "select, then fine-tune, evaluate and report, in one run directory",
    "sweep": "one selection pass, then a Ray Tune grid of fine-tuning trials and a results table",
    "evaluate": "score a saved model (a run's model/) on held-out rows, without training",
    "export": "write a selection's kept rows as JSONL, Parquet or a Hugging Face dataset",
    "config": "every setting with its value, default and description",
}
READS_WRITES = {
    "select": "Reads data.paths (JSONL, JSON, Parquet, CSV, datasets folders). Writes to "
    "output_dir: kept/alpha-<a>.txt and selected/alpha-<a>/ per alpha, scores.parquet, "
    "report.md, manifest.json, config.yaml, logs/.",
    "finetune": "Reads data.paths and a selection (train.selection_dir, train.alpha), or "
    "selects on-policy (select.mode=online); eval.paths for held-out loss. Writes to "
    "output_dir: model/ (the adapter or weights), metrics.json, report.md, train_ids.txt.",
    "run": "Reads data.paths and eval.paths. Writes output_dir/select/ (as `slap select`) and "
    "the fine-tuning outputs (as `slap finetune`) in output_dir.",
    "sweep": "Reads data.paths and eval.paths. Writes to output_dir: selection/, trials/<name>/, "
    "results.csv, results.md (both primary metrics with paired intervals), plots/.",
    "evaluate": "Reads eval.model_dir (a fine-tuning run's model/; start from that run's "
    "config.yaml) and eval.paths, less the rows in the run's train_ids.txt. Writes to "
    "output_dir: metrics.json (loss per row, source and task; the generation check), "
    "manifest.json, config.yaml, logs/.",
    "config": "Reads --config files and overrides; writes nothing.",
}
ALPHA = (
    "alpha is the fraction of each batch PRUNED (select.alphas=[0.3] keeps 70%). Every setting, "
    "with its default and meaning: `slap config`."
)


def parse(argv: list[str] | None, command: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"slap {command}",
        description=f"{SUMMARY[command][0].upper()}{SUMMARY[command][1:]}. {READS_WRITES[command]}",
        epilog=ALPHA,
    )
    parser.add_argument(
        "--config",
        action="append",
        help="YAML config file (defaults when omitted); repeat to layer files, later ones win",
    )
    parser.add_argument("--resume", action="store_true", help="reuse finished work in output_dir")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. select.alphas=[0.3]")
    return parser.parse_args(argv)


def _console_logging(command: str) -> None:
    """The job's warnings and notices on the console, one line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"slap {command}: %(message)s"))
    logger = logging.getLogger("slap_ray")
    logger.handlers = [h for h in logger.handlers if not getattr(h, "slap_console", False)]
    handler.slap_console = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _config_from(argv: list[str] | None, command: str) -> SlapConfig | None:
    """The config the command line asks for, or None once the reason it cannot load is
    printed (one line)."""
    args = parse(argv, command)
    overrides = args.overrides + (["resume=true"] if args.resume else [])
    try:
        return load_config(args.config, overrides)
    except (ConfigError, OSError) as error:
        print(f"slap {command}: {error}", file=sys.stderr)
        return None


def _model_problem(config: SlapConfig, command: str) -> str | None:
    """The first model setting the command uses that names nothing loadable here without a
    download (select: the scorer and the embedder; finetune and evaluate: the trained model)."""
    from slap_ray.assets import model_name_problem

    checks = []
    if command != "select" or not config.score.model:
        checks.append(("model.name", config.model.name, False))
    selects = command in ("select", "run", "sweep")
    if selects and config.score.model:
        checks.append(("score.model", config.score.model, False))
    if selects and config.strata.by == "embedding":
        checks.append(("embed.model", config.embed.model, True))
    for setting, name, embedder in checks:
        problem = model_name_problem(setting, name, embedder)
        if problem:
            return problem
    return None


def _entry(command: str, job: Callable[[], Callable[[SlapConfig], int]]):
    def main_for(argv: list[str] | None = None) -> int:
        config = _config_from(argv, command)
        if config is None:
            return 2
        problem = _model_problem(config, command)
        if problem:  # before Ray starts, not a minute into the run
            print(f"slap {command}: {problem}", file=sys.stderr)
            return 2
        _console_logging(command)
        try:
            return job()(config)  # heavy imports (Ray, torch) only when running
        except Exception as error:
            found = slap_error_in(error)
            if found is None:
                raise  # a real failure keeps its traceback
            print(f"slap {command}: {found.prefix}{found}", file=sys.stderr)
            return found.exit_code

    main_for.__doc__ = f"Entry point shared by `slap {command}` and `pipelines/{command}.py`."
    return main_for


def _select():
    from slap_ray.jobs.select import main_select

    return main_select


def _finetune():
    from slap_ray.jobs.finetune import main_finetune

    return main_finetune


def _run():
    from slap_ray.jobs.run import main_run

    return main_run


def _evaluate():
    from slap_ray.jobs.evaluate import main_evaluate

    return main_evaluate


def _sweep():
    from slap_ray.jobs.sweep import main_sweep

    return main_sweep


select_main = _entry("select", _select)
finetune_main = _entry("finetune", _finetune)
run_main = _entry("run", _run)
sweep_main = _entry("sweep", _sweep)
evaluate_main = _entry("evaluate", _evaluate)


def config_main(argv: list[str] | None = None) -> int:
    """`slap config [--config CFG] [overrides]`: the resolved settings, explained."""
    from slap_ray.config_help import describe

    config = _config_from(argv, "config")
    if config is None:
        return 2
    try:
        print("\n".join(describe(config)), flush=True)
    except BrokenPipeError:  # `slap config | head`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def export_main(argv: list[str] | None = None) -> int:
    from slap_ray.jobs.export import main_export

    return main_export(argv)


COMMANDS = {
    "select": select_main,
    "finetune": finetune_main,
    "run": run_main,
    "sweep": sweep_main,
    "evaluate": evaluate_main,
    "export": export_main,
    "config": config_main,
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: slap <command> [--config CFG ...] [dotted.key=value ...] [--resume]",
        "       slap export RUN_DIR --alpha A [--format jsonl|parquet|hf] --output PATH",
        "",
        "commands:",
        *(f"  {name.ljust(width)}  {SUMMARY[name]}" for name in COMMANDS),
        "",
        ALPHA,
        "`slap <command> --help` says what a command reads and writes.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        unknown = f"unknown command {argv[0]!r}; " if argv else ""
        print(f"slap: {unknown}choose one of {', '.join(COMMANDS)} (slap --help)", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
