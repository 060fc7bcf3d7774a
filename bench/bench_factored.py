"""The factored preconditioner against exact Adam: feature cost and kept-set agreement.

    python bench/bench_factored.py [--rows 256 --batch 32 --max-length 256 --alpha 0.3]
        [--out bench/results/factored.json]

SmolLM2-135M-Instruct on real pool rows (seeded permutation of ../shared/data/pool), the second
moment calibrated on 4 other batches as `slap select` does. Per batch of ``--batch`` rows, in
turn (so a busy phase of the machine hits all alike): (1) the scoring forward alone, (2) forward
+ features with the exact ``adam`` preconditioner, (3) forward + features with ``factored``.
Then SLAP selects at ``--alpha`` from each kind of feature with the same seeded RNG per batch
(``core.scoring.score_batch``) and the kept sets are compared: Jaccard over all rows and the
mean per-batch Jaccard. Targets (issue 12): (3)/(1) at most 1.10; Jaccard reported as measured.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pool_sample import tokenized_pool_sample  # noqa: E402

from slap_ray.assets import SMOLLM2_NAME, load_causal_lm, load_tokenizer  # noqa: E402
from slap_ray.core import scoring  # noqa: E402
from slap_ray.selection_spec import SelectionSpec

REPO = Path(__file__).resolve().parents[1]
CALIBRATION_BATCHES = 4


def timed(*args, **kwargs) -> float:
    """Seconds of one ``scoring.losses_and_features`` call."""
    start = time.perf_counter()
    scoring.losses_and_features(*args, **kwargs)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", default=str(REPO.parent / "shared" / "data" / "pool"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "factored.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    need = args.rows + CALIBRATION_BATCHES * args.batch
    rows = tokenized_pool_sample(
        args.pool, args.seed, load_tokenizer(SMOLLM2_NAME), need, args.max_length
    )
    calibration, bench = rows[: CALIBRATION_BATCHES * args.batch], rows[-args.rows :]
    model = load_causal_lm(SMOLLM2_NAME).eval()
    pad = load_tokenizer(SMOLLM2_NAME).pad_token_id

    def columns(part):
        return [x["input_ids"] for x in part], [x["labels"] for x in part]

    batches = [
        columns(calibration[i : i + args.batch]) for i in range(0, len(calibration), args.batch)
    ]
    moment = scoring.calibrate_second_moment(model, batches, pad, 0.999, args.micro_batch).value()
    selections = [
        scoring.Selection(kind, args.alpha, args.seed, SelectionSpec(preconditioner=kind))
        for kind in ("adam", "factored")
    ]
    settings = scoring.ScoringSettings(pad_token_id=pad, micro_batch_size=args.micro_batch)
    seconds = {"forward": 0.0, "adam": 0.0, "factored": 0.0}
    kept = {"adam": [], "factored": []}
    per_batch = []
    for b, start in enumerate(range(0, len(bench), args.batch)):
        ids, labels = columns(bench[start : start + args.batch])
        for kind in ("forward", "adam", "factored"):
            seconds[kind] += timed(
                model, ids, labels, settings, scoring.ScoringState(second_moment=moment),
                with_features=kind != "forward",
                preconditioner="adam" if kind == "forward" else kind,
            )  # fmt: skip
        scores = scoring.score_batch(
            model, ids, labels, settings, selections=selections, batch_key=b,
            state=scoring.ScoringState(second_moment=moment),
        )  # fmt: skip
        sets = {}
        for kind in kept:
            sets[kind] = {start + i for i in np.flatnonzero(scores.keep[kind])}
            kept[kind] += sorted(sets[kind])
        per_batch.append(
            len(sets["adam"] & sets["factored"]) / len(sets["adam"] | sets["factored"])
        )
        print(f"batch {b}: jaccard {per_batch[-1]:.3f}", flush=True)
    adam, factored = set(kept["adam"]), set(kept["factored"])
    result = {
        "args": vars(args),
        "rows": len(bench),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "adam_over_forward": round(seconds["adam"] / seconds["forward"], 3),
        "factored_over_forward": round(seconds["factored"] / seconds["forward"], 3),
        "jaccard_all_rows": round(len(adam & factored) / len(adam | factored), 3),
        "jaccard_per_batch_mean": round(float(np.mean(per_batch)), 3),
        "jaccard_per_batch_min": round(float(np.min(per_batch)), 3),
        "kept_rows": len(adam),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
