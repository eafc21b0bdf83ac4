"""EMA under DeepSpeed ZeRO-3: shard-local updates (what framework/techniques/ema.py does) against gathering every
parameter for each update (the alternative). Measured side by side in one run, interleaved, medians.

    accelerate launch --config_file launch_configs/deepspeed_zero3.yaml benchmarks/ema_zero3.py [--width 1024]
"""

import argparse
import statistics
import time

import deepspeed
import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

from framework.techniques.ema import ema_update_

parser = argparse.ArgumentParser()
parser.add_argument("--width", type=int, default=1024)
parser.add_argument("--layers", type=int, default=8)
parser.add_argument("--repeats", type=int, default=20)
args = parser.parse_args()

plugin = DeepSpeedPlugin()
plugin.deepspeed_config.update(gradient_accumulation_steps=1, gradient_clipping=0.0)
accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)])
loader = torch.utils.data.DataLoader(torch.zeros(8, args.width), batch_size=4)
model, optimizer, loader = accelerator.prepare(model, torch.optim.AdamW(model.parameters()), loader)
params = list(accelerator.unwrap_model(model).parameters())
total = sum(p.ds_numel for p in params)

shards = [p.ds_tensor for p in params]
shard_ema = [s.detach().clone() for s in shards]
with deepspeed.zero.GatheredParameters(params):
    full_ema = [p.detach().clone() for p in params]


def shard_local() -> None:
    ema_update_(shard_ema, shards, 0.999)


def gather_each_update() -> None:
    with deepspeed.zero.GatheredParameters(params):
        ema_update_(full_ema, [p.data for p in params], 0.999)


times = {shard_local: [], gather_each_update: []}
for repeat in range(args.repeats + 3):
    for contender in times:  # interleaved: A B A B ...
        accelerator.wait_for_everyone()
        start = time.perf_counter()
        contender()
        accelerator.wait_for_everyone()
        if repeat >= 3:  # warm-up rounds dropped
            times[contender].append(time.perf_counter() - start)

if accelerator.is_main_process:
    base = statistics.median(times[shard_local])
    print(f"EMA update under ZeRO-3, {accelerator.num_processes} ranks, {total / 1e6:.1f}M parameters, "
          f"{torch.get_num_threads()} threads")
    print("| method | median ms | min–max ms | ratio | EMA floats per rank |")
    print("|---|---|---|---|---|")
    for contender, floats in ((shard_local, sum(s.numel() for s in shard_ema)), (gather_each_update, total)):
        values = times[contender]
        print(f"| {contender.__name__} | {statistics.median(values) * 1e3:.2f} | {min(values) * 1e3:.2f}–"
              f"{max(values) * 1e3:.2f} | {statistics.median(values) / base:.1f}× | {floats / 1e6:.1f}M |")
accelerator.end_training()
