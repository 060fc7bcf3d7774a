"""slap_ray.core must stay importable without Ray: math in the core, Ray at the edges."""

import subprocess
import sys
from pathlib import Path

import slap_ray.core

CORE = Path(slap_ray.core.__file__).parent


def test_every_core_module_is_ray_free():
    modules = sorted(f"slap_ray.core.{p.stem}" for p in CORE.glob("*.py") if p.stem != "__init__")
    assert {"slap_ray.core.model", "slap_ray.core.training", "slap_ray.core.onpolicy"} <= set(
        modules
    )
    code = (
        f"import sys, importlib\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
