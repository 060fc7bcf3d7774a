"""The KubeRay manifests of cluster/, as tests see them: rendered overlays, a strict schema
validator for the CRDs in ../shared/kuberay, and the config each RayJob runs.

Validation is as strict as `kubectl apply`: the API server drops unknown fields and kubectl's
default strict field validation rejects them, so objects with `properties` are closed here;
`x-kubernetes-list-type` map/set uniqueness and `x-kubernetes-int-or-string` are checked too.
CEL rules (`x-kubernetes-validations`) and `format` are not evaluated; `metadata` is typed only
as an object by the CRDs.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER = REPO_ROOT / "cluster"
KUBERAY = REPO_ROOT.parent / "shared" / "kuberay"
CRD_KINDS = {"RayCluster", "RayJob", "RayService"}
TARGETS = ("base", "overlays/cpu-small", "overlays/gpu")
CONFIG_MOUNT = "/etc/slap-ray"
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def require(path: Path, what: str) -> Path:
    """``path``, else skip (locally) or fail (CI=true) naming what is missing."""
    if path.exists():
        return path
    message = f"{path} is absent: {what}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        require(Path("/nonexistent/kubectl"), "kubectl renders the kustomize overlays")
    return found


def render(folder: Path) -> list[dict]:
    """``kubectl kustomize folder``: the documents an overlay applies."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {folder}: {result.stderr.strip()}"
    return [d for d in yaml.safe_load_all(result.stdout) if d is not None]


@cache
def rendered(target: str) -> tuple[dict, ...]:
    return tuple(render(CLUSTER / target))


def of_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def only(docs, kind: str) -> dict:
    (found,) = of_kind(docs, kind)
    return found


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    """(key, value) of every mapping entry, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def containers(doc: dict) -> list[dict]:
    return [c for key, value in walk(doc) if key == "containers" for c in value]


# --- a strict validator for CRD schemas ----------------------------------------------------------


def _strict(schema: Any) -> Any:
    """A copy of a structural schema in which every object with `properties` rejects unknown keys.

    Unless the schema already says what extra keys may be (`additionalProperties`) or keeps them
    (`x-kubernetes-preserve-unknown-fields`).
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_strict(s) for s in out[key]]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _int_or_string(validator, value, instance, schema):
    if value and (isinstance(instance, bool) or not isinstance(instance, int | str)):
        yield jsonschema.ValidationError(f"{instance!r} is neither an integer nor a string")


def _list_type(validator, value, instance, schema):
    """`x-kubernetes-list-type`: `set` items are unique, `map` items are unique by their keys."""
    if not isinstance(instance, list) or value not in ("set", "map"):
        return
    if value == "set":
        for index, item in enumerate(instance):
            if item in instance[:index]:
                yield jsonschema.ValidationError(f"duplicate entry {item!r} in a list-type set")
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    defaults = schema.get("items", {}).get("properties", {})
    seen: dict[tuple, int] = {}
    for index, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k, defaults.get(k, {}).get("default")) for k in keys)
        if key in seen:
            shown = dict(zip(keys, key, strict=True))
            yield jsonschema.ValidationError(
                f"duplicate entry {shown} (x-kubernetes-list-map-keys) at {seen[key]} and {index}"
            )
        seen[key] = index


def _preserve_unknown_fields(validator, value, instance, schema):
    return iter(())  # handled by _strict: such objects stay open


K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator,
    {
        "x-kubernetes-int-or-string": _int_or_string,
        "x-kubernetes-list-type": _list_type,
        "x-kubernetes-preserve-unknown-fields": _preserve_unknown_fields,
    },
)


def validator(kuberay: Path) -> Callable[[dict], list[str]]:
    """``check(doc)``: the schema errors of one RayCluster/RayJob/RayService document."""
    raw: dict[tuple[str, str], dict] = {}
    for path in sorted((kuberay / "crds").glob("*.yaml")):
        crd = yaml.load(path.read_text(encoding="utf-8"), Loader=_LOADER)
        kind, group = crd["spec"]["names"]["kind"], crd["spec"]["group"]
        for version in crd["spec"]["versions"]:
            raw[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    validators: dict[tuple[str, str], Any] = {}

    def check(doc: dict) -> list[str]:
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key not in raw:
            return [f"no CRD for apiVersion={key[0]!r} kind={key[1]!r} in {kuberay / 'crds'}"]
        if key not in validators:
            validators[key] = K8sValidator(_strict(raw[key]))
        return sorted(
            f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validators[key].iter_errors(doc)
        )

    return check


# --- the config a RayJob runs --------------------------------------------------------------------


def job_command(job: dict) -> tuple[str, list[str], list[str]]:
    """``(command, config files, overrides)`` of a RayJob's ``slap <command> ...`` entrypoint."""
    from slap_ray.cli import parse

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "slap", (
        f"{job['metadata']['name']}: entrypoint must run `slap`, not {argv[0]}"
    )
    args = parse(argv[2:], argv[1])
    overrides = args.overrides + (["resume=true"] if args.resume else [])
    return argv[1], list(args.config or []), overrides


def write_configs(docs, folder: Path) -> Path:
    """The ConfigMap mounted at CONFIG_MOUNT, written out as files into ``folder``."""
    configmap = only(docs, "ConfigMap")
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in configmap["data"].items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def local_paths(paths: list[str], config_dir: Path) -> list[str]:
    """Config paths on the head (CONFIG_MOUNT/...) mapped to ``config_dir``."""
    for path in paths:
        assert path.startswith(CONFIG_MOUNT + "/"), f"{path} is not in the ConfigMap mount"
    return [str(config_dir / Path(p).name) for p in paths]


def job_configs(docs, folder: Path) -> list[tuple[dict, str, Any]]:
    """``(job, command, config)`` of every RayJob, its configs read from the rendered ConfigMap
    (written into ``folder``) with its overrides applied."""
    from slap_ray.config import load_config

    config_dir = write_configs(docs, folder)
    out = []
    for job in of_kind(docs, "RayJob"):
        command, paths, overrides = job_command(job)
        out.append((job, command, load_config(local_paths(paths, config_dir), overrides)))
    return out
