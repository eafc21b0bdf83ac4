"""A small pre-norm GPT (Radford et al., 2019; the nanoGPT shape): token + position embeddings, N blocks of
attention and MLP on residual branches, a final LayerNorm, and a head tied to the token embedding.

Attention goes through `framework.nn.attention.attention`, so a config picks torch's fused SDPA, the exact chunked
attention whose training memory grows with chunk × length instead of length², or the naive reference. Every residual
branch carries a `DropPath` (set by the `stochastic_depth` technique), and `set_grad_checkpointing` recomputes blocks
in backward instead of keeping their activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from framework.nn.attention import attention
from framework.nn.checkpointing import checkpoint_modules, remove_checkpointing
from framework.nn.drop_path import DropPath


@dataclass
class GPTConfig:
    """GPT: layers, heads, width and attention (vocabulary and context come from the data)."""

    vocab_size: int = 256
    """256 for bytes."""
    context_length: int = 256
    """The longest sequence the position embedding covers."""
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    """Width of the residual stream; each head has n_embd / n_head channels."""
    dropout: float = 0.0
    bias: bool = False
    """Biases in Linear and LayerNorm layers (False: a little faster, as good)."""
    attention: Literal["auto", "sdpa", "chunked", "naive"] = "auto"
    """Attention implementation (framework/nn/attention.py)."""
    attention_chunk_size: int = 512
    """Query/key chunk of the chunked attention: its training memory grows with chunk × length."""

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head}).")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        # (B, T, 3C) -> 3 × (B, nh, T, hs)
        q, k, v = self.qkv(x).view(batch, length, 3, self.config.n_head, -1).permute(2, 0, 3, 1, 4)
        y = attention(q, k, v, causal=True, key_padding_mask=key_padding_mask,
                      implementation=self.config.attention, chunk_size=self.config.attention_chunk_size)
        return self.dropout(self.proj(y.transpose(1, 2).reshape(batch, length, width)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm: x + attn(ln(x)), then x + mlp(ln(x)); each branch through a DropPath (identity until set)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.drop_path_1 = DropPath()
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.drop_path_2 = DropPath()

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path_1(self.attn(self.ln_1(x), key_padding_mask))
        return x + self.drop_path_2(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.context_length, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one matrix maps tokens in and out
        self.apply(self._init_weights)
        for name, parameter in self.named_parameters():
            if name.endswith("proj.weight"):  # GPT-2: residual projections scaled down by depth
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab_size) logits of the next token at every position.

        Padding: `key_padding_mask` (B, T) bool, True = a real token, or `attention_mask` (B, T), 1 = real, 0 = padding
        (the transformers convention, what `LanguageModelTask` passes); no position attends to padding. Positions
        count from the block's start, so right padding keeps real tokens at the positions they were trained at."""
        if attention_mask is not None:
            key_padding_mask = attention_mask.bool()
        length = tokens.shape[1]
        if length > self.config.context_length:
            raise ValueError(f"sequence of {length} tokens is longer than context_length {self.config.context_length}")
        positions = torch.arange(length, device=tokens.device)
        x = self.drop(self.wte(tokens) + self.wpe(positions))
        for block in self.blocks:
            x = block(x, key_padding_mask)
        return self.lm_head(self.ln_f(x))

    def set_grad_checkpointing(self, enable: bool = True, policy: str = "full", every_k: int = 2) -> None:
        """Recompute blocks in backward instead of storing their activations (the policies are described in
        framework/nn/checkpointing.py)."""
        if enable:
            checkpoint_modules(self, [Block], policy=policy, every_k=every_k)
        else:
            remove_checkpointing(self)

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample `max_new_tokens` continuations of (B, T) `tokens`, feeding back the last context_length."""
        for _ in range(max_new_tokens):
            logits = self(tokens[:, -self.config.context_length:])[:, -1, :].float() / max(temperature, 1e-6)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            tokens = torch.cat([tokens, next_token], dim=1)
        return tokens
