"""Tokenise stage: Ray Data tasks (the pipeline's ``tokenize_stage``) against the actor pool it
replaced (an autoscaling pool of one up to one actor per CPU, the same ``tokenize_batch``), on
the same chitchat rows already in the object store, alternating ``--repeats`` times.

    python bench/bench_tokenize.py [--rows 40000] [--repeats 2] [--max-length 64]
        [--out bench/results/tokenize_tasks.json]

The tasks replaced the pool because two datasets tokenising at once (a sweep's concurrent
trials) each held an actor on a 2-CPU cluster while their read tasks waited for a CPU forever.
This checks that tokenising did not get slower for it. Times include each stage's start-up
(actor start and tokenizer load for the pool; tokenizer load per worker process for tasks).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny-random"  # the SmolLM2 tokenizer


def pool_rows(count: int) -> list[dict]:
    """``count`` chitchat pairs, cycled under new ids, with ``messages`` as a JSON string."""
    from slap_ray.data.chitchat import chitchat_rows

    base = list(chitchat_rows("pairs", split="train"))
    return [
        {
            "id": f"{base[i % len(base)]['id']}~{i}",
            "messages": json.dumps(base[i % len(base)]["messages"]),
        }
        for i in range(count)
    ]


class _PoolTokenizer:
    """The replaced actor: holds a tokenizer, tokenises a block with the same function."""

    def __init__(self, max_length: int) -> None:
        from slap_ray.ray.stages import _tokenizer

        self.max_length = max_length
        _tokenizer(MODEL)

    def __call__(self, batch):
        from slap_ray.ray.stages import tokenize_batch

        return tokenize_batch(batch, MODEL, self.max_length, "keep_response")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "tokenize_tasks.json"))
    args = parser.parse_args()

    import ray
    from ray.data import ActorPoolStrategy

    from slap_ray.config import RayConfig
    from slap_ray.ray.runtime import ensure_ray
    from slap_ray.ray.stages import cluster_cpus, tokenize_stage

    ensure_ray(RayConfig(num_cpus=2, object_store_memory=1 << 30))
    rows = ray.data.from_items(pool_rows(args.rows), override_num_blocks=40).materialize()

    def actors():
        pool = ActorPoolStrategy(min_size=1, max_size=cluster_cpus())
        return rows.map_batches(
            _PoolTokenizer, fn_constructor_args=(args.max_length,), compute=pool,
            batch_size=256, num_cpus=1,
        )  # fmt: skip

    def tasks():
        return tokenize_stage(rows, MODEL, args.max_length, "keep_response")

    seconds: dict[str, list[float]] = {"actor_pool": [], "tasks": []}
    for _ in range(args.repeats):
        for name, stage in (("actor_pool", actors), ("tasks", tasks)):
            start = time.perf_counter()
            count = stage().materialize().count()
            seconds[name].append(round(time.perf_counter() - start, 2))
            assert count == args.rows, (name, count)
            print(f"{name}: {args.rows} rows in {seconds[name][-1]} s", flush=True)
    result = {
        "rows": args.rows,
        "cpus": 2,
        "seconds": seconds,
        "rows_per_s": {k: round(args.rows * len(v) / sum(v), 1) for k, v in seconds.items()},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["rows_per_s"]))
    ray.shutdown()


if __name__ == "__main__":
    main()
