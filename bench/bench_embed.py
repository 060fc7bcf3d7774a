"""Embedding throughput: the pipeline's Ray Data embed stage (one actor holding every CPU, so
as many torch threads) against plain sentence-transformers ``encode`` in one process with the
same threads, on the same chitchat rows. Target: pipeline / plain rows/s at least 0.8.

    python bench/bench_embed.py [--rows 8192] [--cpus 2] [--repeats 3]
        [--out bench/results/embed.json]

Plain and pipeline runs alternate ``--repeats`` times (plain ``encode`` alone varied by 10-20%
between runs here); the ratio reported is the median of the per-pair ratios. The pipeline's
time includes its actor's start and model load; plain's excludes its model load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def texts_and_rows(count: int) -> tuple[list[str], list[dict]]:
    from slap_ray.data.chitchat import chitchat_rows
    from slap_ray.ray.embed import conversation_text

    rows = []
    for i, row in enumerate(chitchat_rows("pairs", split="train")):
        if i == count:
            break
        rows.append({"id": row["id"], "messages": json.dumps(row["messages"])})
    texts = [conversation_text(json.loads(r["messages"]), 2000) for r in rows]
    return texts, rows


def plain(texts: list[str], threads: int, batch_size: int) -> float:
    import torch
    from sentence_transformers import SentenceTransformer

    from slap_ray.assets import resolve_embedder_path

    torch.set_num_threads(threads)
    model = SentenceTransformer(resolve_embedder_path("all-minilm-l6-v2"), device="cpu")
    model.encode(texts[:batch_size], batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    model.encode(texts, batch_size=batch_size, normalize_embeddings=True)
    return len(texts) / (time.perf_counter() - start)


def pipeline(rows: list[dict], cpus: int, batch_size: int) -> float:
    import ray

    from slap_ray.config import RayConfig
    from slap_ray.ray import stages
    from slap_ray.ray.runtime import ensure_ray

    ensure_ray(RayConfig(num_cpus=cpus, object_store_memory=1 << 30))
    ds = ray.data.from_items(rows).materialize()
    warm = ray.data.from_items(rows[:batch_size])
    stages.embed_stage(warm, "all-minilm-l6-v2", batch_size, 2000, 1, 0.0, cpus).materialize()
    start = time.perf_counter()
    stages.embed_stage(ds, "all-minilm-l6-v2", batch_size, 2000, 1, 0.0, cpus).materialize()
    seconds = time.perf_counter() - start
    ray.shutdown()
    return len(rows) / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "embed.json"))
    args = parser.parse_args()
    from slap_ray.ray import stages

    texts, rows = texts_and_rows(args.rows)
    pairs = []
    for _ in range(args.repeats):
        plain_rate = plain(texts, args.cpus, args.batch_size)
        pipeline_rate = pipeline(rows, args.cpus, args.batch_size)
        pairs.append({"plain_rows_per_s": round(plain_rate, 1),
                      "pipeline_rows_per_s": round(pipeline_rate, 1),
                      "ratio": round(pipeline_rate / plain_rate, 3)})  # fmt: skip
        print(json.dumps(pairs[-1]), flush=True)
    result = {
        "rows": len(rows),
        "cpus": args.cpus,
        "rows_per_call": args.batch_size * stages.EMBED_CALL_BATCHES,
        "runs": pairs,
        "ratio_median": statistics.median(p["ratio"] for p in pairs),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
