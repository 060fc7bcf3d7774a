"""Budget sweep job: `python pipelines/sweep.py` or `ray job submit ... -- python pipelines/sweep.py`."""

import sys

from slap_ray.cli import sweep_main


def main(argv: list[str] | None = None) -> int:
    return sweep_main(argv)


if __name__ == "__main__":
    sys.exit(main())
