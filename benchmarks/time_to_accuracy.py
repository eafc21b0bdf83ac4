"""Time to accuracy: the image recipe's default run (recipes/configs/image_classification.yaml: ResNet, AdamW,
cosine LR with 1 warmup epoch, label smoothing 0.1, clipping 2.0, EMA 0.99 with warmup; validation every epoch,
checkpoint every epoch) against a plain Accelerate loop with the same data, model, optimizer, schedule and
regularization (torch's `SequentialLR`, `cross_entropy(label_smoothing=)`, `accelerator.clip_grad_norm_`,
`AveragedModel` for the EMA; validation every epoch, no checkpoints). Both run in this process, interleaved; time is
wall time from parsing the config to the test accuracy, data loading included. scikit-learn's SVC on the same
train/test split gives a reference accuracy.

    .venv/bin/python benchmarks/time_to_accuracy.py [--rounds 1] [--epochs 20] [--smoke]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import common  # noqa: F401  (threads and sys.path first)
import numpy as np
import torch
import torch.nn.functional as F
from common import ROOT, Row, check, parse, parser, report, reset_accelerate

sys.path.insert(0, str(ROOT / "recipes"))
import image_classification as recipe  # noqa: E402

RECIPE, PLAIN = "image recipe (framework Trainer)", "plain Accelerate loop"
CONFIG = str(ROOT / "recipes" / "configs" / "image_classification.yaml")


def recipe_args(output_dir: str, epochs: int | None) -> list[str]:
    return ["--config", CONFIG, "--tracker", "none", "--overwrite", "true", "--output_dir", output_dir,
            *(["--epochs", str(epochs)] if epochs else [])]


def run_recipe(epochs: int | None) -> dict[str, float]:
    reset_accelerate()
    with tempfile.TemporaryDirectory() as output_dir:
        started = time.perf_counter()
        recipe.main(recipe_args(output_dir, epochs))
        seconds = time.perf_counter() - started
        summary = json.loads((Path(output_dir) / "summary.json").read_text())
    return {"seconds": seconds, "accuracy": summary["metrics"]["test/accuracy"]}


def ema_with_warmup(decay: float):
    """What the recipe's `ema: {decay, warmup: true}` does per update, as an AveragedModel averaging function."""
    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():  # BatchNorm's batch counters: copied
            torch._foreach_copy_(averaged, current)
            return
        n = float(updates)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1 + n) / (10 + n)))
    return update


def run_plain(epochs: int | None) -> dict[str, float]:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from framework.config import parse_config
    from framework.data import image_data
    from framework.models.resnet import ResNet
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
    from torch.optim.swa_utils import AveragedModel

    reset_accelerate()
    with tempfile.TemporaryDirectory() as output_dir:
        started = time.perf_counter()
        config = parse_config(recipe.ImageClassificationConfig, recipe_args(output_dir, epochs))
        techniques = config.techniques
        torch.manual_seed(config.seed)
        data = image_data(config.data, seed=config.seed)
        model = ResNet(replace(config.model, in_channels=data.channels, num_classes=data.num_classes))
        optimizer = config.optimizer.build(model)
        accelerator = Accelerator(cpu=True)
        model, optimizer, train, val, test = accelerator.prepare(
            model, optimizer, data.loaders["train"], data.loaders["validation"], data.loaders["test"])
        set_seed(config.seed)
        total, warmup = config.epochs * len(train), round(techniques["cosine_lr"]["warmup_epochs"] * len(train))
        scheduler = SequentialLR(optimizer, [LinearLR(optimizer, 1.0 / warmup, 1.0, total_iters=warmup - 1),
                                             CosineAnnealingLR(optimizer, total - warmup)], milestones=[warmup])
        ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(techniques["ema"]["decay"]), use_buffers=True)
        smoothing, max_norm = techniques["label_smoothing"]["epsilon"], techniques["gradient_clipping"]["max_norm"]

        @torch.no_grad()
        def accuracy(loader) -> float:
            ema.eval()
            correct = [accelerator.gather_for_metrics(ema(b["pixel_values"]).argmax(-1) == b["label"]) for b in loader]
            return torch.cat(correct).float().mean().item()

        for epoch in range(config.epochs):
            model.train()
            for batch in train:
                loss = F.cross_entropy(model(batch["pixel_values"]), batch["label"], label_smoothing=smoothing)
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(model.parameters(), max_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                ema.update_parameters(model)
            accelerator.print(f"epoch {epoch + 1}: val accuracy {accuracy(val):.4f}")
        result = accuracy(test)
        accelerator.end_training()
        return {"seconds": time.perf_counter() - started, "accuracy": result}


def svc_accuracy() -> float:
    """scikit-learn's SVC (default RBF kernel) on the raw 8×8 pixels of the recipe's train and test splits."""
    from framework.data import ImageDataConfig, image_data
    from sklearn.svm import SVC

    splits = image_data(ImageDataConfig(num_workers=0)).splits

    def arrays(split):
        return (np.stack([np.asarray(image, dtype=np.float32).ravel() / 255 for image in split["image"]]),
                np.asarray(split["label"]))

    return float(SVC().fit(*arrays(splits["train"])).score(*arrays(splits["test"])))


def main(argv: Sequence[str] | None = None) -> dict:
    p = parser(__doc__.split("\n\n")[0], steps=0, rounds=1, warmup=0)
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's (20)")
    args = parse(p, argv)
    if args.smoke:
        args.epochs = 2  # the recipe's warmup is one epoch: the shortest run it accepts
    runs: dict[str, list[dict]] = {RECIPE: [], PLAIN: []}
    for index in range(args.rounds):  # interleaved: recipe, plain, recipe, plain, …
        for name, run in ((RECIPE, run_recipe), (PLAIN, run_plain)):
            runs[name].append(run(args.epochs))
            print(f"round {index + 1}/{args.rounds} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    svc = svc_accuracy()
    seconds = {name: [r["seconds"] for r in results] for name, results in runs.items()}
    accuracy = {name: float(np.median([r["accuracy"] for r in results])) for name, results in runs.items()}
    check(all(0.0 <= a <= 1.0 for a in accuracy.values()), f"accuracies out of range: {accuracy}")
    median = {name: float(np.median(s)) for name, s in seconds.items()}
    ratio = median[RECIPE] / median[PLAIN]
    gap = (accuracy[PLAIN] - accuracy[RECIPE]) * 100
    rows = [Row("time to accuracy", RECIPE, median[RECIPE], "s", min(seconds[RECIPE]), max(seconds[RECIPE]), ratio,
                "≤ 1.05× plain", ratio <= 1.05),
            Row("time to accuracy", PLAIN, median[PLAIN], "s", min(seconds[PLAIN]), max(seconds[PLAIN]), 1.0),
            Row("time to accuracy", "test accuracy: recipe", accuracy[RECIPE] * 100, "%",
                target="≥ plain − 0.3 points", met=gap <= 0.3, note=f"plain {accuracy[PLAIN] * 100:.2f}%"),
            Row("time to accuracy", "test accuracy: scikit-learn SVC (reference)", svc * 100, "%")]
    checks = {"accuracy": accuracy, "svc_accuracy": svc, "accuracy_gap_points": gap}
    return report("time_to_accuracy", args, rows, {"runs": runs}, checks)


if __name__ == "__main__":
    main()
