"""Regression tests without Ray for issue 8's bugs: each failed on the code before the fix."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from filelock import FileLock

from slap_ray.cli import select_main
from slap_ray.config import ConfigError, SlapConfig, build_config
from slap_ray.core.model import device_for
from slap_ray.data.ingest import iter_raw_records
from slap_ray.data.rows import read_file_rows
from slap_ray.data.schemas import RowRejected, SchemaOptions, normalize_record
from slap_ray.errors import DeviceError, JobFailed, slap_error_in
from slap_ray.jobs.rundir import LOCK_FILE, locked_run_dir
from slap_ray.jobs.select import budget_warnings
from slap_ray.resources import check_fits

ROW = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = select_main(list(args))
    err = capsys.readouterr().err
    return code, err


# Bug 5: a GPU asked of a cluster without one, and a granted GPU torch cannot use.
def test_gpu_on_a_cpu_cluster_is_a_config_error_naming_the_setting():
    config = build_config({}, ["score.num_gpus_per_scorer=1"])
    with pytest.raises(ConfigError, match=r"score\.num_gpus_per_scorer=1.*GPU 1.*CPU 2"):
        check_fits(config, "select", {"CPU": 2.0, "memory": 1e9})
    with pytest.raises(ConfigError, match=r"train\.use_gpu=true"):
        check_fits(build_config({}, ["train.use_gpu=true"]), "finetune", {"CPU": 8.0})
    with pytest.raises(ConfigError, match=r"score\.num_scorers=3.*CPU 3"):
        check_fits(build_config({}, ["score.num_scorers=3"]), "select", {"CPU": 2.0})
    check_fits(build_config({}, ["score.num_scorers=2"]), "select", {"CPU": 2.0})


# A fixed tokenizer pool larger than the cluster waited for its actors forever (found by hand:
# `data.num_tokenizers=4` on 2 CPUs hung in tokenize). Tokenising now runs in tasks, which would
# only run 2 at once, but a setting the cluster cannot meet stays an error; unset asks nothing.
@pytest.mark.parametrize("command", ["select", "finetune"])
def test_a_tokenizer_pool_that_cannot_fit_is_a_config_error(command):
    with pytest.raises(ConfigError, match=r"data\.num_tokenizers=4: needs CPU 4.*CPU 2"):
        check_fits(build_config({}, ["data.num_tokenizers=4"]), command, {"CPU": 2.0})
    check_fits(build_config({}, ["data.num_tokenizers=2"]), command, {"CPU": 2.0})
    assert build_config({}, []).data.num_tokenizers is None
    check_fits(build_config({}, []), command, {"CPU": 2.0})


def test_granted_gpu_that_torch_cannot_see_is_an_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_for(False, "score.num_gpus_per_scorer") == "cpu"
    with pytest.raises(DeviceError, match=r"score\.num_gpus_per_scorer: a GPU was granted"):
        device_for(True, "score.num_gpus_per_scorer")
    from slap_ray.ray.scorer import Scorer, ScorerSettings

    config = SlapConfig(model={"name": "tiny-random"}, score={"num_gpus_per_scorer": 1})
    on_gpu = ScorerSettings.from_config(config, ())
    assert on_gpu.use_gpu
    with pytest.raises(DeviceError):
        Scorer(on_gpu)
    # How it reaches the CLI: an actor's failed constructor leaves only Ray's text; a task's
    # error is Ray's RayTaskError whose ``cause`` is ours; a job may chain it with ``from``.
    died = RuntimeError(
        "ray.exceptions.ActorDiedError: ...\n  File x\nslap_ray.errors.DeviceError: "
        "score.num_gpus_per_scorer: a GPU was granted but torch sees no CUDA device\n"
    )
    found = slap_error_in(died)
    assert isinstance(found, DeviceError) and found.exit_code == 2
    assert str(found).startswith("score.num_gpus_per_scorer: a GPU was granted")
    original = DeviceError("embed.num_gpus_per_actor: a GPU was granted")
    task_error = RuntimeError("ray task failed")
    task_error.cause = original
    assert slap_error_in(task_error) is original
    try:
        try:
            raise JobFailed("select: 1 scorer died; see logs/select.log")
        except JobFailed as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError as chained:
        assert slap_error_in(chained).exit_code == 1
    assert slap_error_in(RuntimeError("something else")) is None


# Bug 6: bad paths are one-line errors with exit status 2.
def test_glob_matching_nothing_and_empty_paths_are_one_line_errors(capsys, tmp_path):
    code, err = run_cli(
        capsys, f"data.paths=[{tmp_path}/nothing-*.jsonl]", f"output_dir={tmp_path}/out"
    )
    assert code == 2 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and "data.paths" in err and "nothing-*.jsonl" in err
    code, err = run_cli(capsys, "data.paths=[]", f"output_dir={tmp_path}/out")
    assert code == 2 and "data.paths" in err and "Traceback" not in err


# Bug 9: a second run into the same output_dir stops with a clear message.
def test_second_run_into_a_locked_output_dir_stops(capsys, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"id": "a", **ROW}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    with FileLock(out / LOCK_FILE, timeout=0):  # the first run holds it
        code, err = run_cli(capsys, f"data.paths=[{good}]", f"output_dir={out}")
    assert code == 2 and "is in use by another run" in err and "Traceback" not in err


def test_fresh_run_clears_what_it_owns_and_resume_keeps_it(tmp_path):
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "alpha-0.9.txt").write_text("stale\n")
    (tmp_path / "mine.txt").write_text("user file\n")
    with locked_run_dir(tmp_path, ("kept",), resume=True):
        assert (tmp_path / "kept" / "alpha-0.9.txt").exists()
    with locked_run_dir(tmp_path, ("kept",), resume=False):
        assert not (tmp_path / "kept").exists() and (tmp_path / "mine.txt").exists()


# Bug 11: ids that cannot round-trip through a line-based kept list are rejected.
@pytest.mark.parametrize("bad", ["two\nlines", "cr\rid", " padded", "trailing ", "ls\u2028x"])
def test_ids_that_cannot_round_trip_are_rejected(bad):
    with pytest.raises(RowRejected, match="cannot round-trip"):
        normalize_record({"id": bad, **ROW}, SchemaOptions(), "src")
    assert normalize_record({"id": "with space", **ROW}, SchemaOptions(), "src")["id"] == (
        "with space"
    )


# Bug 12: gzip inputs, empty files, formats checked up front, output_dir a file.
def test_gzip_jsonl_and_csv_read_like_plain_files(tmp_path):
    lines = [json.dumps({"id": f"r{i}", **ROW}) for i in range(3)]
    plain, packed = tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"
    plain.write_text("\n".join(lines) + "\n")
    with gzip.open(packed, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    assert [r.record for r in iter_raw_records(packed)] == [
        r.record for r in iter_raw_records(plain)
    ]
    csv_gz = tmp_path / "c.csv.gz"
    with gzip.open(csv_gz, "wt", encoding="utf-8") as handle:
        handle.write('id,prompt,response\nx1,hello,"hi, there"\n')
    rows = read_file_rows({"path": str(csv_gz)}, SchemaOptions(schema="prompt_response"), "auto")
    assert [(r["id"], r["reject_reason"]) for r in rows] == [("x1", None)]
    broken = tmp_path / "d.jsonl.gz"
    payload = "".join(
        json.dumps({"id": f"z{i}", "n": i * 7919 % 104729}) + "\n" for i in range(500)
    )
    whole = gzip.compress(payload.encode())
    broken.write_bytes(whole[: len(whole) // 2])  # a truncated download
    records = list(iter_raw_records(broken))
    assert records and records[-1].error and "unreadable compressed file" in records[-1].error


def test_unknown_format_and_file_as_output_dir_are_one_line_errors(capsys, tmp_path):
    odd = tmp_path / "data.txt.gz"
    odd.write_bytes(gzip.compress(b"x"))
    code, err = run_cli(capsys, f"data.paths=[{odd}]", f"output_dir={tmp_path}/out")
    assert code == 2 and "data.format" in err and "Traceback" not in err
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"id": "a", **ROW}) + "\n")
    afile = tmp_path / "afile"
    afile.write_text("")
    code, err = run_cli(capsys, f"data.paths=[{good}]", f"output_dir={afile}")
    assert code == 2 and "output_dir" in err and "not a directory" in err
    code, err = run_cli(capsys, f"data.paths=[{good}]", f"output_dir={afile}/sub")
    assert code == 2 and "output_dir" in err and "Traceback" not in err


# Bug 13: budgets that round to nothing or to everything are warned about.
def test_degenerate_budgets_are_warned():
    assert budget_warnings(build_config({}, ["select.alphas=[0.2,0.3]"])) == []
    warned = budget_warnings(build_config({}, ["select.alphas=[0.99]"]))
    assert len(warned) == 1 and "keeps 0 of every 32-row batch" in warned[0]
    warned = budget_warnings(build_config({}, ["select.batch_size=1", "select.alphas=[0.3]"]))
    assert len(warned) == 1 and "prunes nothing" in warned[0]


def test_empty_paths_setting_is_refused_by_the_config():
    with pytest.raises(ConfigError, match=r"data\.paths"):
        build_config({}, ["data.paths=[]"])
    with pytest.raises(ConfigError, match=r"eval\.paths"):
        build_config({}, ["eval.paths=[]"])


def test_rundir_lock_file_name_is_hidden():
    assert Path(LOCK_FILE).name.startswith(".")


def test_failed_cluster_work_is_one_line_with_exit_status_1(capsys):
    """A job that failed on the cluster (e.g. sweep trials) is not a user mistake: status 1,
    one line naming the log, no traceback."""
    from slap_ray import cli
    from slap_ray.errors import JobFailed

    def failing(config):
        raise JobFailed("sweep: 1 of 2 trial(s) failed (slap-a0.3-s0); see runs/x/logs/sweep.log")

    assert cli._entry("sweep", lambda: failing)([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "slap sweep: sweep: 1 of 2 trial(s) failed (slap-a0.3-s0); see runs/x/logs/sweep.log"
    ]


def test_shuffle_partitions_grow_with_the_pool_past_one_per_cpu():
    """A reduce task holds its whole partition: partitions fixed at the CPU count made each
    worker's memory grow with the pool."""
    from slap_ray.jobs.rows import ROWS_PER_SHUFFLE_PARTITION, partitions_for

    assert partitions_for(0, 0) == 1
    assert partitions_for(160, 2) == 2
    assert partitions_for(2 * ROWS_PER_SHUFFLE_PARTITION, 2) == 2
    assert partitions_for(2 * ROWS_PER_SHUFFLE_PARTITION + 1, 2) == 3
    assert partitions_for(1_000_000, 2) == -(-1_000_000 // ROWS_PER_SHUFFLE_PARTITION)
    assert partitions_for(1_000_000, 64) == 64
