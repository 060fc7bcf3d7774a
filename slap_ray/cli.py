"""The `slap` command: `slap select --config CFG [dotted.key=value ...] [--resume]`."""

from __future__ import annotations

import argparse
import sys

from slap_ray.config import ConfigError, load_config


def parse(argv: list[str] | None, command: str) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog=f"slap {command}", description=__doc__)
    parser.add_argument("--config", help="YAML config file (defaults when omitted)")
    parser.add_argument("--resume", action="store_true", help="reuse finished stages of output_dir")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. select.alphas=[0.3]")
    return parser.parse_args(argv), []


def select_main(argv: list[str] | None = None) -> int:
    """Entry point shared by `slap select` and `pipelines/select.py`."""
    args, _ = parse(argv, "select")
    try:
        config = load_config(args.config, args.overrides + (["resume=true"] if args.resume else []))
    except (ConfigError, OSError) as error:
        print(f"slap select: {error}", file=sys.stderr)
        return 2
    from slap_ray.select_job import main_select  # heavy imports (Ray, torch) only when running

    return main_select(config)


COMMANDS = {"select": select_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: slap {{{','.join(COMMANDS)}}} --config CFG [overrides]", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
