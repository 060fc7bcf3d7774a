"""SLAP offline selection job: `python pipelines/slap_select.py` or `ray job submit ... -- python pipelines/slap_select.py`.

Named so that no file here shadows a standard-library module when this folder is sys.path[0].
"""

import sys

from slap_ray.cli import select_main


def main(argv: list[str] | None = None) -> int:
    return select_main(argv)


if __name__ == "__main__":
    sys.exit(main())
