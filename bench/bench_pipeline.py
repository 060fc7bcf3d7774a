"""Benchmarks of the Ray selection pipeline (results in docs/performance.md).

    python bench/bench_pipeline.py scoring --rows 256     # Ray (1 and 2 scorers) vs plain loop
    python bench/bench_pipeline.py embed-chitchat         # embed + strata over all chitchat pairs

`scoring`: the same rows, config and core functions, (a) through the Ray job with 1 scorer,
(b) with 2 scorers, (c) in a plain single-process Python loop (torch limited to 1 thread, as
one scorer actor is). Reported: scoring-stage rows/s and end-to-end wall time.
`embed-chitchat`: Ray Data read -> MiniLM embedding (actor pool) -> k-means fit on a sample ->
cluster assignment over all ~131k adjacent pairs; wall time and peak memory (RSS of every
process on the machine that belongs to this run, sampled every 0.5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
POOL = REPO.parent / "shared" / "data" / "pool"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


class PeakMemory:
    """Samples the summed RSS of this process and all its descendants (Ray workers included)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def subset(rows: int, folder: Path) -> list[str]:
    """The first rows/8 lines of each pool file, written to a temp folder (never the repo)."""
    files = sorted(POOL.glob("*.jsonl"))
    per_file = max(1, rows // len(files))
    for source in files:
        with source.open(encoding="utf-8") as handle:
            (folder / source.name).write_text("".join(next(handle) for _ in range(per_file)))
    return [str(folder / f.name) for f in files]


def scoring_config(paths: list[str], out: Path, model: str, scorers: int):
    from slap_ray.config import build_config

    return build_config(
        {
            "output_dir": str(out),
            "progress": False,
            "data": {"paths": paths, "max_length": 256},
            "model": {"name": model},
            "embed": {"max_chars": 512},
            "strata": {"num_clusters": 4},
            "select": {"batch_size": 32, "calibration_batches": 2},
            "score": {"num_scorers": scorers, "micro_batch_size": 8},
            "ray": {"num_cpus": 2, "object_store_memory": 300 * 1024 * 1024},
        }
    )


def ray_run(config) -> dict:
    from slap_ray.jobs.select import run_select

    start = time.perf_counter()
    run_select(config)
    wall = time.perf_counter() - start
    manifest = json.loads((Path(config.output_dir) / "manifest.json").read_text())
    rows = manifest["counts"]["score"]["rows_scored_now"]
    return {
        "wall_s": round(wall, 1),
        "score_s": manifest["timings_s"]["score"],
        "score_rows_per_s": round(rows / manifest["timings_s"]["score"], 3),
        "timings_s": manifest["timings_s"],
    }


def loop_run(config, prepared_path: Path) -> dict:
    """The same core calls as the scorer actor, in one process: calibrate, then every batch."""
    import pandas as pd
    import torch

    from slap_ray.assets import load_causal_lm, load_tokenizer
    from slap_ray.core.scoring import (
        ScoringSettings,
        ScoringState,
        calibrate_second_moment,
        score_batch,
        selections_for,
    )
    from slap_ray.core.seeds import derive_seed

    torch.set_num_threads(1)
    packed = pd.read_parquet(prepared_path)  # stages/batches: one row per composed batch
    batches = {int(r["batch_id"]): r for _, r in packed.iterrows()}
    payload = {
        b: ([list(map(int, x)) for x in r["input_ids"]], [list(map(int, x)) for x in r["labels"]])
        for b, r in batches.items()
    }
    model = load_causal_lm(config.model.name)
    pad = load_tokenizer(config.model.name).pad_token_id
    s = config.select
    calibration = sorted(batches, key=lambda b: derive_seed(config.seed, "calibrate", b))[
        : s.calibration_batches
    ]
    moment = calibrate_second_moment(
        model, [payload[b] for b in calibration], pad, s.beta2, 8
    ).value()
    settings = ScoringSettings(pad_token_id=pad, micro_batch_size=8)
    state = ScoringState(second_moment=moment)
    start = time.perf_counter()
    kept = {}
    for b, (ids, labels) in payload.items():
        scores = score_batch(
            model,
            ids,
            labels,
            settings,
            selections=selections_for(s.spec(), s.alphas, config.seed),
            batch_key=b,
            state=state,
        )
        kept[b] = scores.keep
    seconds = time.perf_counter() - start
    rows = sum(len(x[0]) for x in payload.values())
    return {"score_s": round(seconds, 2), "score_rows_per_s": round(rows / seconds, 3)}


def bench_scoring(args) -> dict:
    results: dict = {"rows": args.rows, "model": args.model}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "data").mkdir()
        paths = subset(args.rows, tmp / "data")
        one = scoring_config(paths, tmp / "one", args.model, 1)
        results["ray_1_scorer"] = ray_run(one)
        results["ray_2_scorers"] = ray_run(scoring_config(paths, tmp / "two", args.model, 2))
        results["plain_loop"] = loop_run(one, tmp / "one" / "stages" / "batches")
    results["ray_1_vs_loop"] = round(
        results["ray_1_scorer"]["score_rows_per_s"] / results["plain_loop"]["score_rows_per_s"], 3
    )
    results["speedup_2_vs_1_scorers"] = round(
        results["ray_2_scorers"]["score_rows_per_s"] / results["ray_1_scorer"]["score_rows_per_s"],
        3,
    )
    return results


def bench_embed_chitchat(args) -> dict:
    import ray

    from slap_ray.core.seeds import derive_seed
    from slap_ray.core.strata import kmeans_fit
    from slap_ray.ray import stages

    ray.init(
        address="local",  # never join a leftover cluster recorded in /tmp/ray
        num_cpus=2,
        object_store_memory=2 * 1024**3,
        include_dashboard=False,
        log_to_driver=False,
    )
    timings = {}
    with PeakMemory() as memory:
        start = time.perf_counter()
        rows = stages.chitchat_stage("pairs", "all")
        if args.limit:
            rows = rows.limit(args.limit)
        embedded = stages.embed_stage(
            rows, "all-minilm-l6-v2", 256, args.max_chars, args.actors, 0.0
        ).materialize()
        timings["read_embed_s"] = round(time.perf_counter() - start, 1)
        total = embedded.count()
        mark = time.perf_counter()
        _, sample = stages.fit_sample(embedded, 0, min(1.0, 4096 / total))
        centroids = kmeans_fit(sample, 8, derive_seed(0, "kmeans"))
        sizes = (
            stages.assign_stage(embedded, centroids)
            .select_columns(["cluster"])
            .to_pandas()["cluster"]
            .value_counts()
            .sort_index()
            .tolist()
        )
        timings["kmeans_assign_s"] = round(time.perf_counter() - mark, 1)
        timings["total_s"] = round(time.perf_counter() - start, 1)
    ray.shutdown()
    return {
        "rows": total,
        "actors": args.actors,
        "max_chars": args.max_chars,
        "rows_per_s": round(total / timings["read_embed_s"], 1),
        "cluster_sizes": sizes,
        "timings": timings,
        "peak_rss_gib": round(memory.peak / 1024**3, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="which", required=True)
    scoring = sub.add_parser("scoring")
    scoring.add_argument("--rows", type=int, default=256)
    scoring.add_argument("--model", default="smollm2-135m-instruct")
    embed = sub.add_parser("embed-chitchat")
    embed.add_argument("--actors", type=int, default=2)
    embed.add_argument("--max-chars", type=int, default=512)
    embed.add_argument("--limit", type=int, default=None, help="rows (default: all pairs)")
    args = parser.parse_args(argv)
    result = bench_scoring(args) if args.which == "scoring" else bench_embed_chitchat(args)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
