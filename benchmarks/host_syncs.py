"""Host synchronisation audit: how often does the loop make the host wait for the device? Every call of
`Tensor.item`, `.tolist`, `.numpy`, `float(t)`, `int(t)`, `bool(t)` (and `if t:`) and `t.__index__` during training is
counted, with the line that made it, while the framework's Trainer trains for `--steps` steps at the default logging
interval (`TrainerConfig.log_every`, 50), with no techniques and with the default technique set (the doctor, whose
values ride in the log line's one read: `TrainState.read_with_log_line`), and at `log_every` 10.

Not counted: `torch.optim`'s own `.item()` on Adam's step counter, a CPU scalar unless `capturable=True`, and
`torch.utils.data`'s `.item()` on the CPU generator that seeds each epoch's workers: neither ever waits for a GPU,
and a plain PyTorch loop makes the same calls. Counting starts at `fit_start` (after setup)
and stops at `fit_end`.

    .venv/bin/python benchmarks/host_syncs.py [--steps 200] [--smoke]
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import common  # noqa: F401  (threads and sys.path first)
import torch
from common import Row, check, parse, parser, report, small_cnn
from framework.config import TrainerConfig
from framework.technique import Technique
from loop_parity import framework_loop

SYNCS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")
TARGET = 0.02
HOST_ONLY = (str(Path(torch.optim.__file__).parent), str(Path(torch.utils.data.__file__).parent))


class SyncCounter:
    """Patches the Tensor methods that copy a value to the host; counts calls by the line that made them."""

    def __init__(self):
        self.on = False
        self.sites: Counter[str] = Counter()
        self.per_step: list[int] = []
        self._since_step = 0

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        originals = {name: getattr(torch.Tensor, name) for name in SYNCS}
        for name, original in originals.items():
            setattr(torch.Tensor, name, self._wrap(name, original))
        try:
            yield
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)

    def _wrap(self, name: str, original):
        counter = self

        def call(tensor, *args, **kwargs):
            if counter.on:
                caller = sys._getframe(1)
                if not caller.f_code.co_filename.startswith(HOST_ONLY):
                    counter.sites[f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno} .{name}"] += 1
                    counter._since_step += 1
            return original(tensor, *args, **kwargs)
        return call

    def end_step(self) -> None:
        self.per_step.append(self._since_step)
        self._since_step = 0

    def technique(self) -> Technique:
        """Switches counting on at fit_start, off at fit_end, and notes the count of every step (a step ends where
        the next begins, so its log line and checkpoint count with it)."""
        counter = self

        class CountHostSyncs(Technique):
            def fit_start(self, state):
                counter.on = True

            def on_batch(self, state, batch):
                if state.step:
                    counter.end_step()
                return batch

            def fit_end(self, state):
                counter.end_step()
                counter.on = False
        return CountHostSyncs()


def audit(steps: int, **config) -> SyncCounter:
    from framework.config import build_techniques

    counter = SyncCounter()
    techniques = [counter.technique()]
    if config.pop("doctor", False):
        techniques = build_techniques({"doctor": {}}) + techniques
    with counter.patched():
        framework_loop(steps, 0, "cpu", {}, techniques, model_fn=small_cnn, **config)
    check(len(counter.per_step) == steps, f"counted {len(counter.per_step)} steps, ran {steps}")
    return counter


def main(argv: Sequence[str] | None = None) -> dict:
    p = parser(__doc__.split("\n\n")[0], steps=200, rounds=1, warmup=0)
    args = parse(p, argv, smoke_steps=20)
    default = TrainerConfig.log_every
    cases = {f"no techniques, log_every {default} (default)": {"log_every": default},
             f"doctor (default techniques), log_every {default}": {"doctor": True, "log_every": default},
             "no techniques, log_every 10": {"log_every": 10}}
    rows, raw = [], {}
    for name, config in cases.items():
        counter = audit(args.steps, **config)
        log_every = config["log_every"]
        off_log = [n for step, n in enumerate(counter.per_step, 1) if step % log_every and step != args.steps]
        per_step = sum(counter.per_step) / args.steps
        raw[name] = {"sites": dict(counter.sites), "per_step": counter.per_step,
                     "syncs_on_steps_without_a_log_line": sum(off_log)}
        at_default = config["log_every"] == default  # the target is for the default interval; 10 is shown for scale
        rows.append(Row("host syncs", name, per_step, "syncs/step",
                        target=f"≤ {TARGET}/step; none between log lines" if at_default else "",
                        met=per_step <= TARGET and not any(off_log) if at_default else None,
                        note=", ".join(f"{site} ×{n}" for site, n in counter.sites.most_common())))
    checks = {name: {"syncs_between_log_lines": r["syncs_on_steps_without_a_log_line"]} for name, r in raw.items()}
    return report("host_syncs", args, rows, raw, checks)


if __name__ == "__main__":
    main()
