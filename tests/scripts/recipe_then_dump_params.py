"""Run the image recipe as `accelerate launch` would, then write this rank's final parameters to
output_dir/params_rank{N}.safetensors, so a test can compare the ranks."""

import importlib.util
import sys
from pathlib import Path

from safetensors.torch import save_file

path = Path(__file__).resolve().parents[2] / "recipes" / "image_classification.py"
spec = importlib.util.spec_from_file_location("image_classification", path)
recipe = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = recipe  # type hints resolve through sys.modules, as for a script run as __main__
spec.loader.exec_module(recipe)

trainer = recipe.main(sys.argv[1:])
model = trainer.accelerator.unwrap_model(trainer.state.model)
parameters = {name: p.detach().contiguous() for name, p in model.named_parameters()}
save_file(parameters, str(trainer.state.output_dir / f"params_rank{trainer.accelerator.process_index}.safetensors"))
