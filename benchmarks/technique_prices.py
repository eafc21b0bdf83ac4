"""Technique prices: the step time of the framework's Trainer with one technique, as a ratio to the same Trainer
with none. The model is the image recipe's ResNet (framework/models/resnet.py; BatchNorm, DropPath) on the 8×8 digits,
batch 64, AdamW; every run starts from the same weights and sees the same batches.

Checked before any time is reported: every run took its steps (SAM: two forward passes per step), ended with finite
weights, and the runs without a technique ended bitwise equal in every round (the comparison is deterministic). EMA
"costs at most one fused pass over the parameters": the aten ops its per-step hook issues are counted (one
`_foreach_lerp_` over all parameters and one `_foreach_copy_` of the buffers) and its extra time per step is shown
next to the time of that one fused pass alone.

    .venv/bin/python benchmarks/technique_prices.py [--steps 200] [--rounds 4] [--smoke]
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from types import SimpleNamespace

import common  # noqa: F401  (threads and sys.path first)
import torch
from common import Row, check, interleave, max_difference, paired_ratio, parse, parser, per_round, report, summary
from framework.models.resnet import ResNet, ResNetConfig
from framework.config import build_techniques
from loop_parity import framework_loop
from torch.utils._python_dispatch import TorchDispatchMode

TECHNIQUES = {  # name in the table -> the config the technique is built from
    "ema": {"ema": {"decay": 0.999}},
    "gradient_clipping": {"gradient_clipping": {"max_norm": 1.0}},
    "gradient_centralization": {"gradient_centralization": {}},
    "mixup": {"mixup": {"alpha": 0.2}},
    "cutmix": {"cutmix": {"cutmix_alpha": 1.0}},
    "label_smoothing": {"label_smoothing": {"epsilon": 0.1}},
    "stochastic_depth (drop path)": {"stochastic_depth": {"rate": 0.1}},
    "lookahead": {"lookahead": {"k": 5, "alpha": 0.5}},
    "sam": {"sam": {"rho": 0.05}},
}
TARGETS = {"sam": ("≈ 2× (≤ 2.2×)", 2.2)}
NONE = "no technique"


def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return ResNet(ResNetConfig(in_channels=1, num_classes=10))


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def ema_ops_and_pass_time() -> tuple[dict[str, int], float]:
    """The aten ops one EMA update issues (on the ResNet), and the seconds of one fused lerp over its parameters."""
    from framework.techniques.ema import EMA

    model = resnet()
    ema = EMA(decay=0.999)
    state = SimpleNamespace(accelerator=SimpleNamespace(unwrap_model=lambda m: m), model=model, step=1)
    ema.fit_start(state)
    with OpCounter() as counter:
        ema.after_optimizer_step(state)
    params, shadow = list(model.parameters()), [p.detach().clone() for p in model.parameters()]
    times = []
    for _ in range(200):
        started = time.perf_counter()
        torch._foreach_lerp_(shadow, params, 0.001)
        times.append(time.perf_counter() - started)
    return dict(counter.ops), statistics.median(times[20:])


def main(argv: Sequence[str] | None = None) -> dict:
    p = parser(__doc__.split("\n\n")[0], steps=200, rounds=4, warmup=10)
    p.add_argument("--only", nargs="*", default=None, help="a subset of the techniques")
    args = parse(p, argv, smoke_steps=4)
    chosen = {name: spec for name, spec in TECHNIQUES.items() if args.only is None or name in args.only}
    finals: dict[str, list[dict]] = {name: [] for name in [NONE, *chosen]}
    forwards: dict[str, list[int]] = {name: [] for name in finals}

    def run(name: str) -> list[float]:
        spec = chosen.get(name, {})
        final: dict = {}
        counter = Counter()
        model_fn = lambda: counted_model(counter)  # noqa: E731
        times = framework_loop(per_round(args), args.warmup, "cpu", final, build_techniques(spec), model_fn=model_fn,
                               forwards_per_step=2 if "sam" in spec else 1)
        finals[name].append(final)
        forwards[name].append(counter["forward"])
        return times

    times = interleave({name: functools.partial(run, name) for name in finals}, args.rounds)
    total = per_round(args) + args.warmup
    for name in finals:
        expected = total * (2 if "sam" in chosen.get(name, {}) else 1)
        check(all(f == expected for f in forwards[name]), f"{name}: {forwards[name]} forward passes, expected {expected}")
        check(all(math.isfinite(v.float().sum().item()) for final in finals[name] for v in final.values()),
              f"{name}: non-finite weights")
    repeat_differences = [max_difference(finals[NONE][0], final) for final in finals[NONE]]
    check(all(d == 0.0 for d in repeat_differences), f"runs without a technique differ between rounds: "
                                                       f"{repeat_differences}")
    ops, fused_pass = ema_ops_and_pass_time()
    parameters = len(list(resnet().parameters()))
    check(ops.get("_foreach_lerp_", 0) == 1, f"EMA issued {ops} per update, expected one _foreach_lerp_")

    stats = {name: summary(t) for name, t in times.items()}
    base = stats[NONE]["median"]
    rows = []
    for name, s in stats.items():
        words, limit = TARGETS.get(name, ("", None))
        ratio = paired_ratio(times[name], times[NONE])
        rows.append(Row("technique prices", name, s["median"], "s", s["min"], s["max"], ratio, words,
                        None if limit is None else ratio <= limit))
    if "ema" in stats:
        extra = (paired_ratio(times["ema"], times[NONE]) - 1) * base
        rows.append(Row("technique prices", "ema: aten ops per update", None, "", target="one fused pass",
                        met=ops.get("_foreach_lerp_") == 1 and sum(ops.values()) <= 2,
                        note=", ".join(f"{op} ×{n}" for op, n in ops.items()) + f" over {parameters} parameters"))
        rows.append(Row("technique prices", "ema: extra time per step ÷ one fused lerp", extra / fused_pass, "",
                        ratio=extra / fused_pass, note=f"{extra * 1e6:.0f} µs vs {fused_pass * 1e6:.0f} µs"))
    checks = {"forward_passes": forwards, "none_runs_bitwise_equal": True, "ema_ops_per_update": ops}
    return report("technique_prices", args, rows, {"step_seconds": times, "fused_lerp_seconds": fused_pass}, checks)


def counted_model(counter: Counter) -> torch.nn.Module:
    model = resnet()
    model.register_forward_pre_hook(lambda module, inputs: counter.update(["forward"]))
    return model


if __name__ == "__main__":
    main()
