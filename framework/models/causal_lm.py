"""Hugging Face transformers causal language models on the framework's loop: built from an architecture and its
sizes, or loaded from a local `save_pretrained` directory; their training FLOPs per token; and the export a finished
run exports with `save_pretrained` (recipes/language_model.py: `output_dir/hf_model/`).

Nothing is downloaded: `pretrained` is a local directory (or a hub id already in the local cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from framework.errors import ConfigError
from framework.nn.sharded import full_shape


@dataclass
class CausalLMConfig:
    """A transformers model (used when `source: transformers`)."""

    architecture: str = "llama"
    """A transformers model type (`llama`, `qwen2`, `mistral`, `gpt_neox`, ...): `AutoConfig.for_model(architecture)`."""
    sizes: dict[str, Any] = field(default_factory=dict)
    """That config's fields, e.g. {hidden_size: 128, num_hidden_layers: 4, num_attention_heads: 4, ...}; the
    vocabulary, context and special tokens come from the data."""
    pretrained: str | None = None
    """Fine-tune instead: a local directory written by `save_pretrained` (or a hub id in the local cache)."""
    attn_implementation: str = "sdpa"
    """`eager`, `sdpa` or `framework_chunked` (the framework's exact chunked attention: bounded memory)."""


def build_causal_lm(config: CausalLMConfig, vocab_size: int, context_length: int,
                    special_tokens: dict[str, int | None]) -> nn.Module:
    """A fresh model of `config.architecture` sized by `config.sizes` for this vocabulary and context, or the
    `config.pretrained` model. `special_tokens`: the tokenizer's eos/bos/pad token ids (the config's ids)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.pretrained is not None:
        model = _load_pretrained(config.pretrained, config.attn_implementation)
        rows = model.get_input_embeddings().num_embeddings
        if rows < vocab_size:
            raise ConfigError(f"model.pretrained {config.pretrained!r} embeds {rows} tokens but the tokenizer has "
                              f"{vocab_size}: set data.tokenizer to the model's own tokenizer directory.")
    else:
        try:
            defaults = AutoConfig.for_model(config.architecture)
        except ValueError as error:
            raise ConfigError(f"model.architecture {config.architecture!r} is not a transformers model type "
                              f"(e.g. llama, qwen2, mistral, gpt_neox): {error}") from None
        unknown = sorted(set(config.sizes) - set(defaults.to_dict()))
        if unknown:
            raise ConfigError(f"model.sizes: {unknown} are not fields of {type(defaults).__name__}; its fields "
                              f"include {sorted(k for k in defaults.to_dict() if not k.startswith('_'))[:40]}.")
        ids = {f"{name}_token_id": value for name, value in special_tokens.items() if value is not None}
        hf_config = AutoConfig.for_model(config.architecture, vocab_size=vocab_size,
                                         max_position_embeddings=context_length, **ids, **config.sizes)
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=config.attn_implementation)
    model.config.use_cache = False  # training builds no key/value cache; `generate` turns it on for itself
    return model


def _load_pretrained(name: str, attn_implementation: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name, attn_implementation=attn_implementation,
                                                    local_files_only=True, dtype=torch.float32)
    except OSError as error:
        raise ConfigError(f"model.pretrained {name!r} is neither a local save_pretrained directory nor in the local "
                          f"hub cache, and nothing is downloaded at run time: save the model with "
                          f"`save_pretrained(DIR)` where it has network and pass DIR. ({error})") from None


def transformer_flops_per_token(matmul_parameters: int, layers: int, width: int, context_length: int) -> int:
    """Training FLOPs per token (forward and backward) of a decoder-only transformer, as PaLM's appendix B counts
    them for MFU: 6 per weight of every matrix product (2 forward, 4 backward), plus 12 · layers · width · context
    for the attention scores and their weighted sum (the causal mask's skipped half is counted, as is customary)."""
    return 6 * matmul_parameters + 12 * layers * width * context_length


def flops_per_token(model: nn.Module, context_length: int) -> int | None:
    """`transformer_flops_per_token` for a transformers causal LM (its config names layers and width) or the
    framework's GPT; None for another model. Embedding lookups are no products; the output head is one, also when
    it is tied to the input embedding. Equal to what torch's FlopCounterMode counts for a forward and backward with
    eager attention (tests/test_transformers_lm.py)."""
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not layers or not width:
        return None
    embedded = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    # matrices only: norms' scales and biases are elementwise work, no products
    shapes = [(p, full_shape(p)) for p in model.parameters()]
    matmul = sum(shape.numel() for p, shape in shapes if len(shape) >= 2 and id(p) not in embedded)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else getattr(model, "lm_head", None)
    if head is not None and id(head.weight) in embedded:  # tied: its weight was left out above, its product is not
        matmul += full_shape(head.weight).numel()
    return transformer_flops_per_token(matmul, layers, width, context_length)
