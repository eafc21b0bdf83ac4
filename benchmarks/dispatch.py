"""Plug-in dispatch: what does a technique cost the loop when it does nothing? The framework's Trainer with 0, 4 and 16
no-op techniques that override every hook, on a linear model (a step so cheap that the loop's own cost shows).
Cost per technique per step = the least-squares slope of median step time over the number of techniques, within
each round, median over rounds. The same
dispatch is also timed alone (the loop's hook calls for one step, without training), which is far less noisy.

Checked before timing: every run ends with the same weights (no-op techniques change nothing), and every no-op
hook was called as often as the loop promises (per step: on_batch, on_loss, after_backward, before_optimizer_step,
after_optimizer_step, batch_end).

    .venv/bin/python benchmarks/dispatch.py [--steps 1000] [--rounds 10] [--counts 0 4 16] [--smoke]
"""

from __future__ import annotations

import functools
import statistics
import time
from collections import Counter
from collections.abc import Sequence

import common  # noqa: F401  (threads and sys.path first)
from common import Row, check, interleave, max_difference, paired_ratio, parse, parser, per_round, report, summary, \
    tiny_model
from framework.technique import HOOKS, Technique, hook_table
from loop_parity import framework_loop

PER_STEP_HOOKS = ("on_batch", "on_loss", "after_backward", "before_optimizer_step", "after_optimizer_step", "batch_end")
TARGET_SECONDS = 3e-6


class NoOp(Technique):
    """Overrides every hook and does nothing."""

    def before_prepare(self, state): pass
    def fit_start(self, state): pass
    def epoch_start(self, state): pass
    def on_batch(self, state, batch): return batch
    def on_loss(self, state, loss, batch, outputs): return loss
    def after_backward(self, state): pass
    def before_optimizer_step(self, state): pass
    def optimizer_step(self, state, recompute_gradients): pass
    def after_optimizer_step(self, state): pass
    def batch_end(self, state, logs): pass
    def epoch_end(self, state): pass
    def eval_start(self, state): pass
    def eval_end(self, state): pass
    def fit_end(self, state): pass


assert all(NoOp().overrides(hook) for hook in HOOKS)  # "hooking every event"


def no_ops(count: int, calls: Counter[str] | None = None) -> list[NoOp]:
    """`count` no-op techniques; each its own class, as the loop refuses the same technique listed twice. With
    `calls`, every hook call is counted there (for the check run only: counting costs more than the no-op)."""
    techniques = [type(f"NoOp{i}", (NoOp,), {})() for i in range(count)]
    for technique in techniques if calls is not None else ():
        for hook in HOOKS:
            setattr(technique, hook, counted(getattr(technique, hook), hook, calls))
    return techniques


def counted(method, hook: str, calls: Counter[str]):
    def call(*args):
        calls[hook] += 1
        return method(*args)
    return call


def dispatch_alone(count: int, repeats: int = 2000) -> float:
    """Seconds per step of the loop's hook calls for `count` no-op techniques, without any training around them."""
    hooks = hook_table(no_ops(count))
    state, batch, loss = object(), {}, 0.0
    times = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeats):  # the same statements as framework/loop.py's step
            for hook in hooks["on_batch"]:
                batch = hook(state, batch)
            for hook in hooks["on_loss"]:
                loss = hook(state, loss, batch, None)
            for name in ("after_backward", "before_optimizer_step", "after_optimizer_step"):
                for method in hooks[name]:
                    method(state)
            for hook in hooks["batch_end"]:
                hook(state, {"loss": loss})
        times.append((time.perf_counter() - started) / repeats)
    return statistics.median(times)


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def main(argv: Sequence[str] | None = None) -> dict:
    p = parser(__doc__.split("\n\n")[0], steps=1000, rounds=10, warmup=20)
    p.add_argument("--counts", type=int, nargs="+", default=[0, 4, 16])
    args = parse(p, argv)
    finals: dict[int, dict] = {}

    def run(count: int, steps: int, warmup: int, calls: Counter[str] | None = None) -> list[float]:
        finals[count] = {}
        return framework_loop(steps, warmup, "cpu", finals[count], no_ops(count, calls), model_fn=tiny_model)

    for count in args.counts:  # equality and call counts first
        calls: Counter[str] = Counter()
        run(count, args.steps, args.warmup, calls)
        expected = count * (args.steps + args.warmup)
        check(all(calls[h] == expected for h in PER_STEP_HOOKS),
              f"{count} no-op techniques: hooks called {dict(calls)} times, expected {expected} per step hook")
    differences = {count: max_difference(finals[args.counts[0]], finals[count]) for count in args.counts}
    check(all(d == 0.0 for d in differences.values()), f"no-op techniques changed the weights: {differences}")

    names = {count: f"{count} no-op techniques" for count in args.counts}
    times = interleave({names[c]: functools.partial(run, c, per_round(args), args.warmup) for c in args.counts},
                       args.rounds)
    stats = {count: summary(times[names[count]]) for count in args.counts}
    # Paired: the slope within each round (the same minute of the shared machine), then the median over rounds.
    per_technique = statistics.median(
        slope(args.counts, [statistics.median(times[names[c]][r]) for c in args.counts]) for r in range(args.rounds))
    alone = {count: dispatch_alone(count) for count in args.counts}
    per_technique_alone = slope(args.counts, [alone[c] for c in args.counts])
    rows = [Row("dispatch", names[c], stats[c]["median"], "s", stats[c]["min"], stats[c]["max"],
                paired_ratio(times[names[c]], times[names[args.counts[0]]])) for c in args.counts]
    rows.append(Row("dispatch", "per technique per step, in the Trainer (slope)", per_technique, "s",
                    target="≤ 3 µs", met=per_technique <= TARGET_SECONDS,
                    note="" if per_technique <= TARGET_SECONDS else "noise of the shared machine: see the line below"))
    rows.append(Row("dispatch", "per technique per step, hook calls alone (slope)", per_technique_alone, "s",
                    target="≤ 3 µs", met=per_technique_alone <= TARGET_SECONDS))
    checks = {"same_weights": differences, "hook_calls_per_step": list(PER_STEP_HOOKS)}
    return report("dispatch", args, rows, {"step_seconds": times, "dispatch_alone_seconds": alone}, checks)


if __name__ == "__main__":
    main()
