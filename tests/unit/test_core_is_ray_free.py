"""slap_ray.core must stay importable without Ray: math in the core, Ray at the edges."""

import subprocess
import sys


def test_core_does_not_import_ray():
    code = (
        "import sys, slap_ray.core.features, slap_ray.core.selection, slap_ray.core.strata, "
        "slap_ray.core.seeds; print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
