"""Selection that scales past one machine: the driver never collects per-row data, a multi-node
cluster selects what one node selects with scorers on every node, and the selected rows go out
in formats other trainers read."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import ray
from ray.data import Dataset
from selections import kept_ids, tiny_config

from slap_ray.jobs.export import main_export
from slap_ray.jobs.select import run_select

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
ROW_COLUMNS = {"id", "path", "messages", "input_ids", "labels", "raw"}
CONSUMERS = ("to_pandas", "take", "take_all", "take_batch", "iter_rows", "iter_batches")


def _synthetic_pool(folder: Path, rows: int) -> str:
    """``rows`` short two-turn conversations over 4 sources (one file each)."""
    folder.mkdir(parents=True)
    for source in range(4):
        with (folder / f"src{source}.jsonl").open("w", encoding="utf-8") as handle:
            for i in range(source, rows, 4):
                messages = [
                    {"role": "user", "content": f"Question {i} about topic {i % 7}?"},
                    {"role": "assistant", "content": f"Answer {i}: " + "word " * (i % 11 + 1)},
                ]
                handle.write(json.dumps({"id": f"syn-{i:06d}", "messages": messages}) + "\n")
    return str(folder / "*.jsonl")


# The shared tiny config with cheap strata, one alpha and long micro-batches: these tests read
# what reaches the driver and what goes out, not the strata.
CHEAP = {
    "data.max_length": 64, "strata.by": "source", "select.alphas": [0.3],
    "select.calibration_batches": 1, "score.micro_batch_size": 16,
}  # fmt: skip


def _config(paths: list[str], out: Path, **extra):
    return tiny_config(paths, out, **{**CHEAP, **extra})


class _DriverRows:
    """Counts rows holding per-row columns that Ray Data hands to the driver (outermost
    calls only: ``to_pandas`` iterates batches itself)."""

    def __init__(self) -> None:
        self.rows = 0
        self.depth = 0

    def wrap(self, name: str, method):
        def counted(ds: Dataset, *args, **kwargs):
            self.depth += 1
            try:
                result = method(ds, *args, **kwargs)
            finally:
                self.depth -= 1
            if self.depth:
                return result
            if name in ("iter_rows", "iter_batches"):
                return self._counting(result)
            self._count(result)
            return result

        return counted

    def _counting(self, iterator):
        for item in iterator:
            self._count(item)
            yield item

    def _count(self, result) -> None:
        if isinstance(result, list):  # take / take_all: a list of row dicts
            for row in result:
                self._count(row)
        elif isinstance(result, pa.Table):
            self.rows += result.num_rows if ROW_COLUMNS & set(result.column_names) else 0
        elif isinstance(result, pd.DataFrame):
            self.rows += len(result) if ROW_COLUMNS & set(result.columns) else 0
        elif isinstance(result, Mapping) and ROW_COLUMNS & set(result):
            first = next(iter(result.values()))
            # a row (iter_rows, take) or a batch of columns (iter_batches, take_batch)
            self.rows += len(first) if isinstance(first, (list, np.ndarray)) else 1


def test_driver_never_collects_per_row_data(ray_cluster, tmp_path, monkeypatch):
    """Per-row data reaching the driver through Ray Data is zero (counted at one pool size:
    any collect counts each row, so a collect of any size shows)."""
    rows = 800
    counter = _DriverRows()
    with monkeypatch.context() as patch:
        for name in CONSUMERS:
            patch.setattr(Dataset, name, counter.wrap(name, getattr(Dataset, name)))
        pool = _synthetic_pool(tmp_path / "pool", rows)
        run_select(_config([pool], tmp_path / "run"))
    scores = pd.read_parquet(tmp_path / "run" / "scores.parquet")
    assert len(scores) == rows and scores["loss"].notna().all()
    assert counter.rows == 0


def test_the_counter_sees_a_collect(ray_cluster, monkeypatch):
    """The check above can fail: collecting ids on the driver is counted."""
    counter = _DriverRows()
    monkeypatch.setattr(Dataset, "to_pandas", counter.wrap("to_pandas", Dataset.to_pandas))
    ray.data.from_items([{"id": str(i)} for i in range(30)]).to_pandas()
    assert counter.rows == 30
    monkeypatch.setattr(Dataset, "iter_rows", counter.wrap("iter_rows", Dataset.iter_rows))
    assert len(list(ray.data.from_items([{"path": "p"}] * 5).iter_rows())) == 5
    assert counter.rows == 35


MULTINODE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import slap_ray.ray.runtime  # keeps Ray on the loopback address
    from slap_ray.resources import warm_workers
    from ray.cluster_utils import Cluster
    from slap_ray.config import load_config
    from slap_ray.jobs.select import run_select
    import pandas as pd

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": 100 * 2**20,
                        "_system_config": warm_workers(1)},
    )
    workers = [cluster.add_node(num_cpus=1, object_store_memory=150 * 2**20) for _ in range(2)]
    cluster.wait_for_nodes()
    config = load_config(sys.argv[1], [f"ray.address={cluster.address}"])
    run_select(config)
    nodes = set()
    for path in Path(config.output_dir, "scored").glob("scored-*.parquet"):
        nodes |= set(pd.read_parquet(path, columns=["scorer_node"])["scorer_node"])
    print(json.dumps({"scorer_nodes": sorted(nodes),
                      "workers": sorted(w.node_id for w in workers)}))
    import ray
    ray.shutdown()
    cluster.shutdown()
    """
)


def test_multi_node_cluster_selects_what_one_node_selects(baseline_run, tmp_path, pool_subset):
    """A head with no CPUs and two 1-CPU worker nodes: the one-node baseline's kept ids (embedding
    strata, calibration, every alpha), with scorers on both nodes."""
    import yaml

    from slap_ray.config import config_to_dict

    paths = [str(pool_subset / "*.jsonl")]
    many = tiny_config(paths, tmp_path / "many", **{"score.num_scorers": 2})
    config_path = tmp_path / "many.yaml"
    config_path.write_text(yaml.safe_dump(config_to_dict(many)))
    script = tmp_path / "multinode.py"
    script.write_text(MULTINODE)
    done = subprocess.run(
        [sys.executable, str(script), str(config_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    placed = json.loads(done.stdout.strip().splitlines()[-1])
    assert placed["scorer_nodes"] == placed["workers"]
    assert all(kept_ids(baseline_run).values())
    assert kept_ids(tmp_path / "many") == kept_ids(baseline_run)


def test_export_round_trip_reselects_the_same_rows(baseline_run, tmp_path, pool_subset, capsys):
    first = baseline_run
    exported = tmp_path / "kept.jsonl"
    assert main_export([str(first), "--alpha", "0.3", "--output", str(exported)]) == 0
    kept = (first / "kept" / "alpha-0.3.txt").read_text().split()
    records = [json.loads(line) for line in exported.open(encoding="utf-8")]
    assert sorted(r["id"] for r in records) == kept
    original = {
        json.loads(line)["id"]: json.loads(line)
        for f in pool_subset.glob("*.jsonl")
        for line in f.open()
    }
    for record in records:
        assert record["messages"] == original[record["id"]]["messages"]

    second = tmp_path / "second"
    run_select(_config([str(exported)], second))
    rows = pd.read_parquet(second / "scores.parquet")
    assert sorted(rows["id"]) == kept and rows["reject_reason"].isna().all()
    again = tmp_path / "again.jsonl"
    assert main_export([str(second), "--alpha", "0.3", "--output", str(again)]) == 0
    for line in again.open(encoding="utf-8"):
        record = json.loads(line)
        assert record["messages"] == original[record["id"]]["messages"]
        assert (record["source"], record["task"]) == (
            original[record["id"]]["source"],
            original[record["id"]]["task"],
        )
    for fmt, target in (("parquet", tmp_path / "kept.parquet"), ("hf", tmp_path / "hf")):
        assert (
            main_export([str(first), "--alpha", "0.3", "--format", fmt, "--output", str(target)])
            == 0
        )
    assert sorted(pd.read_parquet(tmp_path / "kept.parquet")["id"]) == kept
    from datasets import load_from_disk

    assert sorted(load_from_disk(str(tmp_path / "hf"))["id"]) == kept
    assert main_export([str(first), "--alpha", "0.5", "--output", str(again)]) == 2
    assert "--alpha 0.5" in capsys.readouterr().err


def test_compose_in_key_buckets_places_rows_as_whole_strata_do(ray_cluster):
    """Strata larger than ``group_rows`` are ranked in key buckets on several tasks; the batch
    of every row is the one the pure ``compose_batches`` gives over the whole pool."""
    from slap_ray.core.strata import compose_batches
    from slap_ray.ray.pool import compose

    rng = np.random.default_rng(5)
    frame = pd.DataFrame({"id": [f"row-{i}" for i in range(700)], "path": "pool.jsonl"})
    frame["line"] = np.arange(1, 701)
    frame["cluster"] = rng.choice(3, size=700, p=[0.6, 0.3, 0.1])
    expected = compose_batches(frame["id"].tolist(), frame["cluster"].to_numpy(), 16, seed=11)
    dataset = ray.data.from_pandas(frame).repartition(7).materialize()
    for group_rows in (10**9, 32):  # one group per stratum; 16 key buckets per stratum
        composed, batches = compose(dataset, 16, seed=11, partitions=3, group_rows=group_rows)
        placed = composed.to_pandas().sort_values("line")
        assert batches == -(-700 // 16)
        np.testing.assert_array_equal(placed["batch_id"].to_numpy(), expected)
