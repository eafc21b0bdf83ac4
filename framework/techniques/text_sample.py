"""Generated text at the end of training, for language models: printed, written to output_dir/sample.txt and logged
to the trackers (a text entry in W&B / TensorBoard), so a run's dashboard shows what the model writes.

Hook: `fit_end` (after the last evaluation, before the trackers close).
"""

from __future__ import annotations

from typing import Any

import torch

from framework.backend import describe_backend
from framework.data.text import decode, encode
from framework.errors import ConfigError, require
from framework.state import TrainState
from framework.technique import Technique, register


def sample_text(model: torch.nn.Module, prompt: str, length: int, temperature: float = 0.8, top_k: int | None = 40,
                seed: int = 0, tokenizer: Any = None, synced_ranks: bool = False) -> str:
    """`length` tokens sampled after `prompt`. `tokenizer` encodes and decodes (a transformers tokenizer; None: UTF-8
    bytes). A transformers model samples through its own `generate`; another model needs a
    `generate(tokens, n, temperature, top_k, generator=)` method (the framework's GPT has one). `synced_ranks`: every
    rank runs each forward together (ZeRO-3 gathers each layer's shards from all ranks)."""
    from transformers import GenerationMixin

    device = next(model.parameters()).device
    ids = tokenizer(prompt)["input_ids"] if tokenizer is not None else encode(prompt)
    tokens = torch.tensor([ids], device=device)
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, GenerationMixin):
            # generate samples from the global random stream: seed a copy of it, leave the run's own untouched
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                out = model.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=True,
                                     max_new_tokens=length, min_new_tokens=length, temperature=temperature,
                                     top_k=top_k or 0, pad_token_id=tokenizer.eos_token_id if tokenizer else 0,
                                     use_cache=True, synced_gpus=synced_ranks)
        else:
            generator = torch.Generator(device=device).manual_seed(seed)
            out = model.generate(tokens, length, temperature, top_k, generator=generator)
    finally:
        model.train(was_training)
    if tokenizer is not None:
        return tokenizer.decode(out[0].tolist(), skip_special_tokens=True)
    return decode(out[0].tolist())


@register("text_sample")
class TextSample(Technique):
    """Sample text from the trained language model at the end of training, decoded with the task's `tokenizer` (a
    transformers tokenizer; a task without one: UTF-8 bytes).

    Args:
        prompt: generation starts from these characters.
        length: tokens generated after the prompt (bytes for a byte-level model).
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
            raise ConfigError("text_sample needs a transformers model or one with a generate(tokens, n, temperature, "
                              "top_k) method (framework.models.gpt.GPT has one).")
        # Every rank generates (under ZeRO-3 each forward needs all ranks to gather the sharded weights); the same
        # seed gives the same text everywhere; the main process reports it.
        text = sample_text(model, self.prompt, self.length, self.temperature, self.top_k,
                           tokenizer=getattr(state.task, "tokenizer", None),
                           synced_ranks=describe_backend(state.accelerator).deepspeed_stage == 3)
        if state.accelerator.is_main_process:
            (state.output_dir / "sample.txt").write_text(text, encoding="utf-8")
            print(f"--- sample ({self.length} tokens after {self.prompt!r}) ---\n{text}\n---")
        state.accelerator.log({"samples/text": text}, step=state.step)
        state.summary["sample"] = text
