"""Training step time with on-policy SLAP versus the full batch (results in docs/performance.md).

The baseline that matters is the *best-batched* full batch: the fastest of the micro-batch
sizes tried (``best_batched_ratio``). SLAP runs in both on-policy modes: ``kept_graphs``
(micro-batch ``--micro``, graphs kept) and ``recompute`` (no-grad scoring forward in
micro-batches of ``--score-micro``, then forward + backward of the kept rows in
``--recompute-micro``).

    python bench/bench_train_step.py                      # SmolLM2-135M, B=16, 256 tokens
    python bench/bench_train_step.py --steps 2 --model tiny-random   # quick plumbing check

One process, the same code path as a Ray Train worker (``core.onpolicy.onpolicy_step`` plus
clip / AdamW / scheduler), torch on every core. For full fine-tuning and for LoRA, the step time
at alpha = 0 (full batch: every example forwarded and back-propagated, no features, no
selection) is compared with on-policy SLAP at alpha 0.2, 0.3, 0.4 (selection overhead
included), next to what the FLOPs model of SLAP_METHOD.md section 2 predicts for the same token
counts. Rows: real pool examples (../shared/data/pool) whose chat-templated length reaches 256
tokens, truncated to exactly 256 (the response kept).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
POOL = REPO.parent / "shared" / "data" / "pool"


def long_rows(tokenizer, count: int, length: int) -> list[tuple[list[int], list[int]]]:
    """``count`` pool rows of exactly ``length`` tokens, taken round-robin over the sources."""
    from slap_ray.data.tokenize import tokenize_conversation

    per_source = []
    for path in sorted(POOL.glob("*.jsonl")):
        found = []
        for line in path.open(encoding="utf-8"):
            example = tokenize_conversation(json.loads(line)["messages"], tokenizer, length)
            if example.num_tokens == length:
                found.append((example.input_ids, example.labels))
            if len(found) >= count:
                break
        per_source.append(found)
    rows = [r for group in zip(*[g for g in per_source if g], strict=False) for r in group]
    leftovers = [r for g in per_source for r in g if r not in rows]
    rows = (rows + leftovers)[:count]
    if len(rows) < count:
        raise SystemExit(f"only {len(rows)} pool rows reach {length} tokens")
    return rows


def measure(finetuning: str, args, rows) -> list[dict]:
    from slap_ray.assets import load_causal_lm
    from slap_ray.core.features import SecondMomentEMA
    from slap_ray.core.model import lm_head_of
    from slap_ray.core.onpolicy import SelectionSettings, onpolicy_step
    from slap_ray.core.seeds import derive_rng
    from slap_ray.core.training import (
        adam_second_moment,
        add_lora,
        flops_estimate,
        lm_head_is_trained,
        make_optimizer,
        parameter_counts,
        warmup_cosine,
    )
    from slap_ray.selection_spec import SelectionSpec

    torch.manual_seed(0)
    model = load_causal_lm(args.model)
    if finetuning == "lora":
        model = add_lora(model, 8, 16.0, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"])
    model.train()
    optimizer = make_optimizer(model, 1e-5 if finetuning == "full" else 2e-4)
    scheduler = warmup_cosine(optimizer, 1000, 0.0)
    ema = None if lm_head_is_trained(model) else SecondMomentEMA()
    head, trainable = lm_head_of(model), [p for p in model.parameters() if p.requires_grad]
    counts = parameter_counts(model)
    batches = [rows[i * args.batch : (i + 1) * args.batch] for i in range(args.steps + 1)]
    results = []
    for setting in settings_grid(args):
        alpha, method, micro = setting["alpha"], setting["method"], setting["micro"]
        settings = SelectionSettings(
            SelectionSpec(method=method, preconditioner=args.preconditioner), alpha=alpha,
            onpolicy=setting["onpolicy"], score_micro_batch_size=args.score_micro,
        )  # fmt: skip
        times, parts, tokens = [], {}, {"forward": 0, "backward": 0}
        for step, batch in enumerate(batches):  # batch 0 warms up (and creates Adam's state)
            start = time.perf_counter()
            stats = onpolicy_step(
                model, batch, range(len(batch)), len(batch), settings,
                derive_rng(0, "bench", alpha, step), 0, micro_batch_size=micro,
                second_moment=ema.value() if ema is not None else adam_second_moment(optimizer, head),
                lm_head_ema=ema,
            )  # fmt: skip
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - start
            if step == 0:
                continue
            times.append(elapsed)
            for key, value in stats.seconds.items():
                parts[key] = parts.get(key, 0.0) + value
            tokens["forward"] += stats.forward_tokens
            tokens["backward"] += stats.backward_tokens
        flops = flops_estimate(counts, tokens["forward"], tokens["backward"], finetuning == "lora")
        results.append(
            {
                "finetuning": finetuning,
                "alpha": alpha,
                "method": method,
                "onpolicy": setting["onpolicy"] if method != "full" else "-",
                "micro_batch_size": micro,
                "step_s_mean": round(float(np.mean(times)), 3),
                "step_s_min": round(float(np.min(times)), 3),
                "parts_s_mean": {k: round(v / len(times), 3) for k, v in parts.items()},
                "flops_per_step": flops["total"] / len(times),
                "backward_examples_per_step": stats.backward_examples,
            }
        )
        print(json.dumps(results[-1]), flush=True)
    base = results[0]
    full = [r for r in results if r["method"] == "full"]
    best = min(full, key=lambda r: r["step_s_mean"])
    for r in results:
        r["step_ratio"] = round(r["step_s_mean"] / base["step_s_mean"], 3)
        r["best_batched_ratio"] = round(r["step_s_mean"] / best["step_s_mean"], 3)
        r["flops_ratio_model"] = round(r["flops_per_step"] / base["flops_per_step"], 3)
        overhead = r["parts_s_mean"].get("features", 0) + r["parts_s_mean"].get("select", 0)
        r["features_select_share"] = round(overhead / r["step_s_mean"], 3)
    return results


def settings_grid(args) -> list[dict]:
    """The full batch at micro-batch ``--micro`` first (the ratio base), then at every
    ``--baseline-micro`` (the fastest is the best-batched baseline), then SLAP at every alpha in
    each ``--onpolicy`` mode (kept graphs at ``--micro``, recompute at ``--recompute-micro``)."""
    grid = [{"alpha": 0.0, "method": "full", "micro": args.micro, "onpolicy": "kept_graphs"}]
    grid += [
        {"alpha": 0.0, "method": "full", "micro": m, "onpolicy": "kept_graphs"}
        for m in args.baseline_micro
        if m != args.micro
    ]
    for mode in args.onpolicy:
        micro = args.micro if mode == "kept_graphs" else args.recompute_micro
        grid += [
            {"alpha": a, "method": "slap", "micro": micro, "onpolicy": mode} for a in args.alphas
        ]
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    parser.add_argument("--micro", type=int, default=1, help="micro-batch size of the timed runs")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
    parser.add_argument(
        "--baseline-micro",
        type=int,
        nargs="+",
        default=[2, 4, 8],
        help="micro-batch sizes of the full batch (the best is the baseline)",
    )
    parser.add_argument("--onpolicy", nargs="+", default=["kept_graphs", "recompute"])
    parser.add_argument(
        "--recompute-micro",
        type=int,
        default=4,
        help="micro-batch size of the recompute mode's forward + backward",
    )
    parser.add_argument(
        "--score-micro",
        type=int,
        default=16,
        help="micro-batch size of the recompute mode's no-grad scoring forward",
    )
    parser.add_argument("--preconditioner", default="adam", choices=["adam", "factored", "none"])
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--finetuning", nargs="+", default=["full", "lora"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from slap_ray.assets import load_tokenizer

    rows = long_rows(load_tokenizer(args.model), args.batch * (args.steps + 1), args.length)
    out = {
        "args": vars(args),
        "results": [r for f in args.finetuning for r in measure(f, args, rows)],
    }
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
