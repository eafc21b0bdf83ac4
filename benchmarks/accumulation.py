"""Gradient accumulation: k = 4 micro-batches of 16 against one batch of 64, in the framework's Trainer (same
samples, same small CNN without BatchNorm, so the two compute the same mean gradient: weights allclose), and the
number of gradient all-reduces per optimizer step under real 2-process DDP with k = 4 (exactly one: the micro-steps
in between run under DDP's `no_sync`). All-reduces are counted by a DDP communication hook that wraps the default
all-reduce (one call per gradient bucket; this model's gradients fit one bucket).

    .venv/bin/python benchmarks/accumulation.py [--steps 300] [--rounds 5] [--smoke]
    accelerate launch --config_file launch_configs/multi_cpu.yaml benchmarks/accumulation.py --worker   (what it runs)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import common  # noqa: F401  (threads and sys.path first)
import torch
from common import Row, check, interleave, launch_ranks, max_difference, parse, parser, per_round, report, time_rows, \
    write_rank_result
from framework.technique import Technique
from loop_parity import framework_loop

K = 4
ONE_BATCH, ACCUMULATED = "one batch of 64", f"k={K} micro-batches of {64 // K}"


class CountAllReduces(Technique):
    """Registers a DDP comm hook that counts the all-reduces it starts; notes the count of every optimizer step."""

    def __init__(self):
        self.per_step: list[int] = []
        self.buckets: set[int] = set()
        self._count = 0
        self.run: dict = {}

    def fit_start(self, state) -> None:
        accelerator = state.accelerator
        self.run = {"rank": accelerator.process_index, "world_size": accelerator.num_processes,
                    "distributed_type": accelerator.distributed_type.name}
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(process_group, bucket):
            self._count += 1
            self.buckets.add(bucket.index())
            return allreduce_hook(process_group, bucket)

        state.model.register_comm_hook(None, counting_hook)  # state.model is the DDP-wrapped model here

    def after_optimizer_step(self, state) -> None:
        self.per_step.append(self._count)
        self._count = 0


def worker(steps: int, result_dir: str) -> None:
    """Under `accelerate launch` (2 ranks): train with accumulation k and print the all-reduce counts."""
    counter = CountAllReduces()
    framework_loop(steps, 0, "cpu", {}, [counter], gradient_accumulation_steps=K)
    write_rank_result(result_dir, counter.run["rank"],
                      {**counter.run, "per_step": counter.per_step, "buckets": sorted(counter.buckets)})


def main(argv: Sequence[str] | None = None) -> dict:
    p = parser(__doc__.split("\n\n")[0], steps=300, rounds=5, warmup=10)
    p.add_argument("--worker", action="store_true", help="(run under accelerate launch)")
    p.add_argument("--result_dir", help="(the worker's: where each rank writes its result)")
    args = parse(p, argv, smoke_steps=6)
    if args.worker:
        return worker(args.steps, args.result_dir)
    finals: dict[str, dict] = {}

    def run(name: str, steps: int, warmup: int) -> list[float]:
        finals[name] = {}
        k = K if name == ACCUMULATED else 1
        return framework_loop(steps, warmup, "cpu", finals[name], gradient_accumulation_steps=k)

    for name in (ONE_BATCH, ACCUMULATED):
        run(name, args.steps, 0)
    difference = max_difference(finals[ONE_BATCH], finals[ACCUMULATED])
    allclose = all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in
                   zip(finals[ONE_BATCH].values(), finals[ACCUMULATED].values()))
    check(allclose, f"k={K} accumulation ended {difference:.3g} away from one {64}-sample batch")

    ranks = launch_ranks(Path(__file__), "--steps", str(min(args.steps, 20)), launch_config="multi_cpu.yaml")
    check(len(ranks) == 2 and all(r["world_size"] == 2 for r in ranks), f"expected 2 synchronised ranks: {ranks}")
    per_step = ranks[0]["per_step"]
    check(all(r["per_step"] == per_step for r in ranks), "the ranks counted different all-reduces")
    all_reduces_per_step = sum(per_step) / len(per_step)

    times = interleave({name: functools.partial(run, name, per_round(args), args.warmup)
                        for name in (ONE_BATCH, ACCUMULATED)}, args.rounds)
    rows = time_rows("accumulation", times, ONE_BATCH)
    rows.append(Row("accumulation", "2-process DDP: gradient all-reduces per optimizer step", all_reduces_per_step,
                    "", target="exactly 1", met=all(n == 1 for n in per_step),
                    note=f"{len(per_step)} steps, {len(ranks[0]['buckets'])} bucket(s)"))
    rows.append(Row("accumulation", f"weights, k={K} vs one batch: max abs difference", difference, "", target="allclose",
                    met=allclose))
    checks = {"weights_max_abs_difference": difference, "weights_allclose": allclose,
              "ddp_all_reduces_per_step": per_step, "ddp": ranks}
    return report("accumulation", args, rows, {"step_seconds": times}, checks)


if __name__ == "__main__":
    main()
