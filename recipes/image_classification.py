"""Image classification: a small ResNet (or torchvision's model.name) on the embedded handwritten digits (or any
image data set), optionally fine-tuned from local weights (model.weights, model.freeze).

    accelerate launch --config_file launch_configs/cpu.yaml recipes/image_classification.py \
        [--config recipes/configs/image_classification.yaml] [--epochs 5] [--techniques.ema.decay 0.99] \
        [--model.name resnet18 --model.small_input true] [--model.weights resnet18.safetensors]

With no --config the run is exactly recipes/configs/image_classification.yaml's: the config's defaults equal it.
"""

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch

from framework.config import TrainerConfig, configured_techniques, parse_config, run_main
from framework.data import ImageDataConfig, image_data
from framework.loop import Trainer
from framework.models import model_description
from framework.models.resnet import ResNet
from framework.models.vision import ImageModelConfig, build_torchvision_model, freeze, frozen_names, load_weights
from framework.optim import OptimizerConfig
from framework.task import ClassificationTask
from framework.techniques.freeze import FreezeUntil


@dataclass
class ImageClassificationConfig(TrainerConfig):
    """Train an image classifier."""

    output_dir: str = "outputs/image_classification"
    epochs: int = 20
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    model: ImageModelConfig = field(default_factory=ImageModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    techniques: dict[str, Optional[dict[str, Any]]] = field(default_factory=lambda: {
        "label_smoothing": {"epsilon": 0.1},
        "cosine_lr": {"warmup_epochs": 1},
        "gradient_clipping": {"max_norm": 2.0},
        "ema": {"decay": 0.99, "warmup": True},
    })


def main(args: list[str] | None = None) -> Trainer:
    config = parse_config(ImageClassificationConfig, args)
    torch.manual_seed(config.seed)  # the same initial weights on every rank and every run
    data = image_data(config.data, seed=config.seed)
    # Channels and classes come from the data, so the same recipe serves the digits, CIFAR-10 or your folder; the
    # config keeps them, so output_dir/config.yaml rebuilds this model.
    config.model = replace(config.model, in_channels=data.channels, num_classes=data.num_classes)
    model = ResNet(config.model) if config.model.name is None else build_torchvision_model(
        config.model.name, config.model.in_channels, config.model.num_classes, config.model.small_input)
    # Weights loaded and parameters frozen before the optimizer and the accelerator (DDP, DeepSpeed) see the model.
    fresh = load_weights(model, config.model.weights) if config.model.weights else []
    techniques = configured_techniques(config)
    if config.model.unfreeze_epoch is None:
        freeze(model, config.model.freeze)
    else:  # trainable from the start (DDP's reducer holds them), their gradients dropped until the epoch: first
        techniques.insert(0, FreezeUntil(frozen_names(model, config.model.freeze), config.model.unfreeze_epoch))
    trainer = Trainer(config, model, config.optimizer.build(model), ClassificationTask(data.num_classes),
                      data.loaders["train"], data.loaders["validation"], data.loaders["test"], techniques=techniques,
                      pictures={"augmentations": data.draw_augmentations} if config.data.augment else None,
                      # what `python -m framework.predict` needs beside the weights
                      inference_files={"model.json": model_description(model, config.model),
                                       "preprocessor.json": data.preprocessor()})
    if fresh and trainer.accelerator.is_main_process:
        print(f"model.weights: {', '.join(fresh)} keep their fresh initialisation (the saved head has another class "
              f"count than the data's {data.num_classes}); every other tensor was loaded from {config.model.weights}.")
    trainer.fit()
    return trainer


if __name__ == "__main__":
    run_main(main)
