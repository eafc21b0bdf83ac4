"""Generated text at the end of training, for language models: printed, written to output_dir/sample.txt and logged
to the trackers (a text entry in W&B / TensorBoard), so a run's dashboard shows what the model writes.

Hook: `fit_end` (after the last evaluation, before the trackers close).
"""

from __future__ import annotations

import torch

from framework.data.text import decode, encode
from framework.errors import ConfigError, require
from framework.state import TrainState
from framework.technique import Technique, register


def sample_text(model: torch.nn.Module, prompt: str, length: int, temperature: float = 0.8, top_k: int | None = 40,
                seed: int = 0) -> str:
    """`length` bytes sampled after `prompt` from a byte-level model with a `generate` method (e.g. the GPT)."""
    device = next(model.parameters()).device
    tokens = torch.tensor([encode(prompt)], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        return decode(model.generate(tokens, length, temperature, top_k, generator=generator)[0].tolist())
    finally:
        model.train(was_training)


@register("text_sample")
class TextSample(Technique):
    """Sample text from the trained byte-level model at the end of training.

    Args:
        prompt: generation starts from these characters.
        length: bytes generated after the prompt.
        temperature: below 1 sharpens the distribution (0.8: fewer typos, still varied).
        top_k: sample among the k most likely bytes only (None: all).
    """

    def __init__(self, prompt: str = "def ", length: int = 300, temperature: float = 0.8, top_k: int | None = 40):
        require(length >= 1 and temperature > 0,
                f"text_sample: length must be ≥ 1 and temperature > 0 (got {length}, {temperature}).")
        self.prompt, self.length, self.temperature, self.top_k = prompt, length, temperature, top_k

    def fit_end(self, state: TrainState) -> None:
        model = state.accelerator.unwrap_model(state.model)
        if not hasattr(model, "generate"):
            raise ConfigError("text_sample needs a model with a generate(tokens, n, temperature, top_k) method "
                              "(framework.models.gpt.GPT has one).")
        # Every rank generates (under ZeRO-3 each forward needs all ranks to gather the sharded weights); the same
        # seed gives the same text everywhere; the main process reports it.
        text = sample_text(model, self.prompt, self.length, self.temperature, self.top_k)
        if state.accelerator.is_main_process:
            (state.output_dir / "sample.txt").write_text(text, encoding="utf-8")
            print(f"--- sample ({self.length} bytes after {self.prompt!r}) ---\n{text}\n---")
        state.accelerator.log({"samples/text": text}, step=state.step)
        state.summary["sample"] = text
