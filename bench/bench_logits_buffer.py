"""A scorer's reused logits buffer against a fresh N x V logits tensor per micro-batch.

    python bench/bench_logits_buffer.py [--batches 24 --batch 32 --max-length 64
        --micro-batch 32 --threads 1 --model tiny-random] [--out bench/results/logits_buffer.json]

The shape of `bench_select_scale.py`'s scorers: real pool rows (seeded permutation of
../shared/data/pool) cut to 64 tokens, composed batches of 32 scored as one micro-batch by one
thread, the second moment calibrated on one other batch. Each batch is scored both ways
(``core.scoring.score_batch``, the scorer's own call) in alternating order, so a busy phase of
the machine hits both alike; the keep decisions and losses must be identical. Reports rows/s of
each and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pool_sample import tokenized_pool_sample  # noqa: E402

from slap_ray.assets import SMOLLM2_NAME, load_causal_lm, load_tokenizer  # noqa: E402
from slap_ray.core.features import PreconditionerCache  # noqa: E402
from slap_ray.core.model import LogitsBuffer  # noqa: E402
from slap_ray.core.scoring import (  # noqa: E402
    ScoringSettings,
    ScoringState,
    calibrate_second_moment,
    score_batch,
    selections_for,
)
from slap_ray.selection_spec import SelectionSpec

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", default=str(REPO.parent / "shared" / "data" / "pool"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "logits_buffer.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(SMOLLM2_NAME)
    rows = tokenized_pool_sample(
        args.pool, args.seed, tokenizer, (args.batches + 1) * args.batch, args.max_length
    )
    batches = [
        ([x["input_ids"] for x in part], [x["labels"] for x in part])
        for part in (rows[i : i + args.batch] for i in range(0, len(rows), args.batch))
    ]
    model = load_causal_lm(args.model).eval()
    moment = calibrate_second_moment(model, batches[:1], tokenizer.pad_token_id).value()
    settings = ScoringSettings(
        pad_token_id=tokenizer.pad_token_id, micro_batch_size=args.micro_batch
    )
    selections = selections_for(SelectionSpec(), [0.3], args.seed)
    preconditioners = PreconditionerCache()
    states = {
        "fresh": ScoringState(second_moment=moment, preconditioners=preconditioners),
        "buffer": ScoringState(moment, preconditioners, logits_buffer=LogitsBuffer()),
    }
    seconds = {"fresh": [], "buffer": []}
    for b, (ids, labels) in enumerate(batches[1:]):
        results = {}
        for way in ("fresh", "buffer") if b % 2 == 0 else ("buffer", "fresh"):
            start = time.perf_counter()
            results[way] = score_batch(
                model, ids, labels, settings, selections=selections, batch_key=b,
                state=states[way],
            )  # fmt: skip
            seconds[way].append(time.perf_counter() - start)
        for key, kept in results["fresh"].keep.items():
            assert np.array_equal(kept, results["buffer"].keep[key]), f"batch {b}: kept rows differ"
        np.testing.assert_array_equal(results["fresh"].losses, results["buffer"].losses)
    # The first batch of each way pays one-off costs (the preconditioner, the buffer itself).
    summary = {
        way: {
            "rows_per_s": round(args.batch * (len(s) - 1) / sum(s[1:]), 2),
            "median_batch_s": round(float(np.median(s[1:])), 4),
        }
        for way, s in seconds.items()
    }
    summary["speedup"] = round(summary["buffer"]["rows_per_s"] / summary["fresh"]["rows_per_s"], 3)
    result = {
        "args": vars(args),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "torch": torch.__version__,
        "identical_keep_and_losses": True,
        "summary": summary,
        "seconds": {way: [round(x, 4) for x in s] for way, s in seconds.items()},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
