"""Loop parity: does the framework's loop cost anything? The same small CNN, digits batches, seed and AdamW for
`--steps` steps in (a) a plain PyTorch loop, (b) a hand-written Accelerate loop, (c) this framework's `Trainer` with no
techniques, (d) Lightning's `Trainer` (progress bar, logger, checkpointing off); plus the plain loop with one piece of
Accelerate at a time (its prepared DataLoader, `accelerator.backward`, its wrapped optimizer), which shows where
Accelerate's per-step cost goes.

Checked before any time is reported: (b) and (c) end with bitwise-equal weights (so do (a) and every partial
variant: Accelerate on one CPU process changes no arithmetic); Lightning's within 1e-5.

    .venv/bin/python benchmarks/loop_parity.py [--steps 1000] [--rounds 10] [--threads 1] [--smoke]
    .venv/bin/python benchmarks/loop_parity.py --device cuda          (what benchmarks/gpu.py runs)
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import common  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads; puts the repository on sys.path)
import torch
import torch.nn.functional as F
from common import Row, StepClock, check, digits_loader, interleave, max_difference, parse, parser, per_round, \
    report, reset_accelerate, small_cnn, time_rows, weights

LR = 1e-3
PLAIN, ACCELERATE, FRAMEWORK, LIGHTNING = "(a) plain PyTorch", "(b) Accelerate", "(c) framework Trainer", \
    "(d) Lightning Trainer"
PARTIAL = {"(a) + prepared DataLoader": {"loader"}, "(a) + accelerator.backward": {"backward"},
           "(a) + prepared optimizer": {"optimizer"}}
TARGETS = {FRAMEWORK: ("≤ 1.05× (a); ≤ 1.01× (b); < (d)", 1.05)}


def plain_loop(steps: int, warmup: int, device: str, final: dict) -> list[float]:
    model = small_cnn().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    clock = StepClock(model)
    for batch in digits_loader(steps + warmup):
        x, y = batch["pixel_values"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    final.update(weights(model))
    return clock.step_times(warmup)


def accelerate_loop(steps: int, warmup: int, device: str, final: dict,
                    pieces: frozenset[str] = frozenset({"loader", "backward", "optimizer"})) -> list[float]:
    """The loop from Accelerate's README (prepare, accelerator.backward), or the plain loop with only `pieces`."""
    from accelerate import Accelerator

    reset_accelerate()
    accelerator = Accelerator(cpu=device == "cpu")
    model = small_cnn()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    loader = digits_loader(steps + warmup)
    model = accelerator.prepare(model)
    if "optimizer" in pieces:
        optimizer = accelerator.prepare(optimizer)
    if "loader" in pieces:
        loader = accelerator.prepare(loader)
    clock = StepClock(model)
    for batch in loader:
        x, y = batch["pixel_values"].to(accelerator.device), batch["label"].to(accelerator.device)
        loss = F.cross_entropy(model(x), y)
        if "backward" in pieces:
            accelerator.backward(loss)
        else:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    final.update(weights(accelerator.unwrap_model(model)))
    accelerator.end_training()
    return clock.step_times(warmup)


def framework_loop(steps: int, warmup: int, device: str, final: dict, techniques: Sequence[Any] = (),
                   model_fn: Callable[[], torch.nn.Module] = small_cnn, forwards_per_step: int = 1,
                   loader: torch.utils.data.DataLoader | None = None, **config: Any) -> list[float]:
    """This framework's Trainer with `techniques` (none by default) and its default logging (every 10 steps), on
    `loader` (default: the digits batches); `config`: TrainerConfig fields."""
    from framework.config import TrainerConfig
    from framework.loop import Trainer
    from framework.task import ClassificationTask

    reset_accelerate()
    model = model_fn()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    with tempfile.TemporaryDirectory() as output_dir:
        settings = dict(output_dir=output_dir, max_steps=steps + warmup, tracker="none", doctor=False,
                        overwrite=True, eval_every=0)
        trainer = Trainer(TrainerConfig(**{**settings, **config}), model, optimizer, ClassificationTask(10),
                          loader or digits_loader((steps + warmup) * config.get("gradient_accumulation_steps", 1),
                                                  batch_size=64 // config.get("gradient_accumulation_steps", 1)),
                          techniques=list(techniques))
        clock = StepClock(model)
        trainer.fit()
    final.update(weights(model))
    # One step = one optimizer step: `gradient_accumulation_steps` forwards (SAM: two per micro-batch).
    return clock.step_times(warmup, every=forwards_per_step * config.get("gradient_accumulation_steps", 1))


@contextlib.contextmanager
def accelerate_as_shipped() -> Iterator[None]:
    """Importing the framework caches accelerate's `is_lomo_available()` (framework/backend.py: accelerate 1.15's
    optimizer step asks it twice per step, each a search of sys.path on disk). The hand-written loops run with
    accelerate as a user without the framework gets it."""
    import accelerate.optimizer

    cached = accelerate.optimizer.is_lomo_available
    accelerate.optimizer.is_lomo_available = getattr(cached, "__wrapped__", cached)
    try:
        yield
    finally:
        accelerate.optimizer.is_lomo_available = cached


def lightning_loop(steps: int, warmup: int, device: str, final: dict) -> list[float]:
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = small_cnn()

        def training_step(self, batch, batch_index):
            return F.cross_entropy(self.model(batch["pixel_values"]), batch["label"])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.parameters(), lr=LR)

    module = Module()
    clock = StepClock(module.model)
    trainer = L.Trainer(max_steps=steps + warmup, accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                        enable_progress_bar=False, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, digits_loader(steps + warmup))
    final.update(weights(module.model))
    return clock.step_times(warmup)


def main(argv: Sequence[str] | None = None) -> dict:
    p = parser(__doc__.split("\n\n")[0], steps=1000, rounds=10, warmup=20)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no_lightning", action="store_true", help="leave out (d)")
    args = parse(p, argv)
    import lightning  # noqa: F401  (imported once, before timing: its import takes seconds)

    runs: dict[str, tuple[Callable[..., list[float]], dict]] = {
        PLAIN: (plain_loop, {}), ACCELERATE: (accelerate_loop, {}), FRAMEWORK: (framework_loop, {})}
    if not args.no_lightning:
        runs[LIGHTNING] = (lightning_loop, {})
    if args.device == "cpu":
        runs.update({name: (accelerate_loop, {"pieces": frozenset(pieces)}) for name, pieces in PARTIAL.items()})
    finals: dict[str, dict] = {}

    def go(name: str, steps: int, warmup: int) -> list[float]:
        run, kwargs = runs[name]
        finals[name] = {}
        with accelerate_as_shipped() if run is accelerate_loop else contextlib.nullcontext():
            return run(steps, warmup, args.device, finals[name], **kwargs)

    # Equality first: a full run of each, compared, before anything is timed.
    equal_steps = args.steps
    for name in runs:
        go(name, equal_steps, 0)
    exact = args.device == "cpu"  # CUDA kernels may pick different algorithms run to run
    differences = {name: max_difference(finals[ACCELERATE], final) for name, final in finals.items()}
    for name, difference in differences.items():
        limit = 1e-3 if not exact else 1e-5 if name == LIGHTNING else 0.0
        check(difference <= limit, f"{name} ended {difference:.3g} away from (b)'s weights after {equal_steps} steps")

    contenders = {name: functools.partial(go, name, per_round(args), args.warmup) for name in runs}
    times = interleave(contenders, args.rounds)
    differences_timed = {name: max_difference(finals[ACCELERATE], final) for name, final in finals.items()}
    check(differences_timed[FRAMEWORK] == 0.0 or not exact,
          f"(c)'s final weights differ from (b)'s by {differences_timed[FRAMEWORK]:.3g} after the timed runs")
    rows = time_rows("loop parity", times, PLAIN, TARGETS)
    by_name = {row.contender: row for row in rows}
    framework, accelerate = by_name[FRAMEWORK].value, by_name[ACCELERATE].value
    by_name[FRAMEWORK].met = by_name[FRAMEWORK].met and framework <= 1.01 * accelerate and (
        LIGHTNING not in by_name or framework < by_name[LIGHTNING].value)
    rows.append(Row("loop parity", "(c) / (b)", framework / accelerate, "", ratio=framework / accelerate,
                    target="≤ 1.01", met=framework / accelerate <= 1.01))
    if LIGHTNING in by_name:
        rows.append(Row("loop parity", "(c) / (d)", framework / by_name[LIGHTNING].value, "",
                        ratio=framework / by_name[LIGHTNING].value, target="< 1", met=framework <
                        by_name[LIGHTNING].value))
    checks = {"max_abs_difference_to_b_after_equality_run": differences,
              "max_abs_difference_to_b_after_timed_runs": differences_timed,
              "b_c_bitwise_equal": differences_timed[FRAMEWORK] == 0.0}
    return report("loop_parity", args, rows, {"step_seconds": times}, checks)


if __name__ == "__main__":
    main()
