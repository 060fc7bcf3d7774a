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
    parser = argparse.ArgumentParser(
        prog="slap export",
        description=__doc__,
        epilog="alpha is the fraction of each batch PRUNED: --alpha 0.3 exports the 70% kept.",
    )
    parser.add_argument("run_dir", help="a `slap select` (or `slap run` selection) directory")
    parser.add_argument("--alpha", type=float, required=True, help="which kept set, e.g. 0.3")
    parser.add_argument("--format", choices=FORMATS, default="jsonl")
    parser.add_argument("--output", required=True, help="file (jsonl, parquet) or folder (hf)")
    parser.add_argument(
        "--allow-empty", action="store_true", help="write an empty file when alpha kept no rows"
    )
    return parser.parse_args(argv)


OPTIONAL_MESSAGE_FIELDS = ("tool_calls", "tool_call_id", "name")


def as_read(record: dict) -> dict:
    """A selected row as its input had it: tool calls and tools back to JSON, the optional
    message fields a message did not have left out (content stays, even when null)."""
    messages = []
    for message in record["messages"]:
        out = {k: v for k, v in message.items() if k not in OPTIONAL_MESSAGE_FIELDS}
        for field in OPTIONAL_MESSAGE_FIELDS:
            if message.get(field) is not None:
                value = message[field]
                out[field] = json.loads(value) if field == "tool_calls" else value
        messages.append(out)
    out = {**{k: v for k, v in record.items() if k != "tools"}, "messages": messages}
    if record.get("tools"):
        out["tools"] = json.loads(record["tools"])
    return out


def selected_folder(run_dir: Path, alpha: float) -> Path:
    folder = selected_rows(run_dir, alpha)
    if folder.is_dir():
        return folder
    have = alphas_named(list(folder.parent.glob(f"{ALPHA_PREFIX}*")))
    if not have:
        raise ConfigError(f"{run_dir}: no selected/ folder (is it a finished `slap select` run?)")
    raise ConfigError(f"--alpha {alpha:g}: {run_dir / 'selected'} has alphas {have}")


def _check_output(output: Path, fmt: str) -> None:
    if fmt == "hf" and output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"--output {output}: exists; an hf export writes a new folder")
    if fmt != "hf" and output.is_dir():
        raise ConfigError(f"--output {output}: is a folder; a {fmt} export writes one file")


def export(run_dir: Path, alpha: float, fmt: str, output: Path, allow_empty: bool = False) -> int:
    """Write the kept rows at ``alpha`` to ``output``; returns the number of rows. A selection
    that kept nothing is an error unless ``allow_empty`` (then an empty file or dataset)."""
    folder = selected_folder(run_dir, alpha)
    _check_output(output, fmt)
    source = pads.dataset(str(folder), format="parquet")
    if not allow_empty and source.count_rows() == 0:
        raise ConfigError(
            f"--alpha {alpha:g}: the selection in {run_dir} kept no rows at this alpha; "
            "--allow-empty writes an empty export"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        from datasets import Dataset, disable_progress_bars

        disable_progress_bars()
        files = sorted(str(f) for f in folder.glob("*.parquet"))
        rows = source.count_rows()
        if rows:  # memory-mapped from the parts, never whole in memory
            Dataset.from_parquet(files).save_to_disk(str(output))
        else:
            from datasets import Features

            features = Features.from_arrow_schema(source.schema)
            empty = {name: [] for name in source.schema.names}
            # one shard: datasets writes none for 0 rows otherwise, and cannot load that back
            Dataset.from_dict(empty, features=features).save_to_disk(str(output), num_shards=1)
        return rows
    rows = 0
    writer = None
    with (
        output.open("w", encoding="utf-8") if fmt == "jsonl" else contextlib.nullcontext() as handle
    ):
        for batch in source.to_batches():
            rows += batch.num_rows
            if fmt == "jsonl":
                for record in batch.to_pylist():
                    handle.write(json.dumps(as_read(record), ensure_ascii=False) + "\n")
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
        rows = export(
            Path(args.run_dir), args.alpha, args.format, Path(args.output), args.allow_empty
        )
    except ConfigError as error:
        print(f"slap export: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. no permission to write there
        print(f"slap export: --output {args.output}: {error.strerror or error}", file=sys.stderr)
        return 2
    print(f"slap export: {rows} rows at alpha {args.alpha:g} -> {args.output} ({args.format})")
    return 0
