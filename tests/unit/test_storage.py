"""Ray Train/Tune storage locations: in the run directory, or under ray.storage_path."""

from __future__ import annotations

from slap_ray.config import load_config
from slap_ray.jobs.storage import storage_for


def test_default_storage_is_inside_the_run_directory(tmp_path):
    assert storage_for(load_config(), tmp_path / "run", "ray_train") == str(
        (tmp_path / "run" / "ray_train").resolve()
    )


def test_shared_storage_is_stable_per_run_and_distinct_between_runs(tmp_path):
    shared = [f"ray.storage_path={tmp_path}/store"]
    resume = load_config(None, [*shared, "resume=true"])
    first = storage_for(resume, tmp_path / "a" / "run", "tune")
    assert first.startswith(f"{tmp_path}/store/run-") and first.endswith("/tune")
    assert storage_for(resume, tmp_path / "a" / "run", "tune") == first
    assert storage_for(resume, tmp_path / "b" / "run", "tune") != first  # same name, other dir


def test_a_fresh_run_empties_its_storage_and_a_resumed_one_keeps_it(tmp_path):
    shared = [f"ray.storage_path={tmp_path}/store"]
    location = storage_for(load_config(None, [*shared, "resume=true"]), tmp_path / "r", "x")
    checkpoint = tmp_path / location / "checkpoint"
    checkpoint.mkdir(parents=True)
    storage_for(load_config(None, [*shared, "resume=true"]), tmp_path / "r", "x")
    assert checkpoint.exists()
    storage_for(load_config(None, shared), tmp_path / "r", "x")
    assert not checkpoint.exists()


def test_uri_storage_keeps_its_scheme(tmp_path):
    config = load_config(None, ["ray.storage_path=file:///tmp/slap-store/", "resume=true"])
    assert storage_for(config, tmp_path / "run", "ray_train").startswith(
        "file:///tmp/slap-store/run-"
    )
