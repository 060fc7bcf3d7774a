"""slap_ray.core and slap_ray.data must stay importable without Ray: math and row logic in the
core and data layers, Ray at the edges."""

import subprocess
import sys
from pathlib import Path

import slap_ray.core
import slap_ray.data

CORE = Path(slap_ray.core.__file__).parent


def _modules(package) -> list[str]:
    folder = Path(package.__file__).parent
    return sorted(
        f"{package.__name__}.{p.stem}" for p in folder.glob("*.py") if p.stem != "__init__"
    )


def test_every_core_and_data_module_is_ray_free():
    core, data = _modules(slap_ray.core), _modules(slap_ray.data)
    assert {"slap_ray.core.model", "slap_ray.core.training", "slap_ray.core.onpolicy"} <= set(core)
    assert {"slap_ray.data.ingest", "slap_ray.data.rows"} <= set(data)
    code = (
        f"import sys, importlib\nfor m in {core + data!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _private_ray_names(node) -> list[str]:
    """Ray modules that ``node`` imports or names, where private (``ray._<name>``)."""
    import ast

    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        module = node.module or ""
        names = [module] + [f"{module}.{alias.name}" for alias in node.names]
    elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        names = [f"{node.value.id}.{node.attr}"]
    else:
        return []
    return [n for n in names if n.split(".")[0] == "ray" and n.count(".") and
            n.split(".")[1].startswith("_")]  # fmt: skip


def test_no_module_uses_rays_private_api():
    """Ray's private modules (``_private``, ``_raylet``, ...) change without notice between minor
    releases (pyproject admits every Ray below 3): no module under slap_ray/ imports or names
    one."""
    import ast

    package = CORE.parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        offenders += [
            f"{path.relative_to(package.parent)}:{node.lineno}"
            for node in ast.walk(tree)
            if _private_ray_names(node)
        ]

    def flagged(source: str) -> bool:
        return any(_private_ray_names(node) for node in ast.walk(ast.parse(source)))

    # the check sees each way of reaching a private module, and passes public imports
    assert flagged("from ray import _raylet") and flagged("import ray._private.worker")
    assert flagged("ray._private.worker.print_to_stdstream = None")
    assert not flagged("from ray.train import Checkpoint\nray.data.read_parquet(p)")
    assert not offenders, offenders
