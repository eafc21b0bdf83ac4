"""Which techniques help: a baseline config against the same config with one technique added (and all of them
together), each over several seeds, with a confidence interval on every difference instead of single runs.

    .venv/bin/python benchmarks/ablation.py [--regime all|digits_low_data|lm_overfit] [--seeds 0 1 2 3 4]
        [--variants baseline mixup ...] [--epochs N] [--jobs 2] [--smoke] [--out-dir benchmarks/results]

How it measures:

* every run is a fresh process of the recipe, with the environment `accelerate launch --config_file
  launch_configs/cpu.yaml --num_cpu_threads_per_process 1` gives its one process (read once from the launcher
  itself; the runs then start without a launcher process of their own, ~4 s of start-up saved per run), and the
  harness reads the run's summary.json: the test metric and the run's seconds (fit start to test metrics); `--jobs`
  runs that many at once (2 on a 2-core machine);
* seed-major order (for seed in seeds: for variant in variants), so a slow minute on a shared machine hits every
  variant of that seed alike; a seed fixes the initial weights, the batch order and the augmentation draws, and the
  low-data subsample is the same for every run (drawn with data.split_seed);
* per variant: mean ± standard deviation over seeds, the difference to the baseline (variant − baseline) with the 95%
  Welch–Satterthwaite t interval and Welch's t-test p-value (`scipy.stats.ttest_ind(equal_var=False)`), and the time
  ratio (median over seeds of variant seconds ÷ baseline seconds of the same seed);
* the verdict reads the interval, not the mean: `helps` when the whole interval lies on the metric's better side of 0,
  `hurts` when it lies on the worse side, `no measurable effect` when it straddles 0.

Regimes:

* `digits_low_data`: the image recipe (recipes/configs/digits_regularized.yaml's model, optimizer and schedule, with its
  regularizers taken out) on 10 training images per class (`data.train_per_class`), validation and test whole. At 50
  epochs the baseline reaches 100% training accuracy and ~92-95% test accuracy (the full-data run: ~99.9%): it
  overfits, so regularizers have something to fix. Metric: test accuracy (points). Variants add one regularizer each
  (the arguments digits_regularized.yaml gives it), then the whole digits_regularized combination at equal epochs and
  at equal training time (its max_steps cut by the time ratio measured on the same seed).
* `lm_overfit`: the byte-level GPT (recipes/configs/language_model.yaml) on a ~64 KB slice of the standard library's
  source for many epochs, dropout and weight decay off in the baseline. Metric: held-out bits per byte (lower is
  better). Variants: dropout, weight decay, EMA, and the three together. Label smoothing is left out: the technique
  needs a classification task's class count, which the language-model task does not have (it refuses to start).

Writes ablation.json (every run's figures), ablation.md (one table per regime) and ablation.png (the differences with
their intervals) to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import common  # noqa: F401  (threads and sys.path first)
import numpy as np
import scipy.stats
import yaml
from common import RESULTS, ROOT, command_failed, launch, machine

REGULARIZED = yaml.safe_load((ROOT / "recipes" / "configs" / "digits_regularized.yaml").read_text())
BASELINE = "baseline"


# --- statistics ------------------------------------------------------------------------------------------------------
def compare(values: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """variant − baseline: the difference of means, its Welch–Satterthwaite t interval and Welch's two-sided p-value
    (NaN with fewer than two values on either side: no spread, no interval)."""
    difference = float(np.mean(values) - np.mean(baseline))
    if min(len(values), len(baseline)) < 2:
        return {"difference": difference, "low": math.nan, "high": math.nan, "p": math.nan}
    test = scipy.stats.ttest_ind(values, baseline, equal_var=False)
    interval = test.confidence_interval(confidence)
    return {"difference": difference, "low": float(interval.low), "high": float(interval.high),
            "p": float(test.pvalue)}


def verdict(low: float, high: float, higher_is_better: bool = True) -> str:
    """The interval's word: which side of 0 it lies on, read in the metric's direction."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "too few seeds"
    if low <= 0 <= high:
        return "no measurable effect"
    better = low > 0 if higher_is_better else high < 0
    return "helps" if better else "hurts"


# --- regimes ---------------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    """One column of the comparison: the arguments it adds to the regime's baseline command line."""

    name: str
    techniques: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Techniques added to the baseline's (name -> arguments)."""
    args: list[str] = field(default_factory=list)
    """Other options, e.g. ["--data.augment", "{...}"]."""
    equal_time: bool = False
    """Train for as long as the baseline of the same seed took (max_steps cut by the measured time ratio)."""


@dataclass
class Regime:
    name: str
    recipe: str
    metric: str
    """summary.json's metrics key."""
    higher_is_better: bool
    scale: float
    """Shown in the tables × scale (accuracy in points)."""
    unit: str
    epochs: int
    base_techniques: dict[str, dict[str, Any]]
    variants: list[Variant]
    launch_seconds: float
    epoch_seconds: float
    """A baseline run's wall seconds on an unloaded 2-core machine: launch_seconds (start, data, test) plus
    epoch_seconds per epoch; for the planned time printed first."""
    base_args: Callable[[Path, int], list[str]]
    """(work dir, epochs) -> the baseline's options."""
    notes: list[str] = field(default_factory=list)
    prepare: Callable[[Path], None] | None = None
    """Writes what the runs read into the work dir (once, before any run)."""
    shorten: Callable[[dict[str, Any], float], dict[str, Any]] | None = None
    """(techniques, epochs the run will last) -> techniques whose epoch counts fit a run cut short (equal time)."""


def digits_low_data(per_class: int = 10, epochs: int = 50) -> Regime:
    techniques = REGULARIZED["techniques"]
    schedule = {"cosine_lr": techniques["cosine_lr"], "gradient_clipping": techniques["gradient_clipping"]}

    def with_stop(arguments: dict[str, Any], run_epochs: float) -> dict[str, Any]:
        # digits_regularized stops mixing at epoch 34 of 40: the same share of whatever epochs this regime runs
        return {**arguments, "stop_epoch": round(arguments["stop_epoch"] / REGULARIZED["epochs"] * run_epochs)}

    def base_args(work: Path, run_epochs: int) -> list[str]:
        return ["--config", str(ROOT / "recipes" / "configs" / "digits_regularized.yaml"), "--data.augment", "{}",
                "--data.train_per_class", str(per_class), "--epochs", str(run_epochs), "--eval_every", "0",
                # No loader worker: two runs at once on two cores, one thread each, and a worker per run would make
                # four processes; its pipeline also restarts at every 2-batch epoch (a profile of a run: the loop
                # waited 14 of its 49 training seconds for data).
                "--data.num_workers", "0"]

    mixing = with_stop(techniques["mixup"], epochs)
    combination = {**techniques, "mixup": mixing}
    augment = ["--data.augment", json.dumps(REGULARIZED["data"]["augment"])]
    variants = [
        Variant(BASELINE),
        Variant("augmentation", args=augment),
        Variant("mixup", {"mixup": {"alpha": mixing["alpha"], "stop_epoch": mixing["stop_epoch"]}}),
        Variant("cutmix", {"cutmix": {"cutmix_alpha": mixing["cutmix_alpha"], "stop_epoch": mixing["stop_epoch"]}}),
        Variant("label_smoothing", {"label_smoothing": techniques["label_smoothing"]}),
        Variant("stochastic_depth", {"stochastic_depth": techniques["stochastic_depth"]}),
        Variant("ema", {"ema": techniques["ema"]}),
        Variant("sam", {"sam": {"rho": 0.05}}),
        Variant("lookahead", {"lookahead": {"k": 5, "alpha": 0.5}}),
        Variant("gradient_centralization", {"gradient_centralization": {}}),
        Variant("digits_regularized (all)", combination, augment),
        Variant("digits_regularized (all, equal time)", combination, augment, equal_time=True),
    ]
    return Regime("digits_low_data", "image_classification.py", "test/accuracy", True, 100.0, "points", epochs,
                  schedule, variants, 11.0, 0.46, base_args,
                  [f"{per_class} training images per class (data.train_per_class), validation and test whole; "
                   f"{epochs} epochs; the baseline is digits_regularized.yaml without its regularizers (cosine LR "
                   "and clipping kept); `train acc` is the final weights' accuracy on the training images."],
                  shorten=lambda chosen, run_epochs: {**chosen, "mixup": with_stop(techniques["mixup"], run_epochs)})


#: The language-model slice: every 3rd standard-library file of 1-3 KB, in path order, up to this many characters
#: (~20 documents: half train, a quarter each validation and test, split by document).
LM_SLICE_CHARS = 40_000
LM_LAUNCH_SECONDS, LM_EPOCH_SECONDS = 12.0, 1.5  # 8 steps per epoch; see the README's calibration


def write_text_slice(path: Path, chars: int = LM_SLICE_CHARS) -> Path:
    """A small, fixed slice of the embedded standard-library text as a JSON-lines file, one document per row (the
    recipe splits it by document into train / validation / test)."""
    from framework.data.embedded import stdlib_text_dataset

    texts = stdlib_text_dataset()
    picked, total = [], 0
    for index, text in enumerate(texts["text"]):
        if index % 3 == 0 and 1_000 <= len(text) <= 3_000 and total < chars:
            picked.append(index)
            total += len(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    texts.select(picked).select_columns(["text"]).to_json(str(path))
    return path


def lm_overfit(epochs: int = 20) -> Regime:
    def base_args(work: Path, run_epochs: int) -> list[str]:
        return ["--config", str(ROOT / "recipes" / "configs" / "language_model.yaml"),
                "--data.name", str(work / "stdlib_slice.jsonl"),
                "--data.context_length", "128", "--data.val_fraction", "0.25", "--data.test_fraction", "0.25",
                "--max_steps", "null", "--epochs", str(run_epochs), "--log_every", "100", "--eval_every", "0",
                "--optimizer.weight_decay", "0.0", "--model.dropout", "0.0"]

    variants = [
        Variant(BASELINE),
        Variant("dropout", args=["--model.dropout", "0.1"]),
        Variant("weight_decay", args=["--optimizer.weight_decay", "0.1"]),
        Variant("ema", {"ema": {"decay": 0.99, "warmup": True}}),
        Variant("all three", {"ema": {"decay": 0.99, "warmup": True}},
                ["--model.dropout", "0.1", "--optimizer.weight_decay", "0.1"]),
    ]
    return Regime("lm_overfit", "language_model.py", "test/bits_per_byte", False, 1.0, "bits/byte", epochs,
                  {"cosine_lr": {"warmup_steps": 20}, "gradient_clipping": {"max_norm": 1.0}}, variants,
                  LM_LAUNCH_SECONDS, LM_EPOCH_SECONDS, base_args,
                  [f"byte GPT on a {LM_SLICE_CHARS // 1000} KB slice of the standard library, {epochs} epochs, "
                   "lower is better; label smoothing not compared (the language-model task has no class count, "
                   "which the label_smoothing technique needs)."],
                  prepare=lambda work: write_text_slice(work / "stdlib_slice.jsonl"))


REGIMES: dict[str, Callable[..., Regime]] = {"digits_low_data": digits_low_data, "lm_overfit": lm_overfit}


# --- running ---------------------------------------------------------------------------------------------------------
def command(regime: Regime, variant: Variant, seed: int, epochs: int, work: Path, output_dir: Path,
            max_steps: int | None = None) -> list[str]:
    """The recipe's options for one run (JSON is YAML flow, which the recipe's parser reads)."""
    techniques = {**regime.base_techniques, **variant.techniques}
    args = [*regime.base_args(work, epochs), "--techniques", json.dumps(techniques), *variant.args,
            "--seed", str(seed), "--tracker", "none", "--doctor", "false", "--overwrite", "true",
            "--output_dir", str(output_dir)]
    return args + (["--max_steps", str(max_steps)] if max_steps else [])


def train_images(run_dir: Path):
    """The run's training images as evaluation sees them, and their labels (the low-data subset is small)."""
    import torch

    from framework.data import ImageDataConfig, image_data
    from framework.data.images import preprocess_images

    data = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    split = image_data(ImageDataConfig(**{**data, "augment": {}, "num_workers": 0})).splits["train"]
    preprocessor = json.loads((run_dir / "preprocessor.json").read_text())
    return preprocess_images(preprocessor, split["image"]), torch.tensor(split["label"])


def train_accuracy(run_dir: Path, images_and_labels) -> float:
    """Accuracy of the run's final weights on its training images: 1.0 is a memorised training set."""
    import torch

    from framework.predict import load_run

    images, labels = images_and_labels
    model, _ = load_run(run_dir)
    with torch.no_grad():
        return float((model(images).argmax(-1) == labels).float().mean())


def run_all(regime: Regime, seeds: Sequence[int], epochs: int, work: Path, jobs: int) -> dict[str, list[dict]]:
    """Every (seed, variant) run, seed-major; returns variant name -> its runs in seed order."""
    futures: dict[tuple[int, str], Future] = {}
    train_set: list = []  # the training images, loaded once, by the first image run that finishes
    lock = threading.Lock()

    def one(seed: int, variant: Variant) -> dict[str, Any]:
        max_steps = None
        if variant.equal_time:  # the same seed's baseline and combination ran (or run) before it: wait for them
            base, full = futures[seed, BASELINE].result(), futures[seed, equal_time_partner(regime)].result()
            max_steps = max(1, round(full["steps"] * base["seconds"] / full["seconds"]))
            if regime.shorten is not None:  # e.g. Mixup's stop epoch: the same share of the shorter run
                techniques = regime.shorten(variant.techniques, max_steps / full["steps"] * epochs)
                variant = replace(variant, techniques=techniques)
        output_dir = work / regime.name / f"{variant.name.replace(' ', '_')}-seed{seed}"
        started = time.perf_counter()
        run_recipe(ROOT / "recipes" / regime.recipe, command(regime, variant, seed, epochs, work, output_dir,
                                                              max_steps), launched)
        summary = json.loads((output_dir / "summary.json").read_text())
        run = {"seed": seed, "metric": summary["metrics"][regime.metric], "seconds": summary["run"]["seconds"],
               "steps": summary["run"]["steps"], "wall_seconds": round(time.perf_counter() - started, 1)}
        if regime.metric == "test/accuracy":
            with lock:
                if not train_set:
                    train_set.append(train_images(output_dir))
            run["train_accuracy"] = train_accuracy(output_dir, train_set[0])
        print(f"{regime.name} seed {seed} {variant.name}: {regime.metric} {run['metric']:.4f}, "
              f"{run['seconds']:.1f} s ({run['steps']} steps)", file=sys.stderr, flush=True)
        return run

    if regime.prepare is not None:
        regime.prepare(work)
    launched = launcher_environment()
    with ThreadPoolExecutor(jobs) as pool:
        for seed, variant in submission_order(regime.variants, seeds, jobs):
            futures[seed, variant.name] = pool.submit(one, seed, variant)
        return {v.name: [futures[seed, v.name].result() for seed in seeds] for v in regime.variants}


def submission_order(variants: Sequence[Variant], seeds: Sequence[int], jobs: int) -> list[tuple[int, Variant]]:
    """Seed-major, except that a seed's equal-time run goes `jobs` runs later (into the next seed's runs): it waits
    for the same seed's combination run, which it would otherwise start beside, keeping a core idle meanwhile."""
    order: list[tuple[int, Variant]] = []
    waiting: list[tuple[int, tuple[int, Variant]]] = []  # (position to insert at, run)
    for seed in seeds:
        for variant in variants:
            if variant.equal_time:
                waiting.append((len(order) + jobs, (seed, variant)))
                continue
            order.append((seed, variant))
            while waiting and waiting[0][0] <= len(order):
                order.append(waiting.pop(0)[1])
    return order + [run for _, run in waiting]


def launcher_environment() -> dict[str, str]:
    """The variables `accelerate launch` (cpu.yaml, one thread) sets for its process, read once from a real launch."""
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "environment.py"
        script.write_text("import json, os\nprint('ENV=' + json.dumps(dict(os.environ)))\n")
        printed = launch(script, timeout=300, check=True).stdout
    launched = json.loads(next(line for line in printed.splitlines() if line.startswith("ENV="))[4:])
    return {name: value for name, value in launched.items() if os.environ.get(name) != value}


def run_recipe(recipe: Path, arguments: list[str], launched: dict[str, str]) -> None:
    """The recipe in a fresh process, as `accelerate launch --config_file launch_configs/cpu.yaml` starts it
    (`launched`: the launcher's variables)."""
    command = [sys.executable, str(recipe), *arguments]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, **launched}, capture_output=True, text=True,
                          timeout=1800)
    if done.returncode != 0:
        raise command_failed(command, done)


def equal_time_partner(regime: Regime) -> str:
    """The equal-epochs variant an equal-time one is cut from: the one listed just before it."""
    names = [v.name for v in regime.variants]
    return names[names.index(next(v.name for v in regime.variants if v.equal_time)) - 1]


# --- the report ------------------------------------------------------------------------------------------------------
def rows(regime: Regime, runs: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """One row per variant: mean ± std (× scale), the difference to the baseline with its interval, p, time ratio,
    verdict."""
    base = [r["metric"] * regime.scale for r in runs[BASELINE]]
    base_seconds = {r["seed"]: r["seconds"] for r in runs[BASELINE]}
    table = []
    for name, variant_runs in runs.items():
        values = [r["metric"] * regime.scale for r in variant_runs]
        row = {"variant": name, "seeds": len(values), "mean": float(np.mean(values)),
               "std": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,
               "time_ratio": statistics.median(r["seconds"] / base_seconds[r["seed"]] for r in variant_runs)}
        if "train_accuracy" in variant_runs[0]:
            row["train_accuracy"] = float(np.mean([r["train_accuracy"] for r in variant_runs]))
        if name != BASELINE:
            row.update(compare(values, base))
            row["verdict"] = verdict(row["low"], row["high"], regime.higher_is_better)
        table.append(row)
    return table


def number(value: float, digits: int) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown(regime: Regime, table: list[dict[str, Any]]) -> str:
    digits = 2 if regime.scale == 100 else 4
    better = "higher" if regime.higher_is_better else "lower"
    head = ["variant", f"{regime.metric} ({regime.unit}, {better} is better)", "Δ vs baseline [95% CI]",
            "p (Welch)", "time ×", *(["train acc"] if "train_accuracy" in table[0] else []), "verdict"]
    lines = [f"### {regime.name}", "", *regime.notes, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        difference = "" if row["variant"] == BASELINE else (
            f"{row['difference']:+.{digits}f} [{number(row['low'], digits)}, {number(row['high'], digits)}]")
        cells = [row["variant"], f"{row['mean']:.{digits}f} ± {number(row['std'], digits)}", difference,
                 "" if row["variant"] == BASELINE else number(row["p"], 3), f"{row['time_ratio']:.2f}",
                 *([f"{row['train_accuracy'] * 100:.1f}%"] if "train_accuracy" in row else []),
                 row.get("verdict", "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(tables: dict[str, tuple[Regime, list[dict[str, Any]]]], path: Path) -> Path:
    """One panel per regime: each variant's difference to the baseline with its 95% interval, coloured by verdict."""
    from framework.plots import _pyplot, _save

    plt = _pyplot()
    colours = {"helps": "tab:green", "hurts": "tab:red", "no measurable effect": "tab:gray",
               "too few seeds": "tab:gray"}
    figure, axes = plt.subplots(1, len(tables), figsize=(6.4 * len(tables), 4.8), squeeze=False)
    for ax, (regime, table) in zip(axes.flat, tables.values()):
        compared = [row for row in table if row["variant"] != BASELINE]
        for y, row in enumerate(compared):
            finite = math.isfinite(row["low"])
            error = [[row["difference"] - row["low"]], [row["high"] - row["difference"]]] if finite else None
            ax.errorbar(row["difference"], y, xerr=error, fmt="o", capsize=4, color=colours[row["verdict"]])
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(compared)), [row["variant"] for row in compared])
        ax.invert_yaxis()
        better = "right" if regime.higher_is_better else "left"
        ax.set_xlabel(f"Δ {regime.metric} vs baseline ({regime.unit}; better to the {better})")
        ax.set_title(f"{regime.name}: mean difference, 95% CI")
    return _save(figure, path)


def strict_json(value: Any) -> Any:
    """NaN (no interval with one seed) as null: json.dumps would write NaN, which strict JSON readers refuse."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regime", choices=["all", *REGIMES], default="all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--variants", nargs="+", default=None, help="a subset of the regime's variants (baseline always)")
    p.add_argument("--epochs", type=int, default=None, help="default: the regime's calibrated epochs")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each one thread)")
    p.add_argument("--smoke", action="store_true", help="CI: digits_low_data, 1 seed, baseline + 1 variant, 2 epochs")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where ablation.json / .md / .png go")
    p.add_argument("--work-dir", type=Path, default=None, help="the runs' output dirs (default: a temporary dir)")
    args = p.parse_args(argv)
    if args.smoke:  # 2 epochs: the cosine schedule's warmup takes one
        args.regime, args.seeds, args.variants, args.epochs = "digits_low_data", args.seeds[:1], ["ema"], 2
    names = list(REGIMES) if args.regime == "all" else [args.regime]
    regimes = [REGIMES[name](**({"epochs": args.epochs} if args.epochs else {})) for name in names]
    for regime in regimes:
        if args.variants:
            unknown = set(args.variants) - {v.name for v in regime.variants}
            if unknown and len(regimes) == 1:
                p.error(f"unknown variants {sorted(unknown)} for {regime.name}: {[v.name for v in regime.variants]}")
            regime.variants = [v for v in regime.variants if v.name == BASELINE or v.name in args.variants]
            if any(v.equal_time for v in regime.variants) and equal_time_partner(regime) not in args.variants:
                p.error("an equal-time variant needs its equal-epochs variant: list both")
    planned = sum(len(r.variants) * len(args.seeds) * (r.launch_seconds + r.epoch_seconds * r.epochs)
                  for r in regimes) / args.jobs
    print(f"planned: {', '.join(f'{r.name}: {len(r.variants)} variants × {len(args.seeds)} seeds' for r in regimes)}"
          f", ~{planned / 60:.0f} min with {args.jobs} at once (estimated for a quiet 2-core machine; other jobs on it "
          "can make it half as long again or more)", flush=True)

    record = {"benchmark": "ablation", "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
              "regimes": {}}
    tables = {}
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work_dir or Path(temporary)
        for regime in regimes:
            runs = run_all(regime, args.seeds, regime.epochs, work, args.jobs)
            table = rows(regime, runs)
            tables[regime.name] = (regime, table)
            record["regimes"][regime.name] = {
                "metric": regime.metric, "higher_is_better": regime.higher_is_better, "scale": regime.scale,
                "epochs": regime.epochs, "notes": regime.notes, "rows": table, "runs": runs,
                "commands": {v.name: command(regime, v, 0, regime.epochs, Path("WORK"), Path("OUT"))
                             for v in regime.variants}}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "ablation.json").write_text(json.dumps(strict_json(record), indent=1) + "\n")
    text = "\n\n".join(markdown(regime, table) for regime, table in tables.values())
    (args.out_dir / "ablation.md").write_text(f"Measured {record['machine']['date']} on {record['machine']['cpu']} "
                                              f"({record['machine']['cores']} cores).\n\n{text}\n")
    plot(tables, args.out_dir / "ablation.png")
    print(f"\n{text}\n\nwrote {args.out_dir}/ablation.json, ablation.md, ablation.png", flush=True)
    return record


if __name__ == "__main__":
    main()
