"""The manifest records, per stage, the driver's peak memory so far."""

from __future__ import annotations

import json
import subprocess
import sys

# In a fresh program: the test session's own earlier peak (a model loaded by another test)
# would hide the allocation. The parent grows first, so a peak it passed on (as Linux's
# ru_maxrss does across exec) fails the test.
STAGES = """
import sys
from pathlib import Path
from slap_ray.reporting.manifest import Manifest

manifest = Manifest("select")
with manifest.stage("small"):
    pass
with manifest.stage("big"):
    block = bytearray(300 * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page so it is resident
    del block
with manifest.stage("after"):
    pass
manifest.write(Path(sys.argv[1]))
"""


def test_each_stage_records_the_driver_peak_it_reached(tmp_path):
    path = tmp_path / "manifest.json"
    parent_peak = bytearray(600 * 2**20)
    parent_peak[::4096] = b"x" * len(parent_peak[::4096])
    del parent_peak
    subprocess.run([sys.executable, "-c", STAGES, str(path)], check=True)
    peaks = json.loads(path.read_text())["driver_peak_rss_gib"]
    assert list(peaks) == ["small", "big", "after"]
    assert peaks["big"] - peaks["small"] >= 0.25
    assert peaks["after"] == peaks["big"]  # a running peak: freeing memory does not lower it
