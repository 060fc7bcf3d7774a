"""A noisy copy of an instruction pool for the variant study (issue 30, stage 2).

    python bench/noisy_pool.py ../shared/data/pool runs/noisy_pool --swap 0.15 --repeat 0.10

Seeded. Of every file's rows, a ``--swap`` share get another row's last assistant answer (a
derangement among the chosen rows, so no row keeps its own), and a ``--repeat`` share is written
a second time under a new id. Planted rows carry an id marker (``names.PLANTED_MARKERS``:
``<id>~swapped``, ``<id>~dup1``) so the sweep's selection diagnostics can count how many of them
each arm keeps. The held-out eval set is not touched. Writes outside the repository.

With ``--sample N`` the noise is planted into the N rows that ``data.max_rows: N`` (with
``--sample-seed`` as the config's ``seed``) samples from the clean pool, so every repeat meets
its original and the clean rows are the stage-1 study's; run that pool with ``data.max_rows:
null``. Without it, a small ``max_rows`` sample of the noisy pool rarely holds both copies.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np

from slap_ray.core.seeds import id_rank_key
from slap_ray.names import PLANTED_MARKERS

SWAPPED, REPEATED = PLANTED_MARKERS


def noisy_rows(rows: list[dict], swap: float, repeat: float, seed: int) -> list[dict]:
    """``rows`` (normalised ``messages`` records) with planted swaps and repeats."""
    rng = np.random.default_rng(seed)
    rows = copy.deepcopy(rows)
    count = len(rows)
    chosen = rng.choice(count, size=int(round(swap * count)), replace=False)
    if len(chosen) > 1:
        answers = [rows[i]["messages"][-1]["content"] for i in chosen]
        shifted = np.roll(np.arange(len(chosen)), 1)  # each takes the next one's answer
        for position, i in enumerate(chosen):
            rows[i]["messages"][-1]["content"] = answers[shifted[position]]
            rows[i]["id"] = f"{rows[i]['id']}{SWAPPED}"
    repeated = rng.choice(count, size=int(round(repeat * count)), replace=False)
    copies = []
    for i in sorted(repeated):
        again = copy.deepcopy(rows[i])
        again["id"] = f"{again['id']}{REPEATED}1"
        copies.append(again)
    return rows + copies


def pipeline_sample(files: dict[str, list[dict]], size: int, seed: int) -> dict[str, list[dict]]:
    """The rows ``data.max_rows: size`` samples with config ``seed`` (the ``size`` smallest
    (``id_rank_key(seed, "max-rows", id)``, id) over every file), per file in file order."""
    ranked = sorted(
        (id_rank_key(seed, "max-rows", row["id"]), row["id"])
        for rows in files.values()
        for row in rows
    )
    chosen = {row_id for _, row_id in ranked[:size]}
    return {name: [r for r in rows if r["id"] in chosen] for name, rows in files.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pool", type=Path, help="folder of <source>.jsonl files")
    parser.add_argument("out", type=Path, help="folder to write (outside the repository)")
    parser.add_argument("--swap", type=float, default=0.15)
    parser.add_argument("--repeat", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample", type=int, help="plant into the data.max_rows sample of N")
    parser.add_argument("--sample-seed", type=int, default=0, help="the config's seed")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    files = {
        path.name: [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x]
        for path in sorted(args.pool.glob("*.jsonl"))
    }
    if args.sample:
        files = pipeline_sample(files, args.sample, args.sample_seed)
    for offset, (name, rows) in enumerate(files.items()):
        noisy = noisy_rows(rows, args.swap, args.repeat, args.seed + offset)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in noisy)
        (args.out / name).write_text(text, encoding="utf-8")
        print(f"{name}: {len(rows)} rows -> {len(noisy)}")


if __name__ == "__main__":
    main()
