"""Data loading: the framework's image loader (framework/data: the embedded digits through `datasets` with the
recipe's torchvision v2 pipeline at 32×32, batch 64, `make_loader`'s workers) against a raw `DataLoader(dataset,
batch_size=64)` in the same shuffled order on the very same dataset object and transforms: throughput (samples per second of
whole epochs), interleaved rounds, each on fresh loaders whose first epoch (worker start-up) is dropped. Checked first: both yield the same batches.

Then `perf/data_wait`, the share of training time the loop waited for data, as the framework logs it against an
external timer: the time spent inside the prepared loader's `next()` (timed by wrapping accelerate's
`DataLoaderShard.__iter__`) over the wall time from the first `epoch_start` to the last `batch_end`, for the image
recipe's ResNet with loader workers 0 (loading in the training process) and the default.

    .venv/bin/python benchmarks/data_loading.py [--epochs 6] [--rounds 3] [--steps 20] [--smoke]
"""

from __future__ import annotations

import contextlib
import functools
import json
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import common  # noqa: F401  (threads and sys.path first)
import torch
from common import Row, check, interleave, paired_ratio, parse, parser, report, summary
from framework.data import ImageDataConfig, image_data
from framework.models.resnet import ResNet, ResNetConfig
from framework.technique import Technique
from loop_parity import framework_loop

FRAMEWORK, RAW = "framework loader (make_loader)", "raw DataLoader"
TARGET_THROUGHPUT, TARGET_POINTS = 0.98, 0.02


def loaders(num_workers: int | None = None) -> dict[str, torch.utils.data.DataLoader]:
    data = image_data(ImageDataConfig(num_workers=num_workers), seed=0)
    framework = data.loaders["train"]
    order = torch.randperm(len(framework.dataset), generator=torch.Generator().manual_seed(0)).tolist()
    raw = torch.utils.data.DataLoader(framework.dataset, batch_size=framework.batch_size, sampler=order)
    return {FRAMEWORK: framework, RAW: raw}


def batch_times(name: str, epochs: int) -> list[float]:
    """Seconds per batch of each epoch (epoch time ÷ batches: workers deliver in bursts, so single gaps say little)
    over `epochs` epochs of a fresh loader, the first epoch (worker start-up) dropped."""
    loader = loaders()[name]
    times = []
    for epoch in range(epochs):
        started = time.perf_counter()
        count = sum(1 for _ in loader)
        if epoch:
            times.append((time.perf_counter() - started) / count)
    return times


class WallClock(Technique):
    """The external timer's wall time: from the first `epoch_start` to the last `batch_end`."""

    def __init__(self):
        self.first = self.last = None

    def epoch_start(self, state):
        self.first = self.first or time.perf_counter()

    def batch_end(self, state, logs):
        self.last = time.perf_counter()


@contextlib.contextmanager
def timed_next() -> Iterator[list[float]]:
    """Seconds spent inside `next()` of every prepared (accelerate) loader while active."""
    from accelerate.data_loader import DataLoaderShard

    waits: list[float] = []
    original = DataLoaderShard.__iter__

    def iterate(self):
        iterator = original(self)
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            waits.append(time.perf_counter() - started)
            yield batch

    DataLoaderShard.__iter__ = iterate
    try:
        yield waits
    finally:
        DataLoaderShard.__iter__ = original


def data_wait(steps: int, num_workers: int | None) -> dict[str, float]:
    """perf/data_wait as logged (one log line over `steps` steps of one epoch) and as timed from outside."""
    data = image_data(ImageDataConfig(num_workers=num_workers), seed=0)
    check(steps <= len(data.loaders["train"]), "keep the run within one epoch (epoch ends are not training time)")
    clock = WallClock()
    model = functools.partial(lambda: ResNet(replace(ResNetConfig(), in_channels=1, num_classes=10)))
    with tempfile.TemporaryDirectory() as output_dir, timed_next() as waits:
        framework_loop(steps, 0, "cpu", {}, [clock], model_fn=model, loader=data.loaders["train"],
                       output_dir=output_dir, log_every=steps)
        lines = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    logged = [line["perf/data_wait"] for line in lines if "perf/data_wait" in line]
    check(len(logged) == 1, f"expected one log line with perf/data_wait, got {len(logged)}")
    external = sum(waits) / (clock.last - clock.first)
    return {"logged": logged[0], "external": external, "batches": len(waits)}


def main(argv: Sequence[str] | None = None) -> dict:
    p = parser(__doc__.split("\n\n")[0], steps=20, rounds=3, warmup=0)
    p.add_argument("--epochs", type=int, default=6, help="epochs per round and loader (the first is dropped)")
    args = parse(p, argv, smoke_steps=5)
    if args.smoke:
        args.epochs = 2
    pair = loaders()
    first = [next(iter(loader)) for loader in pair.values()]
    check(all(torch.equal(first[0][k], first[1][k]) for k in first[0]),
          "the framework's loader and the raw DataLoader yield different batches")

    times = interleave({name: functools.partial(batch_times, name, args.epochs) for name in pair}, args.rounds)
    stats = {name: summary(t) for name, t in times.items()}
    throughput = paired_ratio(times[RAW], times[FRAMEWORK])  # seconds raw ÷ framework = samples/s framework ÷ raw
    batch = pair[FRAMEWORK].batch_size
    rows = [Row("data loading", name, batch / s["median"], "samples/s", batch / s["max"], batch / s["min"],
                paired_ratio(times[RAW], times[name])) for name, s in stats.items()]
    rows[0].target, rows[0].met = f"≥ {TARGET_THROUGHPUT}× raw", throughput >= TARGET_THROUGHPUT
    rows[0].note = f"{pair[FRAMEWORK].num_workers} worker(s) vs {pair[RAW].num_workers}"
    waits = {}
    for workers in (0, None):
        label = "0 workers" if workers == 0 else "default workers"
        waits[label] = data_wait(args.steps, workers)
        gap = abs(waits[label]["logged"] - waits[label]["external"])
        rows.append(Row("data loading", f"perf/data_wait, {label}: logged vs external timer", waits[label]["logged"],
                        "", ratio=None, target="within 2 points", met=gap <= TARGET_POINTS,
                        note=f"external {waits[label]['external']:.3f}, {gap * 100:.2f} points apart"))
    checks = {"same_batches": True, "data_wait": waits}
    return report("data_loading", args, rows, {"batch_seconds": times, "data_wait": waits}, checks)


if __name__ == "__main__":
    main()
