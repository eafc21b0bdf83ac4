"""Attention, forward + backward: naive, torch SDPA, chunked without recompute (the tutorial version) and chunked with
recompute (framework/nn/attention.py), side by side in one run; then the same in a model: one training step of a tiny
transformers Llama under attn_implementation eager, sdpa and framework_chunked. Each (variant, n) runs in its own
fresh process, so its peak memory is its own; the variants are interleaved at each n (A B C D, then again for each
round).

    .venv/bin/python benchmarks/attention.py [--sizes 1024 2048 4096 8192] [--heads 8 --head_dim 64 --batch 1]
        [--repeats 3] [--rounds 1] [--threads 2] [--omp_wait_policy passive] [--chunk 512]
        [--mask none|causal|padding|causal+padding] [--variants naive sdpa chunked_no_recompute chunked]
        [--memory_cap_gb 12] [--stages kernels llama] [--implementations eager sdpa framework_chunked]
        [--out benchmarks/results/attention.json]
    .venv/bin/python benchmarks/attention.py --stages llama --sizes 2048 4096 8192   (the model only; writes
        benchmarks/results/attention_llama.json unless --out says otherwise)
    .venv/bin/python benchmarks/attention.py --device cuda --dtype bf16          (on a GPU machine)

Time: the median of `repeats` forward + backward passes after one warm-up pass (dropped), pooled over rounds.
Peak memory above baseline (inputs allocated, kernels loaded): on CPU the process's resident high-water mark (reset
through /proc/self/clear_refs where Linux allows, else ru_maxrss's delta in the fresh process); on CUDA
torch.cuda.max_memory_allocated. Before timing, each variant's output and q/k/v gradients are checked against the
naive reference in fp64 at a small n that is not a multiple of the chunk. Naive and chunked-without-recompute are
skipped at sizes where they would exceed --memory_cap_gb (estimated from their peak at the previous size, ∝ n²).
Prints a markdown table (ratios to naive and SDPA) and a verdict per target; writes JSON and two PNGs next to --out.

The model stage (`--stages llama`): `LlamaForCausalLM` built from a `LlamaConfig` (LLAMA below: hidden 256, 2 layers,
4 query heads on 2 key/value heads, vocab 512; random weights, seeded alike in every worker), batch --batch of n random
tokens, causal, no padding; a step is forward, transformers' shifted cross-entropy (`labels=`) and backward. Time as
above. Peak memory: on CPU counted, not sampled: one more step under `PeakTensorBytes`, which adds up every storage an
ATen op allocates until it is freed (activations, the mask, the gradients; not the weights and tokens made before), so
it is exact and the same on every run, and is what a GPU's max_memory_allocated would show; the resident peak above
baseline of the timed steps is reported next to it. On CUDA torch.cuda.max_memory_allocated above the weights. The
framework_chunked chunk is --chunk (the config's framework_attention_chunk_size). Checked: at every n, the loss and
every parameter's gradient norm agree with eager's (sdpa's where eager was skipped). Eager is skipped where its peak,
extrapolated ∝ n² from the size before, would pass --memory_cap_gb. Printed as a second table (ratios to eager and
SDPA) and written under "llama" in the JSON.

Threads: the workers run with OMP_WAIT_POLICY=PASSIVE unless told otherwise (--omp_wait_policy inherit). With
OpenMP's default, idle worker threads spin; on a machine whose cores other jobs keep busy, a spinning worker can hold
the core the main thread needs, and a small op then waits out a scheduler time slice (an op on 2,048 numbers took
~4 ms). Chunked attention issues ~20 ops per block: on the shared 2-core machine it was written on, with the other jobs
using ~2 cores, it ran up to 6× slower that way (n = 1024: 0.77 s spinning vs 0.13 s passive), naive and SDPA (a few
large ops) hardly at all; with the cores idle the two policies measured the same (n = 4096: chunked 0.67 s inherited
vs 0.81 s passive, within the noise). Passive threads sleep instead of spinning.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as a plain script from anywhere

VARIANTS = ("naive", "sdpa", "chunked_no_recompute", "chunked")
# The variants whose memory grows ∝ n² (the ones --memory_cap_gb can skip): bytes of peak per element of one
# (B, H, n, n) matrix, until a measurement at a smaller n replaces the guess: naive
# keeps ~4 fp32 (n, n) tensors alive at its peak (2105 MB at n = 4096, 8 heads); the tutorial version a little more.
FIRST_GUESS_BYTES_PER_SCORE = {"naive": 16.0, "chunked_no_recompute": 20.0}
TARGETS = (  # (what, variant, measure, reference variant, the largest allowed ratio)
    ("training peak", "chunked", "peak_mb", "naive", 0.25),
    ("time vs naive", "chunked", "time_s", "naive", 1.35),
    ("time vs SDPA", "chunked", "time_s", "sdpa", 2.0),
)
STAGES = ("kernels", "llama")
IMPLEMENTATIONS = ("eager", "sdpa", "framework_chunked")  # eager first: the reference of the model stage's check
LLAMA = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=512)
# The same for the model stage: eager's training peak per element of one layer's (B, H, n, n) scores (H = 4 query
# heads), until measured; ~14 bytes counted at 512 tokens in tests/test_hf_attention.py (both layers' probabilities
# kept for backward, the causal mask, transient scores).
FIRST_GUESS_EAGER_BYTES_PER_SCORE = {"eager": 16.0}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=512, help="query and key chunk of the chunked variants")
    parser.add_argument("--mask", default="none", choices=["none", "causal", "padding", "causal+padding"],
                        help="padding: the last eighth of every sequence is padding")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per process, after one warm-up")
    parser.add_argument("--rounds", type=int, default=1, help="processes per (variant, n), interleaved")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker")
    parser.add_argument("--omp_wait_policy", default="passive", choices=["passive", "active", "inherit"],
                        help="OMP_WAIT_POLICY of the workers; see the module docstring")
    parser.add_argument("--memory_cap_gb", type=float, default=12.0)
    parser.add_argument("--target_n", type=int, default=4096, help="the n the targets are judged at")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES,
                        help="kernels: the attention functions alone; llama: a tiny transformers Llama per "
                             "attn_implementation (both at --sizes)")
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS,
                        help="the llama stage's attn_implementation values")
    parser.add_argument("--out", type=Path, default=None,
                        help="default benchmarks/results/attention.json (attention_llama.json for --stages llama)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--llama_worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--verify", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out is None:  # a model-only run must not overwrite the kernels' results
        name = "attention.json" if "kernels" in args.stages else "attention_llama.json"
        args.out = ROOT / "benchmarks" / "results" / name
    return args


# --- one (variant, n) in this process -------------------------------------------------------------------------------
def contender(variant: str, args: argparse.Namespace):
    from framework.nn.attention import chunked_attention, naive_attention, sdpa_attention

    if variant == "naive":
        return naive_attention
    if variant == "sdpa":
        return sdpa_attention
    return lambda q, k, v, **masks: chunked_attention(q, k, v, q_chunk_size=args.chunk, k_chunk_size=args.chunk,
                                                      recompute=variant == "chunked", **masks)


def make_inputs(args: argparse.Namespace, n: int, heads: int, dtype, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v, d_out = (torch.randn(args.batch, heads, n, args.head_dim, generator=g, device=device, dtype=dtype)
                      for _ in range(4))
    masks = {}
    if "causal" in args.mask:
        masks["causal"] = True
    if "padding" in args.mask:
        padding = torch.ones(args.batch, n, dtype=torch.bool, device=device)
        padding[:, n - n // 8:] = False
        masks["key_padding_mask"] = padding
    return [t.requires_grad_() for t in (q, k, v)], d_out, masks


def verify(variant: str, args: argparse.Namespace) -> dict:
    """The variant's output and gradients against naive attention in fp64 (fp32 on CUDA) at a small odd n."""
    dtype = DTYPES[args.dtype]
    n = args.chunk + args.chunk // 2 + 37  # two chunks, the second partial
    (q, k, v), d_out, masks = make_inputs(args, n, heads=2, dtype=dtype, device=args.device, seed=1)
    out = contender(variant, args)(q, k, v, **masks)
    out.backward(d_out)
    exact = torch.float64 if args.device == "cpu" else torch.float32
    ref_inputs = [t.detach().to(exact).requires_grad_() for t in (q, k, v)]
    from framework.nn.attention import naive_attention

    ref = naive_attention(*ref_inputs, **masks)
    ref.backward(d_out.to(exact))
    errors = {name: ((a.to(exact) - b).abs().max() / b.abs().max()).item()
              for name, a, b in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad),
                                    (ref, *(t.grad for t in ref_inputs)))}
    tolerance = 1e-4 if args.dtype == "fp32" else 3e-2
    worst = max(errors.values())
    return {"n": n, "max_relative_error": worst, "errors": errors, "ok": worst < tolerance}


def _reset_cpu_peak() -> int:
    """Reset the resident high-water mark where Linux allows it; return the baseline (KiB) peaks are measured from."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # freed heap pages back to the system: the baseline is what is in use
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM (and ru_maxrss) := current RSS
    except (OSError, AttributeError):
        pass  # ru_maxrss keeps the highest peak so far: still right in a fresh process whose inputs dominate
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure(variant: str, args: argparse.Namespace) -> dict:
    """Time (one warm-up pass, then `repeats`) and peak memory above baseline of forward + backward at n = args.n."""
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    cuda = args.device == "cuda"
    fn = contender(variant, args)
    (q, k, v), d_out, masks = make_inputs(args, 64, heads=1, dtype=dtype, device=args.device)
    fn(q, k, v, **masks).backward(d_out)  # load kernels and thread pools before the baseline
    (q, k, v), d_out, masks = make_inputs(args, args.n, heads=args.heads, dtype=dtype, device=args.device)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_cpu_peak()
    times = []
    for repeat in range(args.repeats + 1):
        q.grad = k.grad = v.grad = None
        sync()
        start = time.perf_counter()
        fn(q, k, v, **masks).backward(d_out)
        sync()
        if repeat > 0:  # the warm-up pass is dropped
            times.append(time.perf_counter() - start)
    if cuda:
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return {"variant": variant, "n": args.n, "times_s": times, "peak_mb": peak_mb}


class PeakTensorBytes(TorchDispatchMode):
    """Every tensor storage that an ATen op allocates under this mode, forward and backward, and the high-water mark
    of those still alive: deterministic, unlike the resident peak (the allocator's page reuse, other processes). The
    same as tests/helpers.py's, which benchmarks do not import (benchmarks/common.py would: it also imports the
    framework, seconds per worker that the eager and sdpa workers do not need)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.counted: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.counted:  # a view of a counted storage allocates nothing
                    self.counted.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, nbytes)
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self.counted.discard(key)
        self.live -= nbytes


def measure_llama(implementation: str, args: argparse.Namespace) -> dict:
    """One training step of the tiny Llama (LLAMA) on n = args.n tokens under this attn_implementation: time (one
    warm-up step, then `repeats`), peak memory (see the module docstring), and for the check the loss and every
    parameter's gradient norm."""
    if implementation == "framework_chunked":
        import framework  # noqa: F401  registers "framework_chunked" with transformers

    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    config = LlamaConfig(**LLAMA, max_position_embeddings=args.n, framework_attention_chunk_size=args.chunk)
    torch.manual_seed(0)  # the same weights in every worker
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation, dtype=DTYPES[args.dtype])
    model.to(args.device).train()
    tokens = torch.randint(LLAMA["vocab_size"], (args.batch, args.n), generator=torch.Generator().manual_seed(1))
    tokens = tokens.to(args.device)

    def step(ids: torch.Tensor) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss  # transformers shifts the labels: next-token cross-entropy
        loss.backward()
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize()

    step(tokens[:, :64])  # load kernels and thread pools before the baseline
    model.zero_grad(set_to_none=True)  # gradients count in the peak, as in a training step
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_cpu_peak()
    times = []
    for repeat in range(args.repeats + 1):
        sync()
        start = time.perf_counter()
        loss = step(tokens)
        sync()
        if repeat > 0:  # the warm-up step is dropped
            times.append(time.perf_counter() - start)
    if cuda:
        peak_mb, rss_peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20, None
    else:
        rss_peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        with PeakTensorBytes() as counted:  # after the timed steps: the counting costs Python per op
            loss = step(tokens)
        peak_mb = counted.peak / 2**20
    return {"variant": implementation, "n": args.n, "times_s": times, "peak_mb": peak_mb, "rss_peak_mb": rss_peak_mb,
            "loss": loss.item(), "grad_norms": {name: p.grad.float().norm().item()
                                                for name, p in model.named_parameters()}}


# --- the driver ------------------------------------------------------------------------------------------------------
def run_worker(args: argparse.Namespace, variant: str, n: int | None = None, verify_only: bool = False,
               flag: str = "--worker") -> dict:
    """`variant` at size n in a fresh process; flag: --worker (a kernel variant) or --llama_worker."""
    command = [sys.executable, __file__, flag, variant, *forwarded(args)]
    command += ["--verify"] if verify_only else ["--n", str(n)]
    env = dict(os.environ)
    if args.omp_wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()  # read once, when the OpenMP runtime starts
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"variant": variant, "n": n, "error": f"exit {done.returncode}: {done.stderr.strip()[-600:]}"}
    return json.loads(lines[-1][len("RESULT "):])


def forwarded(args: argparse.Namespace) -> list[str]:
    names = ("device", "dtype", "batch", "heads", "head_dim", "chunk", "mask", "repeats", "threads")
    return [part for name in names for part in (f"--{name}", str(getattr(args, name)))]


def main(args: argparse.Namespace) -> None:
    record = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                           if k not in ("worker", "llama_worker", "n", "verify")},
              "torch": torch.__version__, "checks": {}, "results": [], "verdicts": []}
    results = {}
    if "kernels" in args.stages:
        record["checks"], results, record["verdicts"] = kernel_stage(args)
        record["results"] = list(results.values())
    if "llama" in args.stages:
        record["llama"] = llama_stage(args)
    record["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    pictures = plot(args, results) if results else []
    print(f"\nwrote {', '.join(str(p) for p in [args.out, *pictures])}")


def kernel_stage(args: argparse.Namespace) -> tuple[dict, dict, list[str]]:
    """The attention functions alone: checks, then every (variant, n); returns (checks, results, verdicts)."""
    print(f"attention forward + backward on {args.device} ({platform.processor() or platform.machine()}), "
          f"{args.dtype}, batch {args.batch}, {args.heads} heads, head_dim {args.head_dim}, mask {args.mask}, "
          f"chunk {args.chunk}, {args.threads} threads, OMP_WAIT_POLICY {args.omp_wait_policy}, "
          f"torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    checks = {}
    for variant in args.variants:
        checks[variant] = run_worker(args, variant, verify_only=True)
        check = checks[variant]
        print(f"  check {variant}: " + (f"max relative error {check['max_relative_error']:.1e} at n={check['n']}"
                                        if "error" not in check else check["error"]), flush=True)
        if "error" in check or not check["ok"]:
            sys.exit(f"{variant} does not compute the reference's attention; not timing it.")

    results = compare(args, args.variants, args.heads, FIRST_GUESS_BYTES_PER_SCORE, "--worker")
    table = markdown_table(args, results)
    verdicts = judge(args, results)
    print()
    print("\n".join(table))
    print()
    print("\n".join(verdicts))
    return checks, results, verdicts


def compare(args: argparse.Namespace, variants: list[str], heads: int, first_guess: dict[str, float],
            flag: str) -> dict[tuple[str, int], dict]:
    """Every (variant, n) in a fresh worker (`flag`), interleaved; the variants in `first_guess` (memory ∝ n²) are
    skipped where their peak, extrapolated from the size before, would pass --memory_cap_gb."""
    results: dict[tuple[str, int], dict] = {}
    bytes_per_score = dict(first_guess)
    for n in args.sizes:
        scores = args.batch * heads * n * n  # elements of one (B, H, n, n) matrix
        for round_ in range(args.rounds):
            for variant in variants:  # interleaved: A B C D at each n, again each round
                need_gb = bytes_per_score.get(variant, 0.0) * scores / 1e9
                if variant in first_guess and need_gb > args.memory_cap_gb:
                    results[variant, n] = {"variant": variant, "n": n, "skipped": f"would need ~{need_gb:.1f} GB"}
                    print(f"  n={n} {variant}: skipped (would need ~{need_gb:.1f} GB > cap {args.memory_cap_gb} GB)",
                          flush=True)
                    continue
                got = run_worker(args, variant, n, flag=flag)
                if "error" in got:
                    results[variant, n] = got
                    print(f"  n={n} {variant}: failed: {got['error']}", flush=True)
                    continue
                entry = results.setdefault((variant, n), {"variant": variant, "n": n, "times_s": [], "peaks_mb": []})
                entry["times_s"] += got["times_s"]
                entry["peaks_mb"].append(got["peak_mb"])
                entry.update({k: v for k, v in got.items() if k not in ("times_s", "peak_mb")})  # the last round's
                if variant in first_guess:
                    bytes_per_score[variant] = max(got["peak_mb"] * 2**20 / scores, 1.0)
                print(f"  n={n} {variant}: {statistics.median(got['times_s']):.3f} s, {got['peak_mb']:.0f} MB",
                      flush=True)
    for entry in results.values():
        if "times_s" in entry:
            entry["time_s"] = statistics.median(entry["times_s"])
            entry["peak_mb"] = max(entry["peaks_mb"])
    return results


def llama_stage(args: argparse.Namespace) -> dict:
    """One training step of a tiny transformers Llama per (attn_implementation, n), checked against eager; prints
    the table and returns what the JSON keeps under "llama"."""
    memory = "counted allocations" if args.device == "cpu" else "torch.cuda.max_memory_allocated"
    print(f"\ntiny Llama ({LLAMA}), forward + cross-entropy + backward on {args.device}, {args.dtype}, batch "
          f"{args.batch}, causal, framework_chunked chunk {args.chunk}, {args.threads} threads, peak: {memory}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    results = compare(args, args.implementations, LLAMA["num_attention_heads"], FIRST_GUESS_EAGER_BYTES_PER_SCORE,
                      "--llama_worker")
    checks = llama_checks(args, results)
    table = llama_table(args, results)
    print()
    print("\n".join(table))
    return {"model": LLAMA, "checks": checks, "results": list(results.values()), "table": table}


def llama_checks(args: argparse.Namespace, results: dict) -> dict[str, float]:
    """At each n, the largest relative difference of the loss and of each parameter's gradient norm between every
    implementation and the first one measured (eager, else sdpa); exits when one is over the tolerance."""
    tolerance = 1e-3 if args.dtype == "fp32" else 5e-2
    checks = {}
    for n in args.sizes:
        measured = [results[name, n] for name in args.implementations if "loss" in results.get((name, n), {})]
        reference = measured[0] if measured else None
        for entry in measured[1:]:
            pairs = [(entry["loss"], reference["loss"])]
            pairs += [(entry["grad_norms"][name], norm) for name, norm in reference["grad_norms"].items()]
            checks[f"{entry['variant']} vs {reference['variant']} at n={n}"] = max(
                abs(a - b) / max(abs(b), 1e-12) for a, b in pairs)
    for what, difference in checks.items():
        print(f"  check {what}: loss and gradient norms differ by ≤ {difference:.1e} (relative)", flush=True)
    wrong = [what for what, difference in checks.items() if difference > tolerance]
    if wrong:
        sys.exit(f"the attention implementations do not train the same model ({', '.join(wrong)}: over "
                 f"{tolerance:g}); not reporting their times.")
    return checks


def llama_table(args: argparse.Namespace, results: dict) -> list[str]:
    lines = ["| n | attn_implementation | median s | min–max s | × eager time | × SDPA time | peak MB | "
             "× eager peak | × SDPA peak | RSS peak MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in args.sizes:
        eager, sdpa = results.get(("eager", n), {}), results.get(("sdpa", n), {})
        for implementation in args.implementations:
            entry = results.get((implementation, n))
            if entry is None:
                continue
            if "time_s" not in entry:
                why = f"skipped ({entry['skipped']})" if "skipped" in entry else "failed"
                lines.append(f"| {n} | {implementation} | {why} | | | | | | | |")
                continue

            def ratio(other, key):
                return f"{entry[key] / other[key]:.2f}×" if key in other and other[key] > 0 else "–"

            rss = "–" if entry["rss_peak_mb"] is None else f"{entry['rss_peak_mb']:.0f}"
            lines.append(f"| {n} | {implementation} | {entry['time_s']:.3f} | {min(entry['times_s']):.3f}–"
                         f"{max(entry['times_s']):.3f} | {ratio(eager, 'time_s')} | {ratio(sdpa, 'time_s')} | "
                         f"{entry['peak_mb']:.1f} | {ratio(eager, 'peak_mb')} | {ratio(sdpa, 'peak_mb')} | {rss} |")
    return lines


def markdown_table(args: argparse.Namespace, results: dict) -> list[str]:
    lines = ["| n | variant | median s | min–max s | × naive time | × SDPA time | peak MB | ÷ naive peak |",
             "|---|---|---|---|---|---|---|---|"]
    for n in args.sizes:
        naive, sdpa = results.get(("naive", n), {}), results.get(("sdpa", n), {})
        for variant in args.variants:
            entry = results.get((variant, n))
            if entry is None:
                continue
            if "time_s" not in entry:
                why = f"skipped ({entry['skipped']})" if "skipped" in entry else "failed"
                lines.append(f"| {n} | {variant} | {why} | | | | | |")
                continue

            def ratio(other, key):
                return f"{entry[key] / other[key]:.2f}×" if key in other and other[key] > 0 else "–"

            lines.append(f"| {n} | {variant} | {entry['time_s']:.3f} | {min(entry['times_s']):.3f}–"
                         f"{max(entry['times_s']):.3f} | {ratio(naive, 'time_s')} | {ratio(sdpa, 'time_s')} | "
                         f"{entry['peak_mb']:.0f} | {ratio(naive, 'peak_mb')} |")
    return lines


def judge(args: argparse.Namespace, results: dict) -> list[str]:
    lines = []
    for what, variant, key, reference, limit in TARGETS:
        mine, other = results.get((variant, args.target_n), {}), results.get((reference, args.target_n), {})
        if key not in mine or key not in other:
            lines.append(f"- {what}: not measured at n={args.target_n}")
            continue
        ratio = mine[key] / other[key]
        verdict = "met" if ratio <= limit else f"MISSED by {ratio / limit - 1:.0%}"
        lines.append(f"- {what} at n={args.target_n}: {variant} / {reference} = {ratio:.2f}× (target ≤ {limit}×): "
                     f"{verdict}")
    return lines


def plot(args: argparse.Namespace, results: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    paths = []
    for key, label, suffix in (("peak_mb", "peak memory above baseline (MB)", "memory"),
                               ("time_s", "forward + backward time (s)", "time")):
        figure, ax = plt.subplots(figsize=(6.4, 4.4))
        for variant in args.variants:
            points = [(n, results[variant, n][key]) for n in args.sizes if key in results.get((variant, n), {})]
            if points:
                ax.plot(*zip(*points), marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(label)
        ax.set_title(f"attention {suffix} vs n ({args.device}, {args.dtype}, {args.heads} heads × {args.head_dim}, "
                     f"mask {args.mask})", fontsize="medium")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
        figure.tight_layout()
        path = args.out.with_name(f"{args.out.stem}_{suffix}.png")
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker:
        found = verify(arguments.worker, arguments) if arguments.verify else measure(arguments.worker, arguments)
        print("RESULT " + json.dumps(found))
    elif arguments.llama_worker:
        print("RESULT " + json.dumps(measure_llama(arguments.llama_worker, arguments)))
    else:
        main(arguments)
