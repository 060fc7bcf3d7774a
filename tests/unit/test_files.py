"""Files a resumed job or a reader of partial results reads are replaced whole or not at all."""

import os

import pytest

from slap_ray.files import atomic_path, write_text_atomic


class Killed(Exception):
    pass


def test_a_writer_that_dies_midway_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "results.csv"
    target.write_text("alpha,eval_loss\n0.2,1.5\n")
    with pytest.raises(Killed), atomic_path(target) as tmp:
        tmp.write_text("alpha,eval")  # half of the new table
        raise Killed
    assert target.read_text() == "alpha,eval_loss\n0.2,1.5\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


def test_a_finished_write_replaces_the_file_with_the_umasks_mode(tmp_path):
    target = tmp_path / "prepare.json"
    write_text_atomic(target, "{}")
    write_text_atomic(target, '{"batches": 3}')
    assert target.read_text() == '{"batches": 3}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepare.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_the_temporary_is_hidden_and_never_matches_the_targets_glob(tmp_path):
    with atomic_path(tmp_path / "scored-000001.parquet") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.suffix == ".tmp"
        tmp.write_bytes(b"x")
        assert list(tmp_path.glob("scored-*.parquet")) == []
    assert [p.name for p in tmp_path.glob("scored-*.parquet")] == ["scored-000001.parquet"]
