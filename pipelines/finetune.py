"""Ray Train fine-tuning job: `python pipelines/finetune.py` or `ray job submit ... -- python pipelines/finetune.py`.

Named so that no file here shadows a standard-library module when this folder is sys.path[0].
"""

import sys

from slap_ray.cli import finetune_main


def main(argv: list[str] | None = None) -> int:
    return finetune_main(argv)


if __name__ == "__main__":
    sys.exit(main())
