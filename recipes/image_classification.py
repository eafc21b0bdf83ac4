"""Image classification: a small ResNet on the embedded handwritten digits (or any image data set).

    accelerate launch --config_file launch_configs/cpu.yaml recipes/image_classification.py \
        --config recipes/configs/image_classification.yaml [--epochs 5] [--techniques.ema.decay 0.99]
"""

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from framework.config import TrainerConfig, parse_config, run_main
from framework.data import ImageDataConfig, image_data
from framework.loop import Trainer
from framework.models.resnet import ResNet, ResNetConfig
from framework.task import ClassificationTask


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 0.01
    """Peak learning rate."""
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's betas."""
    momentum: float = 0.9
    """SGD's (Nesterov) momentum."""

    def build(self, parameters) -> torch.optim.Optimizer:
        if self.name == "sgd":
            return torch.optim.SGD(parameters, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                                   nesterov=self.momentum > 0)
        return torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)


@dataclass
class ImageClassificationConfig(TrainerConfig):
    """Train an image classifier."""

    output_dir: str = "outputs/image_classification"
    epochs: int = 20
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    model: ResNetConfig = field(default_factory=ResNetConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


def main(args: list[str] | None = None) -> Trainer:
    config = parse_config(ImageClassificationConfig, args)
    torch.manual_seed(config.seed)  # the same initial weights on every rank and every run
    data = image_data(config.data, seed=config.seed)
    # Channels and classes come from the data, so the same recipe serves the digits, CIFAR-10 or your folder.
    model = ResNet(replace(config.model, in_channels=data.channels, num_classes=data.num_classes))
    trainer = Trainer(config, model, config.optimizer.build(model.parameters()), ClassificationTask(data.num_classes),
                      data.loaders["train"], data.loaders["validation"], data.loaders["test"],
                      pictures={"augmentations": data.draw_augmentations} if config.data.augment else None)
    trainer.fit()
    return trainer


if __name__ == "__main__":
    run_main(main)
