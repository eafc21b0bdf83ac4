"""A transformers model exported with `save_pretrained` at the end of training: output_dir/hf_model/ holds config.json,
model.safetensors (the whole weights, gathered from every rank's shards under ZeRO-3) and the task's tokenizer, so
`AutoModelForCausalLM.from_pretrained(DIR)` and `pipeline("text-generation", model=DIR)` load the run's model with
transformers alone.

Hook: `fit_end` (every rank: ZeRO-3 gathers the shards from all of them; the process group is still up).
"""

from __future__ import annotations

from framework.backend import full_state_dict
from framework.errors import ConfigError
from framework.state import TrainState
from framework.technique import Technique, register


@register("hf_export")
class HFExport(Technique):
    """Write the trained model with `save_pretrained` (and the task's `tokenizer`, if it has one).

    Args:
        directory: under output_dir.
    """

    def __init__(self, directory: str = "hf_model"):
        self.directory = directory

    def fit_start(self, state: TrainState) -> None:
        model = state.accelerator.unwrap_model(state.model)
        if not hasattr(model, "save_pretrained"):
            raise ConfigError(f"hf_export: {type(model).__name__} has no save_pretrained (it is no transformers "
                              "model); remove hf_export, the run writes model.safetensors anyway.")

    def fit_end(self, state: TrainState) -> None:
        weights = full_state_dict(state.accelerator, state.model)
        if state.accelerator.is_main_process:
            directory = state.output_dir / self.directory
            state.accelerator.unwrap_model(state.model).save_pretrained(directory, state_dict=weights)
            tokenizer = getattr(state.task, "tokenizer", None)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
            print(f"transformers model: {directory} (AutoModelForCausalLM.from_pretrained)")
        state.summary["hf_model"] = self.directory
        state.accelerator.wait_for_everyone()
