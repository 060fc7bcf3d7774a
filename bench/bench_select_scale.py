"""Selection at scale: driver peak RSS, total peak RSS (driver + every Ray process), the largest
private memory of any one Ray process, and wall time of `slap select` as the pool grows. Rows
are chitchat pairs repeated under new ids over 8 sources, tiny model, ``strata.by: source``.
Target: driver peak flat (at most +10% from the smallest to the largest size), wall time linear
in rows.

    python bench/bench_select_scale.py [--sizes 50000 200000 1000000] [--resume]
        [--out bench/results/select_scale.json]
    python bench/bench_select_scale.py --chitchat [--out bench/results/select_chitchat.json]

``--chitchat``: every chitchat pair once (131,548 rows), MiniLM embeddings with k-means strata
(``strata.by: embedding``) and tiny-model scoring: the driver and total peak of a real pool.

Each size's result is saved as soon as it finishes; ``--resume`` skips sizes already saved.
A size in progress (the largest take hours here) keeps its run directory under ``bench/work/``
and its progress in ``progress.json`` there (every 10 s): killed, ``--resume`` continues it with
``slap select --resume``. Its wall time is then the sum of the pieces (each piece pays Ray's
start-up again; a killed piece counts until its last progress record) and its peaks the
largest of any piece. ``--stop-after-s S`` stops a size's run after S seconds (a session's
budget) and saves what it did under ``partial`` in the output, scored rows and finished stages
included; ``--resume`` later continues it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
SOURCES = 8
DEFAULT_OUT = str(REPO / "bench" / "results" / "select_scale.json")


def write_pool(folder: Path, rows: int | None) -> str:
    """``rows`` chitchat pairs, cycled under new ids, one file per source; None: every pair once
    under its own id. A pool already written (its ``done`` marker) is kept as it is."""
    if (folder / "done").exists():
        return str(folder / "*.jsonl")
    paths = _write_pool(folder, rows)
    (folder / "done").touch()
    return paths


def _write_pool(folder: Path, rows: int | None) -> str:
    from slap_ray.data.chitchat import chitchat_rows

    base = list(chitchat_rows("pairs", split="train" if rows else "all"))
    if rows is None:
        folder.mkdir(parents=True, exist_ok=True)
        handles = [(folder / f"part{s}.jsonl").open("w", encoding="utf-8") for s in range(SOURCES)]
        for i, row in enumerate(base):
            handles[i % SOURCES].write(json.dumps(row) + "\n")
        for handle in handles:
            handle.close()
        return str(folder / "*.jsonl")
    folder.mkdir(parents=True, exist_ok=True)
    handles = [(folder / f"part{s}.jsonl").open("w", encoding="utf-8") for s in range(SOURCES)]
    for i in range(rows):
        row = base[i % len(base)]
        record = {
            "id": f"{row['id']}~{i // len(base)}",
            "source": f"chitchat{i % SOURCES}",
            "task": "dialogue",
            "messages": row["messages"],
        }
        handles[i % SOURCES].write(json.dumps(record) + "\n")
    for handle in handles:
        handle.close()
    return str(folder / "*.jsonl")


def config_tree(paths: str, out: Path, extra: dict) -> dict:
    tree = {
        "output_dir": str(out),
        "progress": False,
        "data": {"paths": [paths], "max_length": 64},
        "model": {"name": "tiny-random"},
        "strata": {"by": "source"},
        "select": {"batch_size": 32, "alphas": [0.3], "calibration_batches": 1},
        "score": {"num_scorers": 2, "micro_batch_size": 32},
        "ray": {"num_cpus": 2, "object_store_memory": 3 * 2**30},
    }
    for key, value in extra.items():
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = value
    return tree


def private_bytes(process: psutil.Process) -> int:
    """A process's own (anonymous) memory: its RSS less the object-store and library pages it
    shares with the others (``/proc/<pid>/statm``: resident - shared = RssAnon).

    The same number as ``smaps_rollup``'s ``Anonymous:`` (equal on all 31 processes of a
    scoring run), which walks every page table: reading that every 0.5 s cost this poller 30% of
    a CPU (150 ms per poll against 0.8 ms), though the measured run was not measurably slower.
    """
    memory = process.memory_info()
    return memory.rss - memory.shared


class PeakRss:
    """Polls the driver's RSS, the RSS of the driver with all its descendants, and the largest
    private memory of any one descendant (a Ray worker: each must stay flat as the pool grows)."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.driver = self.total = self.worker = 0
        self.worker_name = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                driver = self.process.memory_info().rss
                total = driver
                for child in self.process.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                        private = private_bytes(child)
                        if private > self.worker:  # Ray's process title names the task
                            self.worker, self.worker_name = (
                                private,
                                " ".join(child.cmdline())[:80].strip(),
                            )
                    except (psutil.Error, OSError):
                        pass
            except psutil.Error:
                return
            self.driver, self.total = max(self.driver, driver), max(self.total, total)
            time.sleep(0.5)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_size(rows: int | None, work: Path, extra: dict, stop_after_s: float | None = None) -> dict:
    """One ``slap select`` run in ``work``. Pieces of a killed earlier run there (its
    ``progress.json``) make this one resume; this piece is recorded there every 10 s. Past
    ``stop_after_s`` the run is killed and a partial record (``complete: false``) returned."""
    progress = work / "progress.json"
    paths = write_pool(work / f"pool{rows}", rows)
    out = work / f"run{rows}"
    config = work / f"config{rows}.yaml"
    config.write_text(yaml.safe_dump(config_tree(paths, out, extra)))
    pieces = json.loads(progress.read_text()) if progress.exists() else []
    command = [sys.executable, "-m", "slap_ray.cli", "select", "--config", str(config)]
    start = time.perf_counter()
    process = subprocess.Popen(
        command + (["--resume"] if pieces else []),
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stages: dict[str, float] = {}
    threading.Thread(target=_echo_stages, args=(process.stdout, stages), daemon=True).start()
    peak = PeakRss(process.pid)
    pieces.append({})
    stopped = False
    while True:
        try:
            code = process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        pieces[-1] = {
            "wall_s": round(time.perf_counter() - start, 1),
            "driver_peak_rss_gib": round(peak.driver / 2**30, 3),
            "total_peak_rss_gib": round(peak.total / 2**30, 3),
            "largest_worker_private_gib": round(peak.worker / 2**30, 3),
            "largest_worker": peak.worker_name,
            "stages_s": dict(stages),
        }
        progress.write_text(json.dumps(pieces, indent=2))
        if code is not None:
            break
        if stop_after_s is not None and time.perf_counter() - start > stop_after_s:
            kill_tree(process.pid)
            code, stopped = process.wait(), True
            break
    peak.stop()
    if stopped:
        return {"rows": rows, "complete": False, **_totals(pieces), "scored_rows": scored_rows(out)}
    if code != 0:
        raise SystemExit(f"select failed at {rows} rows (exit {code})")
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "rows": manifest["counts"]["read"]["rows"],
        **_totals(pieces),
        "timings_s": manifest["timings_s"],
        # The driver's own running peak at the end of each stage (of the last piece).
        "driver_peak_rss_gib_by_stage": manifest.get("driver_peak_rss_gib"),
        "scored": manifest["counts"]["output"]["scored"],
    }


def _totals(pieces: list[dict]) -> dict:
    """Wall time summed over the pieces of a run, peaks the largest of any piece."""
    return {
        "wall_s": round(sum(p["wall_s"] for p in pieces), 1),
        "driver_peak_rss_gib": max(p["driver_peak_rss_gib"] for p in pieces),
        "total_peak_rss_gib": max(p["total_peak_rss_gib"] for p in pieces),
        "largest_worker_private_gib": max(p.get("largest_worker_private_gib", 0) for p in pieces),
        "largest_worker": max(pieces, key=lambda p: p.get("largest_worker_private_gib", 0)).get(
            "largest_worker", ""
        ),
        "pieces": len(pieces),
        "stages_s_by_piece": [p.get("stages_s", {}) for p in pieces],
        "git": _git_head(),
    }


STAGE_DONE = re.compile(r"slap select: (\w+) done \(([\d.]+) s\)")


def _echo_stages(stream, stages: dict[str, float]) -> None:
    """Print the select's output as it comes and keep each finished stage's seconds."""
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        if match := STAGE_DONE.search(line):
            stages[match.group(1)] = float(match.group(2))


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything under it (Ray workers sit in their own groups)."""
    root = psutil.Process(pid)
    doomed = [root, *root.children(recursive=True)]
    for process in doomed:
        with contextlib.suppress(psutil.Error):
            process.suspend()
    doomed += [p for p in root.children(recursive=True) if p not in doomed]
    for process in doomed:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(doomed, timeout=30)


def scored_rows(out: Path) -> int:
    """Rows in the scored files that finished scorer calls wrote."""
    import pyarrow.parquet as pq

    from slap_ray.jobs.scoring import scored_files

    return sum(pq.ParquetFile(f).metadata.num_rows for f in scored_files(out / "scored"))


def _git_head() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True)
    return head.stdout.decode().strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000, 1_000_000])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--stop-after-s",
        type=float,
        help="kill a size's run after this many seconds and save it as `partial` (resumable)",
    )
    parser.add_argument("--set", nargs="*", default=[], help="extra section.key=value settings")
    parser.add_argument(
        "--chitchat", action="store_true", help="every chitchat pair, MiniLM strata"
    )
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.set)
    extra = {k: yaml.safe_load(v) for k, v in extra.items()}
    if args.chitchat:
        return chitchat(args, extra)
    out = Path(args.out)
    results = json.loads(out.read_text()) if args.resume and out.exists() else {"sizes": []}
    done = {r["rows"] for r in results["sizes"]}
    for rows in args.sizes:
        if rows in done:
            continue
        work = work_dir(f"size{rows}", args.resume)
        result = run_size(rows, work, extra, args.stop_after_s)
        if not result.get("complete", True):  # kept in work/ for --resume
            results["partial"] = result
            out.write_text(json.dumps(results, indent=2))
            print(json.dumps(result))
            return
        results.pop("partial", None)
        results["sizes"].append(result)
        results["sizes"].sort(key=lambda r: r["rows"])
        out.write_text(json.dumps(results, indent=2))
        shutil.rmtree(work)
        print(json.dumps(results["sizes"][-1]))
    sizes = results["sizes"]
    if len(sizes) >= 2:
        first, last = sizes[0], sizes[-1]
        results["driver_peak_growth"] = round(
            last["driver_peak_rss_gib"] / first["driver_peak_rss_gib"] - 1, 3
        )
        results["seconds_per_1k_rows"] = {
            str(r["rows"]): round(1000 * r["wall_s"] / r["rows"], 2) for r in sizes
        }
        out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "sizes"}))


def work_dir(name: str, resume: bool) -> Path:
    """A run's persistent folder; without ``resume`` any earlier partial run is discarded."""
    work = REPO / "bench" / "work" / name
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    return work


def chitchat(args, extra: dict) -> None:
    """Every chitchat pair with MiniLM strata (embedding + k-means) and tiny-model scoring."""
    extra = {"strata.by": "embedding", "strata.num_clusters": 8, "embed.num_cpus_per_actor": 2,
             **extra}  # fmt: skip
    out = Path(args.out if args.out != DEFAULT_OUT else REPO / "bench/results/select_chitchat.json")
    work = work_dir("chitchat", args.resume)
    result = run_size(None, work, extra)
    result["settings"] = extra
    out.write_text(json.dumps(result, indent=2))
    shutil.rmtree(work)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
