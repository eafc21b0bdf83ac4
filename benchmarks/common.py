"""What every benchmark shares: the command line, fixed threads, interleaved rounds, medians and spreads, the digits
data and small CNN, equality checks, the JSON of raw figures and the markdown table of ratios.

How a comparison is measured (the same everywhere):

* threads: `torch.set_num_threads(--threads)` (default 1: on a shared 2-core machine one thread per contender is
  the steadiest) and OMP_WAIT_POLICY=PASSIVE, set before torch starts its thread pool (see benchmarks/attention.py);
* rounds: the contenders run interleaved, A B C D, A B C D, … (`interleave`), each round a short run of
  `--steps / --rounds` steps, so a slow minute on a shared machine hits them all alike; every run starts from the
  same weights and sees the same batches (the equality checks run the full `--steps` in one run);
* warm-up: the first `--warmup` steps of every run are dropped;
* figures: the median of all kept per-step times (pooled over rounds), and the min–max of the per-round medians
  (how far a whole round drifted; single steps have outliers - a page fault, the other jobs - that say little);
  a ratio is paired: the median over rounds of (contender's median ÷ reference's median in the same round), so a
  load that changes between rounds, as it does on a machine shared with other jobs, cancels out;
* equality first: `check` raises `BenchmarkMismatch` when contenders did not compute the same thing, and a
  benchmark calls it before it reports any time.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: idle threads sleep, not spin

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # runnable as `python benchmarks/X.py` from anywhere
if str(ROOT / "tests") not in sys.path:
    sys.path.append(str(ROOT / "tests"))  # last: benchmarks/*.py names come first

# One home for launching and resetting accelerate, shared with the tests (benchmarks import them from here).
from helpers import command_failed, launch, launch_command, reset_accelerate  # noqa: E402, F401


class BenchmarkMismatch(AssertionError):
    """The contenders did not compute the same thing: no time is reported."""


def check(condition: bool, message: str) -> None:
    """Raise `BenchmarkMismatch(message)` unless `condition`; called before any time is reported."""
    if not condition:
        raise BenchmarkMismatch(message)


# --- command line and environment -----------------------------------------------------------------------------------
def parser(description: str, steps: int, rounds: int = 3, warmup: int = 20) -> argparse.ArgumentParser:
    """The flags every benchmark takes. `--smoke`: a few steps and one round, for CI (checks run, times mean little)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=steps,
                   help="timed steps per contender, split over the rounds (after warm-up)")
    p.add_argument("--rounds", type=int, default=rounds, help="interleaved rounds of all contenders")
    p.add_argument("--warmup", type=int, default=warmup, help="steps dropped at the start of every run")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every contender")
    p.add_argument("--smoke", action="store_true", help="CI: a few steps, one round")
    p.add_argument("--out", type=Path, default=None, help="JSON of raw figures (default benchmarks/results/NAME.json)")
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None, smoke_steps: int = 12) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.rounds, args.warmup = min(args.steps, smoke_steps), 1, min(args.warmup, 2)
    torch.set_num_threads(args.threads)
    return args


def per_round(args: argparse.Namespace) -> int:
    """Timed steps of each contender's run in one round."""
    return max(1, args.steps // args.rounds)


def machine() -> dict[str, Any]:
    """Where the figures were measured: date, CPU model, cores, versions, threads."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    import accelerate

    return {"date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(),
            "torch": torch.__version__, "accelerate": accelerate.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "load_average": os.getloadavg()}


# --- timing --------------------------------------------------------------------------------------------------------
class StepClock:
    """Per-step times of any training loop, read the same way for every contender: a forward pre-hook on the model
    notes the time each forward starts; the gaps between starts are step times (loop overhead, data, backward and
    optimizer included). The hook costs the same ~1 µs in every contender."""

    def __init__(self, model: nn.Module):
        self.starts: list[float] = []
        self._handle = model.register_forward_pre_hook(lambda module, inputs: self.starts.append(time.perf_counter()))

    def step_times(self, warmup: int, every: int = 1) -> list[float]:
        """Seconds per step after dropping `warmup` steps; `every`: forwards per step (SAM takes two)."""
        self._handle.remove()
        starts = self.starts[::every]
        return [b - a for a, b in zip(starts[warmup:], starts[warmup + 1:])]


def interleave(contenders: dict[str, Callable[[], list[float]]], rounds: int) -> dict[str, list[list[float]]]:
    """Run every contender once per round, in order (A B C, A B C, …); each returns its kept per-step seconds.
    Returns name -> one list of step times per round."""
    times: dict[str, list[list[float]]] = {name: [] for name in contenders}
    for index in range(rounds):
        for name, run in contenders.items():
            started = time.perf_counter()
            times[name].append(run())
            print(f"round {index + 1}/{rounds} {name}: median {statistics.median(times[name][-1]) * 1e3:.3f} ms "
                  f"({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
    return times


def paired_ratio(rounds: list[list[float]], reference: list[list[float]]) -> float:
    """The median over rounds of this round's median ÷ the reference's median in the same round."""
    return statistics.median(statistics.median(a) / statistics.median(b) for a, b in zip(rounds, reference))


def summary(rounds: list[list[float]]) -> dict[str, float]:
    """Median over all kept steps; min–max of the per-round medians (seconds)."""
    pooled = [t for r in rounds for t in r]
    medians = [statistics.median(r) for r in rounds]
    return {"median": statistics.median(pooled), "min": min(medians), "max": max(medians), "steps": len(pooled)}


# --- results --------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of a benchmark's table. `value` in `unit` (seconds are shown as ms or µs); `ratio` against the
    benchmark's reference; `target` in words (`≤ 1.01× (b)`) and `met` (None: informative, no target)."""

    benchmark: str
    contender: str
    value: float | None = None
    unit: str = "s"
    low: float | None = None
    high: float | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""

    def cells(self) -> list[str]:
        return [self.contender, show(self.value, self.unit),
                f"{show(self.low, self.unit)}–{show(self.high, self.unit)}" if self.low is not None else "",
                "" if self.ratio is None else f"{self.ratio:.3f}×", self.target,
                {True: "met", False: "**missed**", None: ""}[self.met] + (f" ({self.note})" if self.note else "")]


def show(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    if unit == "s":
        if value >= 1:
            return f"{value:.1f} s"
        return f"{value * 1e3:.3f} ms" if value >= 1e-3 else f"{value * 1e6:.1f} µs"
    if unit == "":
        return f"{value:.4g}"
    return f"{value:.4g} {unit}"


def markdown(rows: Sequence[Row], with_benchmark: bool = False) -> str:
    head = ["contender", "median / value", "min–max (round medians)", "ratio", "target", "met?"]
    if with_benchmark:
        head = ["benchmark"] + head
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = ([row.benchmark] if with_benchmark else []) + row.cells()
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(name: str, args: argparse.Namespace, rows: Sequence[Row], raw: dict[str, Any],
           checks: dict[str, Any]) -> dict[str, Any]:
    """Print the table, write the JSON of raw figures (benchmarks/results/NAME.json or --out); return the record."""
    record = {"benchmark": name, "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
              "checks": checks, "rows": [asdict(r) for r in rows], "raw": raw}
    out = args.out or RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=float) + "\n")
    print(f"\n### {name}\n\n{markdown(rows)}\n\nchecks: {json.dumps(checks, default=str)}\nwrote {out}", flush=True)
    return record


def time_rows(benchmark: str, times: dict[str, list[list[float]]], reference: str,
              targets: dict[str, tuple[str, float]] | None = None) -> list[Row]:
    """Rows of step-time medians with ratios to `reference`; targets: name -> (words, the largest allowed ratio)."""
    stats = {name: summary(rounds) for name, rounds in times.items()}
    rows = []
    for name, s in stats.items():
        ratio = paired_ratio(times[name], times[reference])
        words, limit = (targets or {}).get(name, ("", None))
        rows.append(Row(benchmark, name, s["median"], "s", s["min"], s["max"], ratio, words,
                        None if limit is None else ratio <= limit))
    return rows


# --- the shared workload: real digits, a small CNN ------------------------------------------------------------------
class DigitsBatches(torch.utils.data.Dataset):
    """scikit-learn's 1,797 handwritten 8×8 digits (the framework's embedded images) as in-memory tensors; a batch is
    one indexing op (`__getitems__`), so the loader costs every contender the same few microseconds."""

    def __init__(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
        self.labels = torch.tensor(digits.target, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[index], "label": self.labels[index]}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.tensor(indices)
        return {"pixel_values": self.images[index], "label": self.labels[index]}


def passthrough(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """collate_fn: `__getitems__` returns the batch already stacked."""
    return batch


def digits_loader(steps: int, batch_size: int = 64, seed: int = 0) -> torch.utils.data.DataLoader:
    """One epoch of exactly `steps` batches drawn (with replacement) from the digits in a fixed order: every
    contender sees the same batches, and the framework's per-epoch work (checkpoint, validation) happens once, after
    the timed steps."""
    generator = torch.Generator().manual_seed(seed)
    dataset = DigitsBatches()
    order = torch.randint(len(dataset), (steps * batch_size,), generator=generator).tolist()
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order, collate_fn=passthrough)


def small_cnn(seed: int = 0) -> nn.Module:
    """The loop-parity model: two 3×3 convolutions and a linear layer on 8×8 digits (~7k parameters; no dropout or
    BatchNorm, so every contender's arithmetic is the same op for op)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def tiny_model(seed: int = 0) -> nn.Module:
    """A linear classifier on the 8×8 digits: a step so cheap that what the loop adds around it shows."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two state dicts with the same keys (0.0: bitwise equal values)."""
    check(a.keys() == b.keys(), f"different state_dict keys: {sorted(a.keys() ^ b.keys())}")
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a.values(), b.values()))


def launch_ranks(script: Path, *args: str, launch_config: str) -> list[dict[str, Any]]:
    """Launch `script --worker --result_dir DIR args` on 2 ranks; each rank writes DIR/rank<R>.json (files, not
    stdout: the ranks' printed lines can interleave). Returns the ranks' results in rank order."""
    import tempfile

    with tempfile.TemporaryDirectory() as result_dir:
        # one thread per rank, idle threads asleep; a failed launch raises (RuntimeError with its output)
        launch(script, "--worker", "--result_dir", result_dir, *args, launch_config=launch_config, timeout=900,
               env={"OMP_WAIT_POLICY": "PASSIVE"}, check=True)
        paths = sorted(Path(result_dir).glob("rank*.json"))
        return [json.loads(path.read_text()) for path in paths]


def write_rank_result(result_dir: str, rank: int, result: dict[str, Any]) -> None:
    """A launched worker's result, one file per rank (see `launch_ranks`)."""
    (Path(result_dir) / f"rank{rank}.json").write_text(json.dumps(result))
