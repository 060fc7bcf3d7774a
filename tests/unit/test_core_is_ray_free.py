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


def test_no_module_uses_rays_private_api():
    """``ray._private`` changes without notice between minor releases (pyproject admits every
    Ray below 3): no module under slap_ray/ may import or name it."""
    import ast

    package = CORE.parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Attribute) and node.attr == "_private":
                names = ["ray._private"]
            if any(n == "ray._private" or n.startswith("ray._private.") for n in names):
                offenders.append(f"{path.relative_to(package.parent)}:{node.lineno}")
    assert not offenders, offenders
