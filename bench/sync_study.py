"""Copy a running study's publishable files from the worktree it runs in into this checkout.

    python bench/sync_study.py /work/study/docs/results/study_variants docs/results/study_variants

Skipped: Tune state, logs, Ray Train checkpoints, model weights, stage files and locks (what the
results folder's .gitignore leaves out); everything else is copied over, newest wins.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

SKIP_TOP = {"tune", "logs", ".slap-run.lock"}
SKIP_SELECTION = {"stages", "scored", "logs", ".slap-run.lock"}
SKIP_TRIAL = {"ray_train", "model", "logs", "plots", ".slap-run.lock"}


def skipped(relative: Path) -> bool:
    parts = relative.parts
    if parts[0] in SKIP_TOP:
        return True
    if parts[0] == "selection" and len(parts) > 1 and parts[1] in SKIP_SELECTION:
        return True
    return parts[0] == "trials" and len(parts) > 2 and parts[2] in SKIP_TRIAL


def sync(source: Path, target: Path) -> int:
    copied = 0
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_dir() or skipped(relative):
            continue
        destination = target / relative
        if destination.exists() and destination.stat().st_mtime >= path.stat().st_mtime:
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)
        copied += 1
    return copied


if __name__ == "__main__":
    print(f"{sync(Path(sys.argv[1]), Path(sys.argv[2]))} files copied")
