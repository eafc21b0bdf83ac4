"""Sharding accounting: bytes of optimizer state (and of parameters) each rank holds under DDP and DeepSpeed ZeRO-1,
ZeRO-2 and ZeRO-3 with 2 CPU ranks, against the ZeRO paper's formulas (Rajbhandari et al.,
https://arxiv.org/abs/1910.02054, section 3/figure 1). Each backend is a real `accelerate launch` of this file
(`--worker`) with the framework's Accelerator (framework/backend.py), an MLP on the digits and torch's AdamW; bytes
are counted after two optimizer steps, from the tensors the optimizer holds on each rank.

What runs here is fp32 (CPU: no fp16), so the paper's mixed-precision K = 12 (fp32 master weights, momentum,
variance) applies to ZeRO, which keeps an fp32 master copy of its partition even when the model is fp32; DDP with
torch's AdamW keeps only the two moments (K = 8: the fp32 parameters are their own master). With Ψ parameters and
N_d ranks, expected per rank:

    optimizer state:  DDP 8Ψ    ZeRO-1 12Ψ/N_d    ZeRO-2 12Ψ/N_d    ZeRO-3 12Ψ/N_d   (bytes)
    parameters:       DDP 4Ψ    ZeRO-1 4Ψ         ZeRO-2 4Ψ         ZeRO-3 4Ψ/N_d

    .venv/bin/python benchmarks/sharding.py [--backends ddp zero1 zero2 zero3] [--smoke]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import common  # noqa: F401  (threads and sys.path first)
import torch
from common import Row, check, launch_ranks, parse, parser, report, write_rank_result

LAUNCH_CONFIGS = {"ddp": "multi_cpu.yaml", "zero1": "deepspeed_zero1.yaml", "zero2": "deepspeed_zero2.yaml",
                  "zero3": "deepspeed_zero3.yaml"}
WIDTH = 1024
TOLERANCE = 0.01  # DeepSpeed pads each flat partition to an alignment boundary


def expected(backend: str, parameters: int, ranks: int) -> dict[str, float]:
    optimizer = 8 * parameters if backend == "ddp" else 12 * parameters / ranks
    params = 4 * parameters / ranks if backend == "zero3" else 4 * parameters
    return {"optimizer_bytes": optimizer, "parameter_bytes": params}


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.numel() * t.element_size()
    return total


def optimizer_bytes(optimizer) -> dict[str, int]:
    """The moments the innermost torch optimizer holds, and the fp32 master partition DeepSpeed keeps (if any)."""
    layers = [optimizer]
    while hasattr(layers[-1], "optimizer"):  # accelerate's wrapper -> DeepSpeed's ZeRO optimizer -> torch's AdamW
        layers.append(layers[-1].optimizer)
    moments = tensor_bytes(t for state in layers[-1].state.values() for t in state.values())
    master = 0
    for layer in layers:
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO-1/2, ZeRO-3
            master += tensor_bytes(getattr(layer, name, []))
    return {"moments": moments, "master": master}


def worker(steps: int, result_dir: str) -> None:
    import tempfile

    import torch.nn.functional as F
    from common import digits_loader
    from framework.backend import make_accelerator

    with tempfile.TemporaryDirectory() as scratch:
        accelerator = make_accelerator(scratch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, WIDTH), torch.nn.ReLU(),
                                torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, 10))
    parameters = sum(p.numel() for p in model.parameters())
    model, optimizer, loader = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                                                   digits_loader(steps, batch_size=32))
    for batch in loader:
        accelerator.backward(F.cross_entropy(model(batch["pixel_values"]), batch["label"]))
        optimizer.step()
        optimizer.zero_grad()
    held = optimizer_bytes(optimizer)
    params = accelerator.unwrap_model(model).parameters()
    parameter_bytes = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size() for p in params)
    write_rank_result(result_dir, accelerator.process_index, {
        "rank": accelerator.process_index, "ranks": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.name, "parameters": parameters,
        "optimizer_bytes": held["moments"] + held["master"], **held, "parameter_bytes": parameter_bytes})
    accelerator.wait_for_everyone()
    accelerator.end_training()


def main(argv: Sequence[str] | None = None) -> dict:
    p = parser(__doc__.split("\n\n")[0], steps=4, rounds=1, warmup=0)
    p.add_argument("--backends", nargs="+", default=list(LAUNCH_CONFIGS), choices=list(LAUNCH_CONFIGS))
    p.add_argument("--worker", action="store_true", help="(run under accelerate launch)")
    p.add_argument("--result_dir", help="(the worker's: where each rank writes its result)")
    args = parse(p, argv, smoke_steps=2)
    if args.worker:
        return worker(args.steps, args.result_dir)
    rows, raw = [], {}
    for backend in args.backends:
        ranks = launch_ranks(Path(__file__), "--steps", str(args.steps), launch_config=LAUNCH_CONFIGS[backend])
        check(len(ranks) == 2 and all(r["ranks"] == 2 for r in ranks), f"{backend}: expected 2 ranks, got {ranks}")
        raw[backend] = ranks
        want = expected(backend, ranks[0]["parameters"], 2)
        for key, words in (("optimizer_bytes", "optimizer state"), ("parameter_bytes", "parameters")):
            got = max(r[key] for r in ranks)
            ratio = got / want[key]
            rows.append(Row("sharding", f"{backend}: {words} per rank", got / 2**20, "MiB", ratio=ratio,
                            target=f"{want[key] / 2**20:.2f} MiB (paper)", met=abs(ratio - 1) <= TOLERANCE,
                            note=f"{ranks[0]['distributed_type']}; moments {ranks[0]['moments'] / 2**20:.2f} MiB, "
                                 f"master {ranks[0]['master'] / 2**20:.2f} MiB" if key == "optimizer_bytes" else ""))
    checks = {"launched_ranks": {b: [r["ranks"] for r in ranks] for b, ranks in raw.items()},
              "parameters": next(iter(raw.values()))[0]["parameters"]}
    return report("sharding", args, rows, raw, checks)


if __name__ == "__main__":
    main()
