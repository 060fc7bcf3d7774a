"""SLAP finetune job: run in-process or with `ray job submit ... -- python pipelines/finetune.py`."""

import os
import sys

# Run as a script, this folder is sys.path[0], and this file would shadow the stdlib `select`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from slap_ray.cli import finetune_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return finetune_main(argv)


if __name__ == "__main__":
    sys.exit(main())
