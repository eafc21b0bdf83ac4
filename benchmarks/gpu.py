"""The GPU variant (one script, a few minutes, for a machine with a CUDA GPU): loop parity on the GPU, the bf16
speed-up of the framework's Trainer, attention at long sequences in bf16, and the language-model recipe with a
transformers Llama under bf16 with `sdpa` and `framework_chunked` attention (tokens/s, TFLOP/s and MFU).

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


#: A Llama sized for a GPU (~150M parameters with the 8k BPE): the recipe's llama_tiny config, widened.
GPU_LLAMA = ("--model.sizes", "{hidden_size: 1024, intermediate_size: 2816, num_hidden_layers: 8, "
             "num_attention_heads: 16, num_key_value_heads: 4, tie_word_embeddings: true}",
             "--data.vocab_size", "8192", "--data.context_length", "2048", "--data.batch_size", "8",
             "--data.max_eval_blocks", "64", "--log_every", "10", "--tracker", "none",
             "--techniques.text_sample.length", "40", "--techniques.cosine_lr.warmup_steps", "10")


def llama_mfu(args) -> dict:
    """recipes/language_model.py with configs/llama_tiny.yaml widened (GPU_LLAMA), under bf16.yaml, once per attention
    implementation: the mean tokens/s, TFLOP/s and MFU of the log lines after the first (warm-up), and the test
    bits per byte."""
    import json

    steps = 20 if args.smoke else 200
    rows = {}
    for implementation in ("sdpa", "framework_chunked"):
        out = RESULTS / f"gpu_llama_{implementation}"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "launch_configs" / "bf16.yaml"), str(ROOT / "recipes" / "language_model.py"),
                   "--config", str(ROOT / "recipes" / "configs" / "llama_tiny.yaml"), *GPU_LLAMA,
                   "--model.attn_implementation", implementation, "--max_steps", str(steps), "--output_dir", str(out)]
        done = subprocess.run(command, cwd=ROOT)
        check(done.returncode == 0, f"the llama run with {implementation} failed")
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        timed = [line for line in lines if "perf/tflops" in line][1:] or [line for line in lines if "perf/tflops" in line]
        mean = lambda key: sum(line.get(key, float("nan")) for line in timed) / len(timed)  # noqa: E731
        summary = json.loads((out / "summary.json").read_text())
        rows[implementation] = {"tokens_per_second": mean("tokens_per_second"), "tflops": mean("perf/tflops"),
                                "mfu": mean("perf/mfu"), "test_bits_per_byte": summary["metrics"]["test/bits_per_byte"],
                                "peak_mb": max(line.get("memory/cuda_max_allocated_mb", 0) for line in lines)}
    print("\n| attention | tokens/s | TFLOP/s | MFU | peak MB | test bits/byte |\n|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['tokens_per_second']:,.0f} | {row['tflops']:.1f} | {row['mfu']:.1%} | "
              f"{row['peak_mb']:,.0f} | {row['test_bits_per_byte']:.3f} |")
    (RESULTS / "gpu_llama.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


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
    llama_mfu(args)
    return failed


if __name__ == "__main__":
    sys.exit(main())
