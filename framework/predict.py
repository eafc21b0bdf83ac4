"""Use a finished image-classification run on its own: the top classes of each image, with probabilities.

    python -m framework.predict outputs/image_classification photo1.png photo2.jpg [--top 3] [--weights model_ema]

Reads what the run wrote beside its weights: `model.json` (the model class and config), `preprocessor.json` (class
names, image mode, size and normalisation of evaluation) and `model.safetensors` (or `--weights NAME`: e.g.
`model_ema`, `model_best`). Nothing is trained; nothing is downloaded; weights are read as tensors only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from framework.data.images import preprocess_images
from framework.errors import FrameworkError
from framework.models import build_model


def load_run(run_dir: str | Path, weights: str = "model") -> tuple[torch.nn.Module, dict]:
    """The run's model with its weights, in eval mode, and its preprocessor description."""
    run = Path(run_dir)
    needed = ["model.json", "preprocessor.json", f"{weights}.safetensors"]
    missing = [name for name in needed if not (run / name).is_file()]
    if missing:
        raise FrameworkError(f"{run} lacks {', '.join(missing)}: point at the output_dir of a finished image "
                             "classification run (it writes them), or pick existing weights with --weights.")
    model = build_model(json.loads((run / "model.json").read_text()))
    state = load_file(run / f"{weights}.safetensors")
    model.load_state_dict({k.removeprefix("module.").replace("_orig_mod.", ""): v for k, v in state.items()})
    return model.eval(), json.loads((run / "preprocessor.json").read_text())


@torch.no_grad()
def predict(model: torch.nn.Module, preprocessor: dict, images: list[Image.Image], top: int = 3
            ) -> list[list[tuple[str, float]]]:
    """For each image, its `top` (class name, probability) pairs, most likely first."""
    probabilities = model(preprocess_images(preprocessor, images)).float().softmax(dim=-1)
    values, indices = probabilities.topk(min(top, probabilities.shape[-1]), dim=-1)
    names = preprocessor["class_names"]
    return [[(names[i], p) for i, p in zip(row_i.tolist(), row_p.tolist())] for row_i, row_p in zip(indices, values)]


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m framework.predict", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a finished run's output_dir")
    parser.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    parser.add_argument("--top", type=int, default=3, help="classes to show per image (default 3)")
    parser.add_argument("--weights", default="model",
                        help="which weights of the run: model (final), model_ema or model_best (default model)")
    options = parser.parse_args(args)
    try:
        model, preprocessor = load_run(options.run_dir, options.weights)
        images = []
        for path in options.images:
            try:
                images.append(Image.open(path))
            except OSError as error:
                raise FrameworkError(f"{path} cannot be read as an image ({error}).") from None
        for path, ranked in zip(options.images, predict(model, preprocessor, images, options.top)):
            print(f"{path}: " + ", ".join(f"{name} {p:.4f}" for name, p in ranked))
    except FrameworkError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
