"""Ray Data stages of the selection job; each wraps one pure function of slap_ray.data/core.

Rows have the shape of ``slap_ray.data.rows.pipeline_row``.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
import ray
from ray.data import ActorPoolStrategy, Dataset, TaskPoolStrategy

from slap_ray.core.seeds import id_rank_key
from slap_ray.core.strata import assign_clusters
from slap_ray.data.ingest import SchemaOptions
from slap_ray.data.rows import pipeline_row, read_file_rows
from slap_ray.names import EMBEDDED_CHITCHAT, EMBEDDED_CHITCHAT_EVAL
from slap_ray.ray.embed import Embedder

# Embedded sources: the chitchat training side and its held-out conversations.
EMBEDDED = {EMBEDDED_CHITCHAT: "train", EMBEDDED_CHITCHAT_EVAL: "eval"}


def read_stage(files: list[str], options: SchemaOptions, fmt: str) -> Dataset:
    """Read every file in parallel: one read task per file."""
    items = ray.data.from_items(
        [{"path": f} for f in files], override_num_blocks=max(1, len(files))
    )
    return items.flat_map(read_file_rows, fn_args=(options, fmt))


def chitchat_stage(mode: str, split: str = "train") -> Dataset:
    """The embedded default dataset (chitchat-dataset package) as normalised rows, built in a
    task on the cluster (never on the driver).

    ``split``: "train" (what selection and training use), "eval" (held-out conversations) or
    "all".
    """
    name = EMBEDDED_CHITCHAT_EVAL if split == "eval" else EMBEDDED_CHITCHAT

    def rows_of(item: dict[str, Any]) -> list[dict]:
        from slap_ray.data.chitchat import chitchat_rows

        rows = chitchat_rows(item["mode"], split=item["split"])
        return [pipeline_row(name, i, r, None, None) for i, r in enumerate(rows)]

    return ray.data.from_items([{"mode": mode, "split": split}]).flat_map(rows_of)


@functools.lru_cache(maxsize=4)
def _tokenizer(model_name: str):
    """One tokenizer per worker process and model: Ray reuses task workers, so a stage's tasks
    load it once per process, not once per block."""
    from slap_ray.assets import load_tokenizer

    return load_tokenizer(model_name)


def tokenize_batch(
    batch: dict[str, np.ndarray], model_name: str, max_length: int, truncation: str
) -> dict[str, list]:
    """Chat-template tokenisation (slap_ray.data.tokenize.tokenize_rows) of one block; rows
    it rejects keep empty token columns and their ``reject_reason``."""
    from slap_ray.data.tokenize import tokenize_rows

    tools = batch["tools"] if "tools" in batch else [None] * len(batch["id"])
    rows = [
        {
            "id": i,
            "messages": json.loads(m),
            "tools": json.loads(t) if isinstance(t, str) and t else None,
        }
        for i, m, t in zip(batch["id"], batch["messages"], tools, strict=True)
    ]
    kept, rejected = tokenize_rows(rows, _tokenizer(model_name), max_length, truncation)
    by_id = {r["id"]: r for r in kept}
    reasons = {r["id"]: r["reason"] for r in rejected}
    out = {k: list(batch[k]) for k in batch}
    out["input_ids"] = [
        np.asarray(by_id[i]["input_ids"] if i in by_id else [], np.int32) for i in batch["id"]
    ]
    out["labels"] = [
        np.asarray(by_id[i]["labels"] if i in by_id else [], np.int32) for i in batch["id"]
    ]
    out["num_tokens"] = [len(x) for x in out["input_ids"]]
    out["truncated_tokens"] = [
        by_id[i]["truncated_tokens"] if i in by_id else 0 for i in batch["id"]
    ]
    out["reject_reason"] = [reasons.get(i) for i in batch["id"]]
    return out


def cluster_cpus() -> int:
    """CPUs of the whole Ray cluster (at least 1): sizes pools and shuffles to the cluster."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def tokenize_stage(
    ds: Dataset, model_name: str, max_length: int, truncation: str, num_tasks: int | None = None
) -> Dataset:
    """Tokenise in tasks of one CPU each, at most ``num_tasks`` at once (None: as many as the
    cluster has CPUs). Tasks, not an actor pool: an actor holds its CPU between blocks, so two
    datasets tokenising at once (a sweep's concurrent trials) each held one actor of a 2-CPU
    cluster while their read tasks waited for a CPU forever. A task gives its CPU back after
    every block and fuses with the map before it."""
    return ds.map_batches(
        tokenize_batch,
        fn_kwargs={"model_name": model_name, "max_length": max_length, "truncation": truncation},
        compute=TaskPoolStrategy(size=num_tasks),
        batch_size=256,
        num_cpus=1,
    )


# Encoder batches per actor call (see embed_stage). Measured with MiniLM on 4,096 chitchat rows
# in one process: calls of 2,048 rows ran 10-14% slower than one call of 4,096 (more padding).
EMBED_CALL_BATCHES = 64


def embed_stage(
    ds: Dataset,
    model_name: str,
    batch_size: int,
    max_chars: int,
    num_actors: int,
    num_gpus: float,
    num_cpus: float = 1.0,
    persist_dir: str | None = None,
) -> Dataset:
    """Sentence embeddings on an actor pool; each actor runs as many torch threads as CPUs it
    holds, and resolves the model folder on its own node. With ``persist_dir`` every finished
    call's rows are also written there (``--resume`` skips them).

    Each call hands the actor ``EMBED_CALL_BATCHES`` encoder batches: ``encode`` sorts its
    input by length, so a larger call pads much less than one batch of mixed lengths would.
    """
    return ds.map_batches(
        Embedder,
        fn_constructor_args=(
            model_name,
            batch_size,
            max_chars,
            num_gpus > 0,
            num_cpus,
            persist_dir,
        ),  # fmt: skip
        compute=ActorPoolStrategy(size=num_actors),
        batch_size=batch_size * EMBED_CALL_BATCHES,
        num_cpus=0 if num_gpus > 0 else num_cpus,
        num_gpus=num_gpus,
    )


def fit_sample(ds: Dataset, seed: int, fraction: float) -> tuple[list[str], np.ndarray]:
    """A seeded sample chosen by id hash (same rows whatever the sharding), sorted by id."""
    threshold = int(fraction * 2**63)

    def pick(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = np.array(
            [id_rank_key(seed, "kmeans-sample", i) < threshold for i in batch["id"]], bool
        )
        return {"id": batch["id"][keep], "embedding": batch["embedding"][keep]}

    sample = ds.map_batches(pick, batch_format="numpy").to_pandas().sort_values("id")
    return sample["id"].tolist(), np.stack(sample["embedding"].to_numpy()) if len(
        sample
    ) else np.empty((0, 0))


def assign_stage(ds: Dataset, centroids: np.ndarray) -> Dataset:
    """Nearest-centroid cluster of every row, block by block (core.strata.assign_clusters)."""
    centroids_ref = ray.put(centroids)

    def assign(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch["cluster"] = assign_clusters(np.stack(batch["embedding"]), ray.get(centroids_ref))
        del batch["embedding"]
        return batch

    return ds.map_batches(assign, batch_format="numpy")
