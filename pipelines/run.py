"""select -> fine-tune -> evaluate -> report job: `python pipelines/run.py` or `ray job submit ... -- python pipelines/run.py`.

Named so that no file here shadows a standard-library module when this folder is sys.path[0].
"""

import sys

from slap_ray.cli import run_main


def main(argv: list[str] | None = None) -> int:
    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
