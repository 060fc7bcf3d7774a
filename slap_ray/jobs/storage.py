"""Where Ray Train and Ray Tune keep a run's checkpoints and experiment state.

By default inside the run directory. With ``ray.storage_path`` set (a folder every node
mounts, or a pyarrow URI such as ``s3://bucket/slap`` or ``gs://bucket/slap``) under
``<storage_path>/<run name>-<hash of output_dir>/``: the same place for the same run, so a
restarted job (``--resume``) finds its checkpoints, and distinct places for distinct runs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.fs as pafs

from slap_ray.config import SlapConfig


def storage_for(config: SlapConfig, run_dir: Path, name: str) -> str:
    """The absolute path or URI of this run's ``name`` storage (``ray_train``, ``tune``).

    A fresh run (no ``resume``) starts from an empty one: Ray Train would otherwise restore a
    previous run's checkpoints from the same place.
    """
    root = config.ray.storage_path
    if root is None:
        location = str((run_dir / name).resolve())
    else:
        run = run_dir.resolve()
        digest = hashlib.sha1(str(run).encode()).hexdigest()[:10]
        root = root if "://" in root else str(Path(root).resolve())  # Ray wants absolute
        location = f"{root.rstrip('/')}/{run.name}-{digest}/{name}"
    if not config.resume:
        _remove(location)
    return location


def _remove(location: str) -> None:
    filesystem, path = pafs.FileSystem.from_uri(location)
    if filesystem.get_file_info(path).type != pafs.FileType.NotFound:
        filesystem.delete_dir(path)
