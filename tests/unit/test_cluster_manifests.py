"""KubeRay manifests in cluster/: valid against the CRD schemas, and consistent with the job.

Every RayCluster/RayJob document is validated against the `openAPIV3Schema` of the matching CRD
in ../shared/kuberay/crds (KubeRay v1.7.0) with `jsonschema` (a dependency of Ray), made as strict
as `kubectl apply`: the API server drops unknown fields and kubectl's default strict field
validation rejects them, so objects with `properties` are closed here; `x-kubernetes-list-type`
map/set uniqueness and `x-kubernetes-int-or-string` are checked too. CEL rules
(`x-kubernetes-validations`) and `format` are not evaluated; `metadata` is not checked beyond
the schema's `type: object`.
"""

from __future__ import annotations

import copy
import os
import posixpath
import re
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from slap_ray.cli import parse
from slap_ray.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER = REPO_ROOT / "cluster"
KUBERAY = Path(__file__).resolve().parents[2].parent / "shared" / "kuberay"
CRD_KINDS = {"RayCluster", "RayJob", "RayService"}
PLAIN_KINDS = {"PersistentVolumeClaim", "Pod"}
MOUNT = "/runs"
PVC_NAME = "slap-runs"
GPU = "nvidia.com/gpu"
IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)(?P<gpu>-gpu)?$")
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --- manifests -----------------------------------------------------------------------------------


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


MANIFESTS = sorted(CLUSTER.glob("*.yaml"))
DOCS = [(path, index, doc) for path in MANIFESTS for index, doc in enumerate(_documents(path))]
RAY_DOCS = [entry for entry in DOCS if entry[2].get("kind") in CRD_KINDS]


def _id(entry: tuple[Path, int, dict]) -> str:
    path, index, doc = entry
    return f"{path.name}#{index}:{doc.get('kind')}"


def _only(kind: str) -> dict:
    found = [doc for _, _, doc in DOCS if doc.get("kind") == kind]
    assert len(found) == 1, f"expected exactly one {kind} in cluster/*.yaml, found {len(found)}"
    return found[0]


def _cluster_specs() -> list[dict]:
    """The RayCluster spec of raycluster.yaml and of the RayJob's rayClusterSpec."""
    return [_only("RayCluster")["spec"], _only("RayJob")["spec"]["rayClusterSpec"]]


def _pod_specs() -> Iterator[tuple[str, dict]]:
    """Every pod spec that mounts the shared volume: Ray head and workers, and the setup pod."""
    for n, spec in enumerate(_cluster_specs()):
        yield f"cluster{n}/head", spec["headGroupSpec"]["template"]["spec"]
        for group in spec["workerGroupSpecs"]:
            yield f"cluster{n}/{group['groupName']}", group["template"]["spec"]
    for _, _, doc in DOCS:
        if doc["kind"] == "Pod":
            yield f"pod/{doc['metadata']['name']}", doc["spec"]


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    """(key, value) of every mapping entry, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _containers(doc: dict) -> list[dict]:
    return [c for key, value in _walk(doc) if key == "containers" for c in value]


def _cpus(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


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


def _require_kuberay() -> Path:
    if (KUBERAY / "crds").is_dir():
        return KUBERAY
    message = (
        f"{KUBERAY} is absent: the manifest schema tests need ../shared/kuberay beside the checkout"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def kuberay() -> Path:
    """The KubeRay CRDs and samples (reference data), read in place."""
    return _require_kuberay()


@pytest.fixture(scope="module")
def validate(kuberay) -> Callable[[dict], list[str]]:
    """`validate(doc)`: the schema errors of one RayCluster/RayJob/RayService document."""
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


# --- schema validation ---------------------------------------------------------------------------


def test_cluster_folder_has_the_expected_documents():
    kinds = sorted(doc.get("kind", "?") for _, _, doc in DOCS)
    assert {"RayCluster", "RayJob", "PersistentVolumeClaim"} <= set(kinds), kinds
    for path, index, doc in DOCS:
        assert doc.get("kind") in CRD_KINDS | PLAIN_KINDS, f"{path.name}#{index}: unexpected kind"
        assert doc.get("apiVersion") and doc.get("metadata", {}).get("name"), (path.name, index)


@pytest.mark.parametrize("entry", RAY_DOCS, ids=[_id(e) for e in RAY_DOCS])
def test_manifest_is_valid_against_its_crd(entry, validate):
    errors = validate(entry[2])
    assert not errors, f"{_id(entry)}:\n  " + "\n  ".join(errors)


def test_upstream_samples_are_valid(kuberay, validate):
    """Positive control: the strict validator accepts KubeRay's own samples."""
    checked = 0
    for path in sorted((kuberay / "samples").glob("*.yaml")):
        for doc in _documents(path):
            if doc.get("kind") in CRD_KINDS:
                assert validate(doc) == [], path.name
                checked += 1
    assert checked >= 3


_DELETE = object()


def _set(*path_and_value: Any) -> Callable[[dict], None]:
    *path, value = path_and_value

    def mutate(doc: dict) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return mutate


_HEAD_POD = ("spec", "headGroupSpec", "template", "spec")
_JOB_WORKERS = ("spec", "rayClusterSpec", "workerGroupSpecs")
BROKEN = {
    "replicas-not-integer": (
        "RayCluster",
        _set("spec", "workerGroupSpecs", 0, "replicas", "three"),
        "replicas: 'three' is not of type 'integer'",
    ),
    "unknown-group-field": (
        "RayCluster",
        _set("spec", "workerGroupSpecs", 0, "maxReplica", 3),
        "Additional properties are not allowed ('maxReplica' was unexpected)",
    ),
    "unknown-spec-field": (
        "RayJob",
        _set("spec", "entryPoint", "python x.py"),
        "Additional properties are not allowed ('entryPoint' was unexpected)",
    ),
    "rayStartParams-value-not-string": (
        "RayCluster",
        _set("spec", "workerGroupSpecs", 1, "rayStartParams", "num-gpus", 1),
        "1 is not of type 'string'",
    ),
    "missing-groupName": (
        "RayCluster",
        _set("spec", "workerGroupSpecs", 0, "groupName", _DELETE),
        "'groupName' is a required property",
    ),
    "enum": (
        "RayCluster",
        _set("spec", "autoscalerOptions", "upscalingMode", "Fast"),
        "'Fast' is not one of",
    ),
    "bad-quantity": (
        "RayCluster",
        _set(*_HEAD_POD, "containers", 0, "resources", "limits", "cpu", "two"),
        "'two' does not match",
    ),
    "port-not-integer": (
        "RayCluster",
        _set(*_HEAD_POD, "containers", 0, "ports", 1, "containerPort", "8265"),
        "'8265' is not of type 'integer'",
    ),
    "duplicate-container-name": (
        "RayCluster",
        _set(*_HEAD_POD, "containers", [{"name": "ray-head"}, {"name": "ray-head"}]),
        "duplicate entry {'name': 'ray-head'}",
    ),
    "bool-not-boolean": (
        "RayJob",
        _set("spec", "shutdownAfterJobFinishes", "yes"),
        "'yes' is not of type 'boolean'",
    ),
    "nested-cluster-spec": (
        "RayJob",
        _set(*_JOB_WORKERS, 1, "maxReplicas", 1.5),
        "maxReplicas: 1.5 is not of type 'integer'",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_manifest_is_rejected(case, validate):
    kind, mutate, expected = BROKEN[case]
    doc = copy.deepcopy(_only(kind))
    assert validate(doc) == []
    mutate(doc)
    errors = validate(doc)
    assert any(expected in e for e in errors), errors


# --- consistency with the project ----------------------------------------------------------------


def test_images_and_ray_versions_match_installed_ray():
    import ray

    python = f"{sys.version_info.major}{sys.version_info.minor}"
    for spec in _cluster_specs():
        assert spec["rayVersion"] == ray.__version__
    for path, index, doc in DOCS:
        for container in _containers(doc):
            where = f"{path.name}#{index} container {container['name']}"
            match = IMAGE.match(container["image"])
            assert match, f"{where}: {container['image']!r} is not a rayproject/ray image tag"
            assert match["ray"] == ray.__version__, f"{where}: Ray {match['ray']}"
            assert match["py"] == python, f"{where}: py{match['py']} but tests run py{python}"
            wants_gpu = GPU in container.get("resources", {}).get("limits", {})
            assert bool(match["gpu"]) == wants_gpu, f"{where}: -gpu image iff it requests a GPU"


def test_every_pod_mounts_the_shared_volume_and_sets_the_env():
    for where, pod in _pod_specs():
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert MOUNT in mounts, f"{where}: {MOUNT} is not mounted"
            claim = volumes[mounts[MOUNT]]["persistentVolumeClaim"]["claimName"]
            assert claim == PVC_NAME, where
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env.get("HF_HUB_OFFLINE") == "1", where
            assert env.get("SLAP_CACHE_DIR", "").startswith(MOUNT + "/"), where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), (where, kind)


def test_pvc_is_shared_and_every_claim_resolves():
    pvc = _only("PersistentVolumeClaim")
    assert pvc["apiVersion"] == "v1" and pvc["metadata"]["name"] == PVC_NAME
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"]
    claims = {
        v["claimName"] for _, _, doc in DOCS for k, v in _walk(doc) if k == "persistentVolumeClaim"
    }
    assert claims == {PVC_NAME}


def test_head_and_worker_groups():
    for spec in _cluster_specs():
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"
        assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
        ports = [p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]]
        assert 8265 in ports
        assert spec["enableInTreeAutoscaling"] is True
        kinds = set()
        for group in spec["workerGroupSpecs"]:
            name, params = group["groupName"], group["rayStartParams"]
            assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], name
            assert group["minReplicas"] < group["maxReplicas"], f"{name}: no room to autoscale"
            (container,) = group["template"]["spec"]["containers"]
            limits = container["resources"]["limits"]
            assert float(params["num-cpus"]) <= _cpus(limits["cpu"]), name
            gpus = int(limits.get(GPU, 0))
            assert float(params.get("num-gpus", 0)) == gpus, f"{name}: num-gpus vs {GPU}"
            kinds.add("gpu" if gpus else "cpu")
        assert kinds == {"cpu", "gpu"}


def _job() -> tuple[dict, dict, list[str]]:
    job = _only("RayJob")
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    return job, runtime_env, shlex.split(job["spec"]["entrypoint"])


def test_rayjob_settings_and_cluster_mirror_raycluster():
    job, _, _ = _job()
    spec = job["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["rayClusterSpec"] == _only("RayCluster")["spec"], (
        "rayjob-select.yaml's rayClusterSpec drifted from raycluster.yaml's spec"
    )


def test_rayjob_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    _, runtime_env, _ = _job()
    RuntimeEnv(**runtime_env)  # Ray's own parser: unknown fields and bad values raise
    assert runtime_env["working_dir"].startswith(f"local://{MOUNT}/")
    assert runtime_env["py_executable"].startswith(f"{MOUNT}/")
    assert runtime_env["env_vars"]["PATH"].startswith(
        posixpath.dirname(runtime_env["py_executable"])
    )


def test_rayjob_entrypoint_runs_an_existing_pipeline_with_a_valid_config():
    _, runtime_env, argv = _job()
    assert argv[0] == "python", argv
    script = argv[1]
    assert script.startswith("pipelines/") and (REPO_ROOT / script).is_file(), script
    args = parse(argv[2:], "select")  # the job's own CLI parser
    assert args.config and (REPO_ROOT / args.config).is_file(), args.config
    config = load_config(REPO_ROOT / args.config, args.overrides)

    working_dir = runtime_env["working_dir"].removeprefix("local://")
    assert posixpath.isabs(config.output_dir) and config.output_dir.startswith(MOUNT + "/")
    for pattern in config.data.paths:
        if not pattern.startswith("embedded:"):
            on_node = posixpath.normpath(posixpath.join(working_dir, pattern))
            assert on_node.startswith(MOUNT + "/"), f"{pattern} is not on the shared volume"


def test_rayjob_actors_fit_the_worker_groups():
    """Scorers and embedders ask for no more than the worker groups can offer at maxReplicas."""
    job, _, argv = _job()
    args = parse(argv[2:], "select")
    config = load_config(REPO_ROOT / args.config, args.overrides)
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(g["maxReplicas"] * float(g["rayStartParams"].get("num-gpus", 0)) for g in groups)
    cpus = sum(g["maxReplicas"] * float(g["rayStartParams"]["num-cpus"]) for g in groups)
    gpus_per_pod = max(float(g["rayStartParams"].get("num-gpus", 0)) for g in groups)
    actors = [
        (config.score.num_scorers, config.score.num_gpus_per_scorer),
        (config.embed.num_actors, config.embed.num_gpus_per_actor),
    ]
    for count, per_actor in actors:
        if per_actor:
            assert per_actor <= gpus_per_pod and count * per_actor <= gpus, (count, per_actor)
        else:
            assert count <= cpus, count  # CPU actors take one CPU each
