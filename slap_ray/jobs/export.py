"""`slap export RUN_DIR --alpha A --format jsonl|parquet|hf --output PATH`: a selection's kept
rows (``selected/alpha-<a>/``, normalised: id, source, task, messages) in a format any trainer
reads (trl, LLaMA-Factory and torchtune take chat ``messages`` JSONL or a Hugging Face dataset).

Streams record batches, so memory stays flat however many rows were kept. No Ray needed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from slap_ray.config import ConfigError
from slap_ray.names import ALPHA_PREFIX, alphas_named, selected_rows

FORMATS = ("jsonl", "parquet", "hf")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="slap export", description=__doc__)
    parser.add_argument("run_dir", help="a `slap select` (or `slap run` selection) directory")
    parser.add_argument("--alpha", type=float, required=True, help="which kept set, e.g. 0.3")
    parser.add_argument("--format", choices=FORMATS, default="jsonl")
    parser.add_argument("--output", required=True, help="file (jsonl, parquet) or folder (hf)")
    return parser.parse_args(argv)


def selected_folder(run_dir: Path, alpha: float) -> Path:
    folder = selected_rows(run_dir, alpha)
    if folder.is_dir():
        return folder
    have = alphas_named(list(folder.parent.glob(f"{ALPHA_PREFIX}*")))
    if not have:
        raise ConfigError(f"{run_dir}: no selected/ folder (is it a finished `slap select` run?)")
    raise ConfigError(f"--alpha {alpha:g}: {run_dir / 'selected'} has alphas {have}")


def export(run_dir: Path, alpha: float, fmt: str, output: Path) -> int:
    """Write the kept rows at ``alpha`` to ``output``; returns the number of rows."""
    folder = selected_folder(run_dir, alpha)
    output.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        from datasets import Dataset, disable_progress_bars

        disable_progress_bars()
        dataset = Dataset.from_parquet(sorted(str(f) for f in folder.glob("*.parquet")))
        dataset.save_to_disk(str(output))
        return len(dataset)
    source = pads.dataset(str(folder), format="parquet")
    rows = 0
    writer = None
    with (
        output.open("w", encoding="utf-8") if fmt == "jsonl" else contextlib.nullcontext() as handle
    ):
        for batch in source.to_batches():
            rows += batch.num_rows
            if fmt == "jsonl":
                for record in batch.to_pylist():
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            else:
                table = pa.Table.from_batches([batch])
                writer = writer or pq.ParquetWriter(str(output), table.schema)
                writer.write_table(table)
    if writer is not None:
        writer.close()
    elif fmt == "parquet":
        pq.write_table(source.schema.empty_table(), str(output))
    return rows


def main_export(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        rows = export(Path(args.run_dir), args.alpha, args.format, Path(args.output))
    except ConfigError as error:
        print(f"slap export: {error}", file=sys.stderr)
        return 2
    print(f"slap export: {rows} rows at alpha {args.alpha:g} -> {args.output} ({args.format})")
    return 0
