"""`make bench`: every benchmark, one after another, each in its own fresh process (no state carried between them),
then one markdown table of every ratio next to its target, with the machine it ran on.

    .venv/bin/python benchmarks/run_all.py [--smoke] [--only loop_parity dispatch ...] [--threads 1]

Writes benchmarks/results/NAME.json per benchmark, and benchmarks/results/summary.json and summary.md. A benchmark
that fails (a crash, or contenders that did not compute the same thing) is reported and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import common
from common import RESULTS, ROOT, Row, machine, markdown

HERE = ROOT / "benchmarks"
# name -> (arguments of the full run, arguments of the smoke run); the memory issue's benchmarks with small sizes,
# so the whole suite fits in 20 minutes on 2 cores.
SUITE: dict[str, tuple[list[str], list[str]]] = {
    "loop_parity": ([], ["--smoke"]),
    "dispatch": ([], ["--smoke"]),
    "host_syncs": ([], ["--smoke"]),
    "technique_prices": ([], ["--smoke"]),
    "accumulation": ([], ["--smoke"]),
    "data_loading": ([], ["--smoke"]),
    "time_to_accuracy": ([], ["--smoke"]),
    "sharding": ([], ["--smoke"]),
    "attention": (["--sizes", "1024", "2048", "4096", "--repeats", "2", "--threads", "1", "--target_n", "4096"],
                  ["--sizes", "256", "--repeats", "1", "--chunk", "64", "--threads", "1", "--target_n", "256",
                   "--variants", "naive", "chunked"]),
    "checkpointing": (["--context", "256", "--repeats", "3", "--threads", "1"],
                      ["--context", "32", "--layers", "2", "--n_embd", "64", "--repeats", "1", "--steps", "1"]),
    "ema_zero3": (["--repeats", "20"], ["--repeats", "2", "--width", "256", "--layers", "2"]),
}
LAUNCHED = {"ema_zero3": "deepspeed_zero3.yaml"}  # scripts that must run under accelerate launch


def command(name: str, args: list[str], threads: int, results: Path) -> list[str]:
    script = str(HERE / f"{name}.py")
    if name in LAUNCHED:
        return common.launch_command(script, *args, launch_config=LAUNCHED[name])
    out = ["--out", str(results / f"{name}.json")]
    if name in ("attention", "checkpointing"):  # they have their own thread flag and JSON layout
        return [sys.executable, script, *args, *out]
    return [sys.executable, script, *args, "--threads", str(threads), *out]


def verdict_rows(name: str, lines: Sequence[str]) -> list[Row]:
    """The memory benchmarks print their verdicts as `- what ...: met / MISSED` lines; one row each."""
    rows = []
    for line in lines:
        if line.startswith("- "):
            text = line[2:].replace("**", "")
            missed = "MISSED" in text or "missed" in text or ": no" in text
            rows.append(Row(name, text.rsplit(":", 1)[0] if text.endswith(("met", "yes")) else text,
                            met=not missed and ("met" in text or "yes" in text)))
    return rows


def rows_of(name: str, stdout: str, results: Path) -> list[Row]:
    path = results / f"{name}.json"
    if name == "ema_zero3":  # prints a table only: the gather/shard-local ratio
        ratios = re.findall(r"\| gather_each_update \| [\d.]+ \| [\d.–]+ \| ([\d.]+)× \|", stdout)
        return [Row(name, "gathering each update ÷ shard-local EMA update (ZeRO-3)", ratio=float(ratios[0]),
                    note="informative: why EMA stays shard-local")] if ratios else []
    record = json.loads(path.read_text())
    if name == "attention":
        return verdict_rows(name, record["verdicts"])
    if name == "checkpointing":
        return verdict_rows(name, [line for line in record["table"] if line.startswith("- ")])
    return [Row(**row) for row in record["rows"]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps of each (what CI runs)")
    parser.add_argument("--only", nargs="+", choices=list(SUITE), default=list(SUITE))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON files and summary go")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: rebuild the table from the results of earlier runs (e.g. one rerun alone)")
    args = parser.parse_args(argv)
    results = args.results
    results.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows: list[Row] = []
    outcome: dict[str, dict] = {}
    for name in args.only if args.collect else ():
        outcome[name] = {"returncode": 0, "seconds": None}
        log = results / f"{name}.log"
        rows.extend(rows_of(name, log.read_text() if log.exists() else "", results))
    for name in args.only if not args.collect else ():
        full, smoke = SUITE[name]
        begun = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        done = subprocess.run(command(name, smoke if args.smoke else full, args.threads, results), cwd=ROOT,
                              capture_output=True, text=True, env={**common.os.environ, "PYTHONPATH": str(ROOT)})
        seconds = time.perf_counter() - begun
        (results / f"{name}.log").write_text(done.stdout)  # --collect rebuilds the table from these
        shown = [line for line in done.stdout.splitlines() if line.startswith(("|", "#", "-", "checks", "EMA"))]
        print("\n".join(shown), flush=True)
        outcome[name] = {"returncode": done.returncode, "seconds": round(seconds, 1)}
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-5000:], sep="\n", file=sys.stderr)
            rows.append(Row(name, "FAILED (see its output)", met=False))
            continue
        rows.extend(rows_of(name, done.stdout, results))
    total = time.perf_counter() - started
    where = machine()
    took = "collected from earlier runs" if args.collect else f"`make bench` took {total / 60:.1f} min"
    head = (f"Measured {where['date']} on {where['cpu']}, {where['cores']} cores, torch {where['torch']}, accelerate "
            f"{where['accelerate']}, {args.threads} thread(s) per contender; {took}.")
    table = markdown(rows, with_benchmark=True)
    (results / "summary.md").write_text(f"{head}\n\n{table}\n")
    (results / "summary.json").write_text(json.dumps({"machine": where, "seconds": total, "benchmarks": outcome,
                                                      "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    print(f"\n{head}\n\n{table}\n\nwrote {results / 'summary.md'}")
    return 1 if any(o["returncode"] for o in outcome.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
