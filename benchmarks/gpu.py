"""The GPU variant (one script, a few minutes, for a machine with a CUDA GPU): loop parity on the GPU, the bf16
speed-up of the framework's Trainer, and attention at long sequences in bf16.

    .venv/bin/python benchmarks/gpu.py [--steps 500] [--rounds 3] [--smoke]

Writes benchmarks/results/gpu_*.json and prints their tables. The loop-parity contenders are compared with a
tolerance on the GPU (cuDNN may choose different kernels run to run), not bitwise.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Sequence

import common  # noqa: F401  (sys.path first)
import torch
import torch.nn.functional as F
from common import RESULTS, ROOT, DigitsBatches, check, interleave, parse, parser, passthrough, report, time_rows

HERE = ROOT / "benchmarks"


def upsampled_digits(steps: int, batch_size: int = 256) -> torch.utils.data.DataLoader:
    """The digits at 32×32 (bilinear), `steps` batches in a fixed order: enough work per step for a GPU."""
    dataset = DigitsBatches()
    dataset.images = F.interpolate(dataset.images, size=32, mode="bilinear", align_corners=False)
    order = torch.randint(len(dataset), (steps * batch_size,), generator=torch.Generator().manual_seed(0)).tolist()
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order, collate_fn=passthrough)


def bf16_speedup(args) -> dict:
    from framework.models.resnet import ResNet, ResNetConfig
    from loop_parity import framework_loop

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return ResNet(ResNetConfig(in_channels=1, num_classes=10, widths=(64, 128, 256), blocks_per_stage=2))

    finals: dict[str, dict] = {}

    def run(precision: str) -> list[float]:
        os.environ["ACCELERATE_MIXED_PRECISION"] = precision  # what `accelerate launch --mixed_precision` sets
        try:
            finals[precision] = {}
            return framework_loop(args.steps, args.warmup, "cuda", finals[precision], model_fn=model,
                                  loader=upsampled_digits(args.steps + args.warmup))
        finally:
            os.environ.pop("ACCELERATE_MIXED_PRECISION", None)

    times = interleave({"fp32": functools.partial(run, "no"), "bf16": functools.partial(run, "bf16")}, args.rounds)
    for precision, final in finals.items():
        check(all(torch.isfinite(v.float()).all() for v in final.values()), f"{precision}: non-finite weights")
    rows = time_rows("gpu bf16", times, "fp32", {"bf16": ("faster than fp32 (< 1×)", 1.0)})
    return report("gpu_bf16", args, rows, {"step_seconds": times}, {"finite_weights": True})


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0], steps=500, rounds=3, warmup=30)
    args = parse(p, argv)
    check(torch.cuda.is_available(), "benchmarks/gpu.py needs a CUDA GPU")
    print(f"GPU: {torch.cuda.get_device_name()}", flush=True)
    steps = ["--steps", str(args.steps), "--rounds", str(args.rounds)] if not args.smoke else ["--smoke"]
    failed = 0
    for script, extra in (("loop_parity.py", ["--device", "cuda", *steps, "--out", str(RESULTS / "gpu_loop_parity.json")]),
                          ("attention.py", ["--device", "cuda", "--dtype", "bf16", "--sizes",
                                            *(["1024"] if args.smoke else ["4096", "8192", "16384", "32768"]),
                                            "--out", str(RESULTS / "gpu_attention.json")])):
        done = subprocess.run([sys.executable, str(HERE / script), *extra], cwd=ROOT)
        failed |= done.returncode
    bf16_speedup(args)
    return failed


if __name__ == "__main__":
    sys.exit(main())
