"""Run a recipe (the image recipe, or the one named by $DUMP_RECIPE) as `accelerate launch` would, with one more
technique that writes this rank's final parameters (whole tensors, gathered under ZeRO-3) to
output_dir/params_rank{N}.safetensors, so a test can compare the ranks. Pass `--techniques.dump_params '{}'` to
switch it on."""

import importlib.util
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from framework.technique import Technique, register


@register("dump_params")
class DumpParams(Technique):
    def fit_end(self, state):
        model = state.accelerator.unwrap_model(state.model)
        named = dict(model.named_parameters())
        if any(hasattr(p, "ds_tensor") for p in named.values()):
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(named.values())):
                tensors = {name: p.detach().clone() for name, p in named.items()}
        else:
            tensors = {name: p.detach().clone() for name, p in named.items()}
        rank = state.accelerator.process_index
        save_file({k: v.float().contiguous() for k, v in tensors.items()},
                  str(state.output_dir / f"params_rank{rank}.safetensors"))


name = os.environ.get("DUMP_RECIPE", "image_classification")
path = Path(__file__).resolve().parents[2] / "recipes" / f"{name}.py"
spec = importlib.util.spec_from_file_location(name, path)
recipe = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = recipe  # type hints resolve through sys.modules, as for a script run as __main__
spec.loader.exec_module(recipe)
recipe.run_main(lambda: recipe.main(sys.argv[1:]))
