"""KubeRay manifests in cluster/: every file and every rendered overlay valid against the CRDs
in ../shared/kuberay (strict: unknown fields are errors), consistent with the project (image,
Ray version, configs that load, actors that fit), and with the settings a safe deployment needs.
"""

from __future__ import annotations

import copy
import posixpath
import re
import shutil
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from manifests import (
    CLUSTER,
    CRD_KINDS,
    KUBERAY,
    REPO_ROOT,
    TARGETS,
    containers,
    job_command,
    job_configs,
    of_kind,
    only,
    render,
    rendered,
    require,
    validator,
    walk,
)

from slap_ray.resources import demands, warm_workers

GPU = "nvidia.com/gpu"
IMAGE = re.compile(
    r"^(?:.+/)?slap-ray:(?P<version>[^-]+)-ray(?P<ray>[\d.]+)-py(?P<py>\d+)(?P<gpu>-gpu)?$"
)
KUBERAY_NAME_LIMIT = 47  # RayJob/RayCluster names: KubeRay derives longer object names from them
MOUNT = "/runs"


@pytest.fixture(scope="module")
def validate() -> Callable[[dict], list[str]]:
    require(KUBERAY / "crds", "the manifest tests need ../shared/kuberay")
    return validator(KUBERAY)


def _files() -> list[tuple[Path, int, dict]]:
    """Every Kubernetes document kept as a file in cluster/ (patch files are not documents)."""
    out = []
    for path in sorted(CLUSTER.rglob("*.yaml")):
        for index, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                out.append((path, index, doc))
    return out


FILE_DOCS = [e for e in _files() if e[2]["kind"] in CRD_KINDS]


@pytest.mark.parametrize(
    "entry", FILE_DOCS, ids=[f"{e[0].relative_to(CLUSTER)}#{e[1]}" for e in FILE_DOCS]
)
def test_every_manifest_file_is_valid_against_its_crd(entry, validate):
    errors = validate(entry[2])
    assert not errors, f"{entry[0]}:\n  " + "\n  ".join(errors)


@pytest.mark.parametrize("target", TARGETS)
def test_every_rendered_overlay_is_valid_against_the_crds(target, validate):
    docs = rendered(target)
    assert {d["kind"] for d in docs} == {
        "ConfigMap",
        "PersistentVolumeClaim",
        "RayCluster",
        "RayJob",
    }
    checked = 0
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            errors = validate(doc)
            assert not errors, f"{target} {doc['kind']}/{doc['metadata']['name']}:\n  " + (
                "\n  ".join(errors)
            )
            checked += 1
    assert checked == 5  # the RayCluster and a RayJob per entry point


def test_upstream_samples_are_valid(validate):
    """Positive control: the strict validator accepts KubeRay's own samples."""
    checked = 0
    for path in sorted((KUBERAY / "samples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc and doc.get("kind") in CRD_KINDS:
                assert validate(doc) == [], path.name
                checked += 1
    assert checked >= 3


def test_a_planted_typo_in_a_file_fails_the_rendered_overlay(tmp_path, validate):
    """End to end: a misspelt field in the base reaches both overlays' RayJobs and is caught."""
    copied = tmp_path / "cluster"
    shutil.copytree(CLUSTER, copied)
    base = copied / "base" / "raycluster.yaml"
    base.write_text(base.read_text().replace("maxReplicas: 8", "maxReplica: 8"))
    for overlay in ("cpu-small", "gpu"):
        docs = render(copied / "overlays" / overlay)
        errors = [e for d in of_kind(docs, "RayJob") for e in validate(d)]
        assert any("'maxReplica' was unexpected" in e for e in errors), (overlay, errors)


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
    doc = copy.deepcopy(of_kind(rendered("overlays/gpu"), kind)[0])
    assert validate(doc) == []
    mutate(doc)
    errors = validate(doc)
    assert any(expected in e for e in errors), errors


# --- consistency with the project ----------------------------------------------------------------


def _pod_specs(docs) -> list[tuple[str, dict]]:
    out = []
    for doc in of_kind(docs, "RayCluster") + of_kind(docs, "RayJob"):
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        name = doc["metadata"]["name"]
        out.append((f"{name}/head", spec["headGroupSpec"]["template"]["spec"]))
        for group in spec["workerGroupSpecs"]:
            out.append((f"{name}/{group['groupName']}", group["template"]["spec"]))
        if doc["kind"] == "RayJob":
            out.append((f"{name}/submitter", doc["spec"]["submitterPodTemplate"]["spec"]))
    return out


@pytest.mark.parametrize("target", TARGETS)
def test_image_tags_and_ray_versions_match_the_project(target):
    from importlib.metadata import version

    ray_version = version("ray")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    python = f"{sys.version_info.major}{sys.version_info.minor}"
    docs = rendered(target)
    for doc in of_kind(docs, "RayCluster") + of_kind(docs, "RayJob"):
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec["rayVersion"] == ray_version, doc["metadata"]["name"]
    images = 0
    for doc in docs:
        for container in containers(doc):
            where = f"{target} {doc['metadata']['name']} {container['name']}"
            match = IMAGE.match(container["image"])
            assert match, f"{where}: {container['image']!r} is not a slap-ray image tag"
            assert (match["version"], match["ray"], match["py"]) == (project, ray_version, python)
            wants_gpu = GPU in container.get("resources", {}).get("limits", {})
            assert bool(match["gpu"]) == wants_gpu, f"{where}: -gpu image iff it asks for a GPU"
            images += 1
    assert images >= 10


@pytest.mark.parametrize("target", TARGETS)
def test_worker_containers_keep_idle_workers_warm_for_their_cpus(target):
    """Each worker group's container sets ``warm_workers(num-cpus)`` as ``RAY_<key>`` env, so an
    overlay that changes a group's CPUs must change its soft limit too."""
    cluster = only(rendered(target), "RayCluster")
    for group in cluster["spec"]["workerGroupSpecs"]:
        cpus = int(_cpus(group["rayStartParams"]["num-cpus"]))
        wanted = {f"RAY_{k}": str(v) for k, v in warm_workers(cpus).items()}
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert {k: env.get(k) for k in wanted} == wanted, (target, group["groupName"])


@pytest.mark.parametrize("target", TARGETS)
def test_every_rayjob_cleans_up_retries_and_runs_the_cluster_spec(target):
    docs = rendered(target)
    cluster = only(docs, "RayCluster")
    jobs = of_kind(docs, "RayJob")
    commands = sorted(job_command(j)[0] for j in jobs)
    assert commands == ["finetune", "run", "select", "sweep"]
    for doc in [cluster, *jobs]:
        assert len(doc["metadata"]["name"]) <= KUBERAY_NAME_LIMIT, doc["metadata"]["name"]
    for job in jobs:
        spec, name = job["spec"], job["metadata"]["name"]
        assert spec["submissionMode"] == "K8sJobMode", name
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert spec["activeDeadlineSeconds"] > 0, name
        assert spec["submitterConfig"]["backoffLimit"] >= 1, name
        assert spec["rayClusterSpec"] == cluster["spec"], f"{name}: not the RayCluster's spec"


@pytest.mark.parametrize("target", TARGETS)
def test_token_auth_and_locked_down_pods(target):
    docs = rendered(target)
    for doc in of_kind(docs, "RayCluster") + of_kind(docs, "RayJob"):
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    for where, pod in _pod_specs(docs):
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), where
    env = [e for d in docs for k, v in walk(d) if k == "env" for e in v]
    assert not [e for e in env if e["name"] == "RAY_AUTH_TOKEN" and "value" in e], (
        "a token value in a manifest: keep it in the slap-ray-auth Secret"
    )
    assert not of_kind(docs, "Secret"), "the token Secret is created by the user, not rendered"


@pytest.mark.parametrize("target", TARGETS)
def test_pods_mount_the_volume_and_the_head_the_configs(target):
    docs = rendered(target)
    pvc = only(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    configmap = only(docs, "ConfigMap")["metadata"]["name"]
    for where, pod in _pod_specs(docs):
        if where.endswith("/submitter"):
            continue
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        assert mounts[MOUNT]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        if where.endswith("/head"):
            assert mounts["/etc/slap-ray"]["configMap"]["name"] == configmap, where


@pytest.mark.parametrize("target", TARGETS)
def test_every_config_a_rayjob_names_loads(target, tmp_path):
    outputs = []
    for job, command, config in job_configs(rendered(target), tmp_path / "configs"):
        name = job["metadata"]["name"]
        assert posixpath.isabs(config.output_dir) and config.output_dir.startswith(MOUNT + "/")
        for pattern in config.data.paths + config.eval.paths:
            assert pattern.startswith(MOUNT + "/"), f"{name}: {pattern} is not on the volume"
        assert config.ray.storage_path.startswith(MOUNT + "/"), name
        if command == "finetune":
            assert config.train.selection_dir.startswith(MOUNT + "/"), name
        outputs.append(config.output_dir)
    assert len(set(outputs)) == len(outputs) == 4, "two jobs write into one output_dir"


# --- actors against the worker groups ------------------------------------------------------------


def _cpus(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _pods(cluster_spec: dict) -> list[dict[str, float]]:
    """The logical resources of every worker pod at maxReplicas (the head has 0 CPUs)."""
    pods = []
    for group in cluster_spec["workerGroupSpecs"]:
        params = group["rayStartParams"]
        pod = {"CPU": float(params["num-cpus"]), "GPU": float(params.get("num-gpus", 0))}
        pods += [dict(pod) for _ in range(group["maxReplicas"])]
    return pods


def _place(groups: list[tuple[str, int, dict[str, float]]], pods: list[dict[str, float]]) -> None:
    """First-fit: every actor of each group placed on one pod at once, else an error."""
    free = [dict(p) for p in pods]
    for settings, count, per_actor in groups:
        for _ in range(count):
            pod = next(
                (p for p in free if all(p.get(k, 0) >= v - 1e-9 for k, v in per_actor.items())),
                None,
            )
            assert pod is not None, f"{settings}: {count} x {per_actor} does not fit {pods}"
            for k, v in per_actor.items():
                pod[k] -= v


def _groups(config, command: str) -> list[list[tuple[str, int, dict[str, float]]]]:
    """Actor groups that run at the same time, one list per phase of the command."""
    phases = []
    if command in ("select", "run", "sweep"):
        phases += [[(d.settings, d.count, d.per_actor)] for d in demands(config, "select")]
    if command in ("finetune", "run"):
        phases += [[(d.settings, d.count, d.per_actor)] for d in demands(config, "finetune")]
    if command == "sweep":  # concurrent trials, each a Train worker group
        train = next(d for d in demands(config, "finetune") if d.settings.startswith("train."))
        trials = config.sweep.max_concurrent_trials
        phases.append(
            [
                (
                    f"sweep.max_concurrent_trials={trials}, {train.settings}",
                    train.count * trials,
                    train.per_actor,
                )
            ]
        )
    return phases


@pytest.mark.parametrize("target", TARGETS)
def test_every_rayjob_fits_its_overlays_worker_groups(target, tmp_path):
    for job, command, config in job_configs(rendered(target), tmp_path / "configs"):
        pods = _pods(job["spec"]["rayClusterSpec"])
        for phase in _groups(config, command):
            _place(phase, pods)


def test_the_fit_check_catches_an_actor_too_big_for_a_pod(tmp_path):
    jobs = job_configs(rendered("overlays/cpu-small"), tmp_path / "configs")
    job, _, config = next(j for j in jobs if j[1] == "select")
    config.score.num_cpus_per_scorer = 3.0  # a 2-CPU pod cannot hold it
    with pytest.raises(AssertionError, match="score.num_scorers=2"):
        for phase in _groups(config, "select"):
            _place(phase, _pods(job["spec"]["rayClusterSpec"]))
