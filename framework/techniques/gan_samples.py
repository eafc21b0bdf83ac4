"""Generated samples for GANs: every `every` steps and at the end, a grid of images from the same fixed noise
(output_dir/samples/step_N.png, the last also as output_dir/samples.png, each logged as the `samples` picture), so
the dashboard shows the generator improving on the same inputs.

If the task has a `judge` (normalized images -> {name: score}), its scores of `judge_samples` fresh samples are
logged as `samples/NAME` and kept in summary.json: a quantitative "is generation improving" next to the picture.

Hooks: `after_optimizer_step`, `fit_end`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from framework.errors import ConfigError, require
from framework.plots import plot_image_grid
from framework.state import TrainState
from framework.technique import Technique, register
from framework.tracking import log_picture


@torch.no_grad()
def generate(gan: torch.nn.Module, count: int, seed: int) -> torch.Tensor:
    """`count` images (normalized, like the data) from the generator in eval mode, from noise fixed by `seed`."""
    noise = gan.noise(count, torch.Generator(device=gan.critic.score.weight.device).manual_seed(seed))
    was_training = gan.generator.training
    gan.generator.eval()
    try:
        return gan.generator(noise)
    finally:
        gan.generator.train(was_training)


def classifier_judge(images: np.ndarray, labels: np.ndarray, confidence: float = 0.9,
                     classes: int | None = None) -> Callable[[torch.Tensor], dict[str, float]]:
    """A judge of generated images from a logistic-regression classifier fitted on real (normalized) images:
    `confident`, the share of samples it gives a probability ≥ `confidence`, and `class_spread`, the entropy of the
    predicted classes over log(classes) (1: every class equally often; 0: one class only, i.e. mode collapse).
    Both rise as a generator learns the data."""
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(max_iter=1000).fit(images.reshape(len(images), -1), labels)
    classes = classes or len(classifier.classes_)

    def judge(generated: torch.Tensor) -> dict[str, float]:
        probabilities = classifier.predict_proba(generated.flatten(1).float().cpu().numpy())
        counts = np.bincount(probabilities.argmax(1), minlength=classes)
        shares = counts[counts > 0] / counts.sum()
        return {"confident": float((probabilities.max(1) >= confidence).mean()),
                "class_spread": float(0.0 - (shares * np.log(shares)).sum() / np.log(classes))}

    return judge


@register("gan_samples")
class GANSamples(Technique):
    """A fixed-noise sample grid every `every` steps and at the end; the task's judge scores fresh samples.

    Args:
        every: steps between grids (0: only at the end).
        rows / columns: the grid's shape.
        judge_samples: samples the judge scores each time.
        seed: fixes the grid's noise.
    """

    def __init__(self, every: int = 500, rows: int = 8, columns: int = 8, judge_samples: int = 500, seed: int = 0):
        require(every >= 0 and rows >= 1 and columns >= 1 and judge_samples >= 1,
                f"gan_samples: every must be >= 0 and rows, columns, judge_samples >= 1 "
                f"(got {every}, {rows}, {columns}, {judge_samples}).")
        self.every, self.rows, self.columns, self.judge_samples, self.seed = every, rows, columns, judge_samples, seed

    def fit_start(self, state: TrainState) -> None:
        gan = state.accelerator.unwrap_model(state.model)
        if not (hasattr(gan, "generator") and hasattr(gan, "noise")):
            raise ConfigError("gan_samples needs a GAN model with `generator` and `noise` "
                              "(framework.models.dcgan.WGAN). Remove the technique.")

    def after_optimizer_step(self, state: TrainState) -> None:
        if self.every and state.step % self.every == 0 and state.step < state.max_steps:
            self.draw(state)

    def fit_end(self, state: TrainState) -> None:
        path = self.draw(state)
        if path is not None:
            (state.output_dir / "samples.png").write_bytes(path.read_bytes())

    def draw(self, state: TrainState) -> Path | None:
        """Only the main process draws (the generator is not sharded: GANs refuse DeepSpeed)."""
        if not state.accelerator.is_main_process:
            return None
        gan = state.accelerator.unwrap_model(state.model)
        images = gan.generator.to_pixels(generate(gan, self.rows * self.columns, self.seed))
        rows = [list(images[r * self.columns:(r + 1) * self.columns]) for r in range(self.rows)]
        path = plot_image_grid(rows, [""] * self.columns, state.output_dir / "samples" / f"step_{state.step:08d}.png")
        log_picture(state.accelerator, "samples", path, step=state.step)
        judge = getattr(state.task, "judge", None)
        if judge is not None:
            scores = judge(generate(gan, self.judge_samples, self.seed + 1))
            state.accelerator.log({f"samples/{k}": v for k, v in scores.items()}, step=state.step)
            state.summary.setdefault("samples", []).append({"step": state.step, **scores})
        return path
