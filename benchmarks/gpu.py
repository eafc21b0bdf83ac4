"""The GPU check, in one go (what tests/gpu/run.sh runs): the gpu-marked tests (fp32, bf16, fp16 with a GradScaler,
FSDP and DeepSpeed ZeRO-2/3 with one process, SAM, the GAN, the language model), the transformers Llama under bf16
with `sdpa` and `framework_chunked` attention (tokens/s, TFLOP/s, MFU), loop parity on the GPU, the bf16 speed-up of
the framework's Trainer and channels_last on top of it, and attention at long contexts in bf16. One results file, one
table.

    python benchmarks/gpu.py [--out gpu_results.json] [--budget 420] [--parts tests llama ...] [--smoke]
    python benchmarks/gpu.py --dry-run      (no GPU needed: every import and argument checked, tests collected and
                                             skipped)

Each part runs in a process of its own under its own time cap (PARTS), and all of them within --budget seconds, so
one hang cannot eat the machine's time: a part that runs out is killed, marked `timeout`, and the next one starts.
The loop-parity contenders are compared with a tolerance on the GPU (cuDNN may choose different kernels run to run),
not bitwise.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import common  # noqa: F401  (sys.path first)
import torch
import torch.nn.functional as F
from common import ROOT, DigitsBatches, check, interleave, passthrough, per_round, report, time_rows

HERE = ROOT / "benchmarks"
PY = sys.executable

# part: (time cap in seconds, what it measures). Run in this order; the caps add up to more than the default budget on
# purpose: the budget is the hard limit, the caps only stop one part from taking the others' time.
PARTS = {
    "tests": (210, "the gpu-marked tests (tests/gpu/test_gpu.py)"),
    "llama": (170, "transformers Llama ~150M, bf16: sdpa vs framework_chunked, tokens/s, TFLOP/s, MFU"),
    "bf16": (90, "ResNet on 32×32 digits: fp32 vs bf16 vs bf16 + channels_last, framework Trainer"),
    "loop_parity": (70, "small CNN: plain PyTorch, Accelerate, framework Trainer, Lightning on the GPU"),
    "attention": (90, "attention kernels fwd+bwd in bf16 at long contexts: naive, SDPA, chunked"),
}
ATTENTION_SIZES = ["8192", "32768"]


def deepspeed_status() -> str:
    try:
        import deepspeed
    except Exception as error:  # noqa: BLE001  (any failure to import means: skip its cases)
        return f"not importable ({type(error).__name__}: {str(error)[:120]}): the DeepSpeed cases are skipped"
    return f"deepspeed {deepspeed.__version__}"


# --- the parts (each runs in its own process: `gpu.py --part NAME --result FILE`) ------------------------------------
def upsampled_digits(steps: int, batch_size: int = 256) -> torch.utils.data.DataLoader:
    """The digits at 32×32 (bilinear), `steps` batches in a fixed order: enough work per step for a GPU."""
    dataset = DigitsBatches()
    dataset.images = F.interpolate(dataset.images, size=32, mode="bilinear", align_corners=False)
    order = torch.randint(len(dataset), (steps * batch_size,), generator=torch.Generator().manual_seed(0)).tolist()
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order, collate_fn=passthrough)


def resnet() -> torch.nn.Module:
    from framework.models.resnet import ResNet, ResNetConfig

    torch.manual_seed(0)
    return ResNet(ResNetConfig(in_channels=1, num_classes=10, widths=(64, 128, 256), blocks_per_stage=2))


#: contender: (ACCELERATE_MIXED_PRECISION, TrainerConfig fields)
BF16_CONTENDERS = {"fp32": ("no", {}), "bf16": ("bf16", {}), "bf16 + channels_last": ("bf16", {"channels_last": True})}


def bf16_speedup(args: argparse.Namespace) -> dict:
    from loop_parity import framework_loop

    finals: dict[str, dict] = {}
    steps = per_round(args)

    def run(name: str) -> list[float]:
        precision, config = BF16_CONTENDERS[name]
        os.environ["ACCELERATE_MIXED_PRECISION"] = precision  # what `accelerate launch --mixed_precision` sets
        try:
            finals[name] = {}
            return framework_loop(steps, args.warmup, args.device, finals[name], model_fn=resnet,
                                  loader=upsampled_digits(steps + args.warmup, 16 if args.smoke else 256), **config)
        finally:
            os.environ.pop("ACCELERATE_MIXED_PRECISION", None)

    times = interleave({name: functools.partial(run, name) for name in BF16_CONTENDERS}, args.rounds)
    for name, final in finals.items():
        check(all(torch.isfinite(v.float()).all() for v in final.values()), f"{name}: non-finite weights")
    rows = time_rows("gpu bf16", times, "fp32", {"bf16": ("faster than fp32 (< 1×)", 1.0)})
    record = report("gpu_bf16", args, rows, {"step_seconds": times}, {"finite_weights": True})
    by_name = {row["contender"]: row for row in record["rows"]}
    bf16, channels_last = by_name["bf16"]["ratio"], by_name["bf16 + channels_last"]["ratio"]
    return {"ok": True, "rows": [
        ["fp32 step", f"{by_name['fp32']['value'] * 1e3:.2f} ms"],
        ["bf16 / fp32 step time", f"{bf16:.3f}× ({1 / bf16:.2f}× speed-up)"],
        ["bf16 + channels_last / fp32", f"{channels_last:.3f}× ({bf16 / channels_last:.2f}× vs bf16)"]],
        "detail": record}


def loop_parity_argv(args: argparse.Namespace, out: Path) -> list[str]:
    return ["--device", args.device, "--steps", str(args.steps), "--rounds", str(args.rounds), "--out", str(out),
            *(["--smoke"] if args.smoke else [])]


def loop_parity(args: argparse.Namespace) -> dict:
    import loop_parity as parity

    record = parity.main(loop_parity_argv(args, args.work / "gpu_loop_parity.json"))
    rows = [[row["contender"], f"{row['ratio']:.3f}×" + (f" (target {row['target']}: "
             f"{'met' if row['met'] else 'missed'})" if row["target"] else "")]
            for row in record["rows"] if row["ratio"] is not None]
    return {"ok": True, "rows": rows, "detail": record}


def attention_argv(args: argparse.Namespace, out: Path) -> list[str]:
    sizes = ["1024"] if args.smoke else ATTENTION_SIZES
    return ["--device", args.device, "--dtype", "bf16", "--stages", "kernels", "--sizes", *sizes,
            "--target_n", sizes[0], "--memory_cap_gb", "60", "--out", str(out)]


def attention(args: argparse.Namespace) -> dict:
    out = args.work / "gpu_attention.json"
    done = subprocess.run([PY, str(HERE / "attention.py"), *attention_argv(args, out)], cwd=ROOT)
    check(done.returncode == 0 and out.exists(), f"benchmarks/attention.py failed ({done.returncode})")
    record = json.loads(out.read_text())
    rows = []
    for entry in record.get("results", []):
        if "time_s" in entry:
            rows.append([f"{entry['variant']} n={entry['n']}", f"{entry['time_s'] * 1e3:.1f} ms, "
                         f"peak {entry['peak_mb']:,.0f} MB"])
        else:
            rows.append([f"{entry.get('variant')} n={entry.get('n')}", str(entry.get("skipped") or
                                                                           entry.get("error", "not run"))[:80]])
    rows += [["verdict", verdict] for verdict in record.get("verdicts", [])]
    return {"ok": True, "rows": rows, "detail": record}


#: A Llama sized for a GPU (~150M parameters with the 8k BPE): the recipe's llama_tiny config, widened.
GPU_LLAMA = ("--model.sizes", "{hidden_size: 1024, intermediate_size: 2816, num_hidden_layers: 8, "
             "num_attention_heads: 16, num_key_value_heads: 4, tie_word_embeddings: true}",
             "--data.vocab_size", "8192", "--data.context_length", "2048", "--data.batch_size", "8",
             "--data.max_eval_blocks", "64", "--log_every", "10", "--tracker", "none",
             "--techniques.text_sample.length", "40", "--techniques.cosine_lr.warmup_steps", "10")
#: --smoke: llama_tiny's own sizes, short blocks (a check that the part runs, also on a CPU; nothing to time)
SMOKE_LLAMA = ("--model.sizes", "{hidden_size: 128, intermediate_size: 344, num_hidden_layers: 2, "
               "num_attention_heads: 4, num_key_value_heads: 2, tie_word_embeddings: true}", "--data.vocab_size",
               "1024", "--data.context_length", "128", "--data.batch_size", "4", "--data.max_eval_blocks", "8",
               "--log_every", "5")
LLAMA_IMPLEMENTATIONS = ("sdpa", "framework_chunked")


def llama_recipe_args(implementation: str, steps: int, out: Path, smoke: bool = False) -> list[str]:
    return [str(ROOT / "recipes" / "language_model.py"), "--config", str(ROOT / "recipes" / "configs" /
            "llama_tiny.yaml"), *GPU_LLAMA, *(SMOKE_LLAMA if smoke else ()), "--model.attn_implementation",
            implementation, "--max_steps", str(steps), "--output_dir", str(out), "--overwrite", "true"]


def llama(args: argparse.Namespace) -> dict:
    """recipes/language_model.py with configs/llama_tiny.yaml widened (GPU_LLAMA), under bf16.yaml, once per attention
    implementation: the mean tokens/s, TFLOP/s and MFU of the log lines after the first (warm-up), and the test
    bits per byte."""
    steps = 20 if args.smoke else 80
    detail, rows, ok = {}, [], True
    for implementation in LLAMA_IMPLEMENTATIONS:
        out = args.work / f"gpu_llama_{implementation}"
        command = [PY, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch_configs" / "bf16.yaml"),
                   *llama_recipe_args(implementation, steps, out, args.smoke)]
        done = subprocess.run(command, cwd=ROOT)
        if done.returncode != 0 or not (out / "summary.json").exists():
            ok = False
            rows.append([implementation, f"FAILED (exit {done.returncode})"])
            continue
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        perf = [line for line in lines if "perf/tflops" in line]
        timed = perf[1:] or perf
        mean = lambda key: sum(line.get(key, float("nan")) for line in timed) / max(len(timed), 1)  # noqa: E731
        summary = json.loads((out / "summary.json").read_text())
        row = {"tokens_per_second": mean("tokens_per_second"), "tflops": mean("perf/tflops"), "mfu": mean("perf/mfu"),
               "test_bits_per_byte": summary["metrics"]["test/bits_per_byte"],
               "unigram_bits_per_byte": summary.get("unigram_bits_per_byte"),
               "peak_mb": max((line.get("memory/cuda_max_allocated_mb", 0) for line in lines), default=0)}
        detail[implementation] = row
        rows.append([implementation, f"{row['tokens_per_second']:,.0f} tokens/s, {row['tflops']:.1f} TFLOP/s, MFU "
                     f"{row['mfu']:.1%}, peak {row['peak_mb']:,.0f} MB, test {row['test_bits_per_byte']:.3f} "
                     f"bits/byte"])
    return {"ok": ok, "rows": rows, "detail": detail}


PART_FUNCTIONS = {"llama": llama, "bf16": bf16_speedup, "loop_parity": loop_parity, "attention": attention}


# --- the driver ------------------------------------------------------------------------------------------------------
def run_part(name: str, args: argparse.Namespace, cap: float) -> dict:
    """`name` in its own process session under `cap` seconds (killed with all its children when it runs out)."""
    started = time.perf_counter()
    result_file = args.work / f"part_{name}.json"
    result_file.unlink(missing_ok=True)
    if name == "tests":
        junit = args.work / "tests.xml"
        command = [PY, "-m", "pytest", "-m", "gpu", str(ROOT / "tests" / "gpu"), "-v", "-rs", "-p", "no:cacheprovider",
                   "--junitxml", str(junit), "--timeout", "150"]
        if not args.dry_run and importlib.util.find_spec("xdist") is not None:
            command += ["-n", "4"]  # small runs on one big GPU: four at a time
    else:
        command = [PY, __file__, "--part", name, "--result", str(result_file), "--work", str(args.work),
                   "--device", args.device, *(["--smoke"] if args.smoke else [])]
    env = {**os.environ, **({"GPU_DRY_RUN": "1"} if args.dry_run else {})}
    process = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    try:
        code = process.wait(timeout=cap)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        code = None
    seconds = time.perf_counter() - started
    if name == "tests":
        result = junit_result(junit) if junit.exists() else {"ok": False, "rows": [["pytest", "no report"]]}
        result["ok"] = result["ok"] and code == 0
    elif result_file.exists():
        result = json.loads(result_file.read_text())
    else:
        result = {"ok": False, "rows": []}
    status = "timeout" if code is None else "passed" if result["ok"] and code == 0 else f"failed (exit {code})"
    return {"status": status, "seconds": round(seconds, 1), "cap_s": round(cap), **result}


def junit_result(path: Path) -> dict:
    """pytest's junit XML -> one row per test: passed / failed / skipped (with the reason)."""
    rows, counts = [], {"passed": 0, "failed": 0, "skipped": 0}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, why = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, why = "failed", (child.get("message") or "")[:100]
            elif child.tag == "skipped":
                outcome, why = "skipped", (child.get("message") or "")[:100]
        counts[outcome] += 1
        rows.append([case.get("name"), f"{outcome} ({float(case.get('time', 0)):.0f} s)" + (f": {why}" if why else "")])
    summary = ", ".join(f"{n} {outcome}" for outcome, n in counts.items())
    return {"ok": counts["failed"] == 0 and sum(counts.values()) > 0, "rows": [["collected", summary], *rows],
            "counts": counts}


def dry_check(name: str, args: argparse.Namespace) -> list[list[str]]:
    """Without a GPU: the part's imports, and its arguments parsed by the very parsers that will read them."""
    if name == "bf16":
        from dataclasses import fields

        from framework.config import TrainerConfig
        from loop_parity import framework_loop  # noqa: F401

        names = {field.name for field in fields(TrainerConfig)}
        for _, (_, config) in BF16_CONTENDERS.items():
            check(set(config) <= names, f"TrainerConfig has no {set(config) - names}")
        model, loader = resnet(), upsampled_digits(2)
        batch = next(iter(loader))
        check(model(batch["pixel_values"][:4]).shape == (4, 10), "the ResNet does not take 32×32 digits")
        return [["dry run", "ResNet, loader and TrainerConfig(channels_last) checked"]]
    if name == "loop_parity":
        import lightning  # noqa: F401
        import loop_parity as parity

        class Parsed(Exception):
            pass

        def parse_only(p, argv, smoke_steps=12):
            p.parse_args(argv)
            raise Parsed

        original, parity.parse = parity.parse, parse_only
        try:
            parity.main(loop_parity_argv(args, args.work / "x.json"))
        except Parsed:
            pass
        finally:
            parity.parse = original
        return [["dry run", "loop_parity.py arguments and lightning checked"]]
    if name == "attention":
        import attention as bench
        from framework.nn.attention import chunked_attention, naive_attention, sdpa_attention  # noqa: F401

        parsed = bench.parse_args(attention_argv(args, args.work / "x.json"))
        check(parsed.device == "cuda" and parsed.dtype == "bf16", "attention.py arguments")
        return [["dry run", f"attention.py arguments checked (sizes {' '.join(ATTENTION_SIZES)})"]]
    if name == "llama":
        import accelerate.commands.launch  # noqa: F401

        from framework.models.causal_lm import CausalLMConfig, build_causal_lm

        sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2)
        for implementation in LLAMA_IMPLEMENTATIONS:  # a tiny Llama's step under bf16 autocast (as bf16.yaml), on CPU
            # built as the recipe builds it (AutoConfig.for_model, use_cache off): a LlamaConfig model with its cache on
            # handed framework_chunked all-fp32 q, k, v in transformers 5.17 and hid the mixed dtypes the recipe meets
            model = build_causal_lm(CausalLMConfig(sizes=sizes, attn_implementation=implementation), 128, 32, {})
            ids = torch.randint(128, (2, 32))
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            except Exception as error:
                raise RuntimeError(f"a tiny Llama with attn_implementation={implementation} under bf16 autocast: "
                                   f"{type(error).__name__}: {error}") from error
        # every recipe argument, parsed and validated by the recipe itself (--print_config exits after printing; the
        # two runs differ only in attn_implementation, built above)
        done = subprocess.run([PY, *llama_recipe_args(LLAMA_IMPLEMENTATIONS[-1], 80, args.work / "llama_dry"),
                               "--print_config"], cwd=ROOT, capture_output=True, text=True)
        check(done.returncode == 0, f"the llama recipe refused its arguments:\n{done.stderr[-2000:]}")
        check((ROOT / "launch_configs" / "bf16.yaml").exists(), "launch_configs/bf16.yaml is missing")
        return [["dry run", f"tiny Llama fwd+bwd under bf16 autocast with {', '.join(LLAMA_IMPLEMENTATIONS)}; recipe "
                 "arguments checked"]]
    raise ValueError(name)


def machine(dry_run: bool) -> dict:
    """Versions (read from the installed metadata: no imports) and the GPU; DeepSpeed is imported (its cases run only
    if that works), and in a dry run so is every package the parts import."""
    import importlib.metadata as metadata

    versions = {"python": sys.version.split()[0]}
    for name in ("torch", "accelerate", "transformers", "datasets", "wandb", "jsonargparse", "lightning", "timm",
                 "tokenizers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "MISSING"
    if dry_run:
        for name in ("datasets", "wandb", "jsonargparse", "framework.loop", "framework.config"):
            importlib.import_module(name)
    versions["deepspeed"] = deepspeed_status()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {"gpu": gpu, "cuda": torch.version.cuda, **versions}


def table(record: dict) -> str:
    lines = [f"GPU check{' (DRY RUN: nothing timed)' if record['dry_run'] else ''}: {record['machine']['gpu']}, "
             f"torch {record['machine']['torch']}, {record['machine']['deepspeed']}", "",
             "| part | status | s (cap) | item | result |", "|---|---|---|---|---|"]
    for name, part in record["parts"].items():
        head = f"| {name} | {part['status']} | {part.get('seconds', 0):.0f} ({part.get('cap_s', 0)}) |"
        rows = part.get("rows") or [["", ""]]
        for index, (item, result) in enumerate(rows):
            lines.append((head if index == 0 else "| | | |") + f" {item} | {result} |")
    lines.append(f"\ntotal {record['seconds']:.0f} s; {record['verdict']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="no GPU: check imports and arguments, collect and skip")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all the parts together")
    p.add_argument("--out", type=Path, default=None, help="the results file (default $OUT/gpu_results.json, else "
                   "gpu_results/gpu_results.json)")
    p.add_argument("--work", type=Path, default=None, help="the parts' own files (default: a temporary folder)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--smoke", action="store_true", help="a few steps of each part")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help=argparse.SUPPRESS)  # cpu: the parts' own code checked here with --smoke (slow; not timed)
    p.add_argument("--part", choices=list(PART_FUNCTIONS), help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.threads = 1
    if args.smoke:
        args.steps, args.rounds, args.warmup = 12, 1, 2
    if args.part:  # one part, in the process the driver started for it
        args.out = args.work / f"gpu_{args.part}.json"
        check(args.device == "cpu" or torch.cuda.is_available(), f"the {args.part} part needs a CUDA GPU")
        result = PART_FUNCTIONS[args.part](args)
        args.result.write_text(json.dumps(result, indent=1, default=str) + "\n")
        return 0 if result["ok"] else 1

    if args.out is None:
        args.out = Path(os.environ["OUT"]) / "gpu_results.json" if os.environ.get("OUT") else \
            ROOT / "gpu_results" / "gpu_results.json"
    check(args.dry_run or args.device == "cpu" or torch.cuda.is_available(),
          "no CUDA GPU here (use --dry-run to check without one)")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        args.work = args.work or Path(scratch)
        args.work.mkdir(parents=True, exist_ok=True)
        record = {"dry_run": args.dry_run, "machine": machine(args.dry_run), "budget_s": args.budget, "parts": {}}
        print(f"machine: {json.dumps(record['machine'])}", flush=True)
        for name in args.parts:
            cap, what = PARTS[name]
            left = args.budget - (time.perf_counter() - started)
            print(f"\n=== {name}: {what} (cap {cap} s, {left:.0f} s of the budget left)", flush=True)
            if left < 15:
                record["parts"][name] = {"status": "not run (budget spent)", "rows": []}
                continue
            if args.dry_run and name != "tests":
                part_started = time.perf_counter()
                try:
                    record["parts"][name] = {"status": "checked", "cap_s": cap, "rows": dry_check(name, args)}
                except Exception as error:  # noqa: BLE001  (reported in the table, and the exit status)
                    why = f"{type(error).__name__}: {str(error)[:300]}"
                    record["parts"][name] = {"status": "failed", "cap_s": cap, "rows": [["dry run", why]]}
                record["parts"][name]["seconds"] = round(time.perf_counter() - part_started, 1)
                continue
            record["parts"][name] = run_part(name, args, min(cap, left))
            args.out.parent.mkdir(parents=True, exist_ok=True)  # so far, in case the whole command is cut short
            args.out.write_text(json.dumps(record, indent=1, default=str) + "\n")
        if args.dry_run and "tests" in record["parts"]:  # collected and all skipped, none run
            tests = record["parts"]["tests"]
            counts = tests.get("counts", {})
            tests["ok"] = counts.get("skipped", 0) > 0 and counts.get("passed", 0) == counts.get("failed", 0) == 0
            tests["status"] = "collected and skipped" if tests["ok"] else tests["status"]
    failed = [name for name, part in record["parts"].items() if part["status"] not in ("passed", "checked",
                                                                                       "collected and skipped")]
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["verdict"] = "all parts passed" if not failed else f"NOT passed: {', '.join(failed)}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print("\n" + table(record) + f"\nwrote {args.out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
