"""WGAN-GP (Gulrajani et al. 2017): a DCGAN-style generator learns the embedded handwritten digits (or any image
data set) against a critic kept 1-Lipschitz by the gradient penalty.

    accelerate launch --config_file launch_configs/cpu.yaml recipes/wgan_gp.py [--config recipes/configs/wgan_gp.yaml]

With no --config the run is exactly recipes/configs/wgan_gp.yaml's (gradient penalty and sample grids included).

Each step is one critic update; every n_critic-th also one generator update (`WGANTask` owns the step; the loop's
accelerator, trackers, checkpoints, schedules and techniques do the rest). Writes samples.png (fixed noise), logs
train/wasserstein, gradient_penalty, generator_loss and a sample grid; a logistic-regression judge fitted on the
real digits scores the samples (samples/confident, samples/class_spread).
"""

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import numpy as np
import torch

from framework.config import TrainerConfig, parse_config, run_main
from framework.data import ImageDataConfig, image_data
from framework.loop import Trainer
from framework.models.dcgan import WGAN, DCGANConfig
from framework.optim import OptimizerConfig
from framework.task import WGANTask
from framework.techniques.gan_samples import classifier_judge


@dataclass
class WGANGPConfig(TrainerConfig):
    """Train a Wasserstein GAN with gradient penalty."""

    output_dir: str = "outputs/wgan_gp"
    epochs: int = 1000
    max_steps: int | None = 3000
    n_critic: int = 5
    """Critic updates per generator update."""
    judge: bool = True
    """Score samples with a classifier fitted on the real training images (needs labels)."""
    data: ImageDataConfig = field(default_factory=lambda: ImageDataConfig(image_size=16))
    model: DCGANConfig = field(default_factory=DCGANConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-4, weight_decay=0.0,
                                                                               betas=(0.0, 0.9)))
    techniques: dict[str, Optional[dict[str, Any]]] = field(default_factory=lambda: {
        "gradient_penalty": {"weight": 10.0},
        "gan_samples": {"every": 500},
    })


def main(args: list[str] | None = None) -> Trainer:
    config = parse_config(WGANGPConfig, args)
    torch.manual_seed(config.seed)  # the same initial weights on every rank and every run
    data = image_data(config.data, seed=config.seed)
    # The image size and channels come from the data; the config keeps them, so output_dir/config.yaml rebuilds it.
    config.model = replace(config.model, image_size=config.data.image_size, channels=data.channels)
    gan = WGAN(config.model, data.mean, data.std)
    judge = None
    if config.judge:
        batches = list(data.loaders["train"])
        judge = classifier_judge(np.concatenate([b["pixel_values"].numpy() for b in batches]),
                                 np.concatenate([b["label"].numpy() for b in batches]), classes=data.num_classes)
    trainer = Trainer(config, gan, config.optimizer.build(gan), WGANTask(config.n_critic, judge=judge),
                      data.loaders["train"])
    trainer.fit()
    return trainer


if __name__ == "__main__":
    run_main(main)
