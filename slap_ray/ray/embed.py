"""Sentence-embedding stage: a callable class for ``map_batches`` on an actor pool."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from slap_ray.files import atomic_path


def conversation_text(messages: list[dict], max_chars: int) -> str:
    """The text a conversation is embedded by: its turns as 'role: content', capped in length."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)[:max_chars]


class Embedder:
    """Holds one sentence-transformers model; adds an ``embedding`` column (N, D) float32.

    Embeddings are L2-normalised and rounded to 1e-4 so that tiny float differences from
    different block compositions cannot move a row to another k-means cluster.
    """

    def __init__(
        self,
        model_name: str,
        batch_size: int,
        max_chars: int,
        use_gpu: bool,
        num_cpus: float = 1,
        persist_dir: str | None = None,
    ) -> None:
        # torch and the model stack load here, in the actor: the selection's task workers
        # import this module for its stage functions and never need them.
        import torch
        from sentence_transformers import SentenceTransformer

        from slap_ray.assets import resolve_embedder_path
        from slap_ray.core.model import device_for

        torch.set_num_threads(max(1, int(num_cpus)))
        device = device_for(use_gpu, "embed.num_gpus_per_actor")
        self.model = SentenceTransformer(resolve_embedder_path(model_name), device=device)
        self.batch_size = batch_size
        self.max_chars = max_chars
        self.persist_dir = Path(persist_dir) if persist_dir else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [conversation_text(json.loads(m), self.max_chars) for m in batch["messages"]]
        vectors = self.model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True
        )
        batch["embedding"] = list(np.round(vectors.astype(np.float32), 4))
        if self.persist_dir is not None:
            self._persist(batch)
        return batch

    def _persist(self, batch: dict[str, np.ndarray]) -> None:
        """Each finished batch's (path, line, embedding) as one file: a resumed run skips it."""
        table = pa.table(
            {
                "path": pa.array(list(batch["path"]), pa.string()),
                "line": pa.array(list(batch["line"]), pa.int64()),
                "embedding": pa.array(list(batch["embedding"]), pa.list_(pa.float32())),
            }
        )
        # Named by its rows: a batch retried after an actor failure overwrites its own file.
        origins = "\n".join(f"{p}:{ln}" for p, ln in zip(batch["path"], batch["line"], strict=True))
        name = f"part-{hashlib.sha1(origins.encode()).hexdigest()[:20]}"
        with atomic_path(self.persist_dir / f"{name}.parquet") as tmp:
            pq.write_table(table, tmp)
