"""Proxy scoring: wall time per scored row against wall time per trained row.

    python bench/bench_proxy.py --train-step bench/results/train_step_recompute.json
        [--scorers tiny-random smollm2-135m-instruct] [--out bench/results/proxy.json]

Each scorer runs offline selection's scoring (``core.scoring.score_batch``: forward, LM-head
features, SLAP at alpha 0.3) on batches of 16 real pool rows of exactly 256 tokens, the rows
``bench_train_step.py`` trains on, after a second moment calibrated on one batch (untimed). The
trained row's cost is the best-batched full-batch step of SmolLM2 in that bench's results (full
fine-tuning and LoRA) divided by its batch size. ``cost_fraction`` is what issue 12 asks for:
scoring every row once over what pruning alpha of the rows saves in one epoch of training,
(s_score / s_train) / alpha; below 1 the selection pays for itself in wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from bench_train_step import long_rows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ALPHAS = (0.2, 0.3, 0.4, 0.5)


def scoring_seconds_per_row(name: str, rows, batch: int, micro: int) -> float:
    from slap_ray.assets import load_causal_lm, load_tokenizer
    from slap_ray.core import scoring
    from slap_ray.selection_spec import SelectionSpec

    model, pad = load_causal_lm(name).eval(), load_tokenizer(name).pad_token_id
    batches = [rows[i : i + batch] for i in range(0, len(rows), batch)]
    calibration = [([r[0] for r in batches[0]], [r[1] for r in batches[0]])]
    moment = scoring.calibrate_second_moment(model, calibration, pad, 0.999, micro).value()
    selections = [scoring.Selection("slap", 0.3, 0, SelectionSpec())]
    settings = scoring.ScoringSettings(pad_token_id=pad, micro_batch_size=micro)
    state = scoring.ScoringState(second_moment=moment)
    start = time.perf_counter()
    for key, part in enumerate(batches[1:]):
        scoring.score_batch(
            model, [r[0] for r in part], [r[1] for r in part], settings,
            selections=selections, batch_key=key, state=state,
        )  # fmt: skip
    return (time.perf_counter() - start) / (len(rows) - batch)


def trained_seconds_per_row(train_step: dict) -> dict[str, float]:
    """Best-batched full-batch step per row, for each kind of fine-tuning measured."""
    batch = train_step["args"]["batch"]
    best: dict[str, float] = {}
    for r in train_step["results"]:
        if r["method"] == "full":
            kind = r["finetuning"]
            best[kind] = min(best.get(kind, float("inf")), r["step_s_mean"] / batch)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-step", required=True, help="bench_train_step.py's JSON output")
    parser.add_argument("--scorers", nargs="+", default=["tiny-random", "smollm2-135m-instruct"])
    parser.add_argument("--batches", type=int, default=3, help="timed batches per scorer")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "proxy.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from slap_ray.assets import SMOLLM2_NAME, load_tokenizer

    train_step = json.loads(Path(args.train_step).read_text())
    batch, length = train_step["args"]["batch"], train_step["args"]["length"]
    rows = long_rows(load_tokenizer(SMOLLM2_NAME), batch * (args.batches + 1), length)
    trained = trained_seconds_per_row(train_step)
    result = {"args": vars(args), "trained_model": SMOLLM2_NAME, "trained_s_per_row": trained}
    for name in args.scorers:
        scored = scoring_seconds_per_row(name, rows, batch, args.micro_batch)
        result[name] = {
            "scored_s_per_row": round(scored, 4),
            "scored_over_trained": {k: round(scored / v, 4) for k, v in trained.items()},
            "cost_fraction": {
                k: {f"{a:g}": round(scored / v / a, 4) for a in ALPHAS} for k, v in trained.items()
            },
        }
        print(json.dumps({name: result[name]}), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
