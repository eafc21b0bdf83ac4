"""`chunked_attention` as a Hugging Face transformers attention implementation: "framework_chunked".

After `import framework`, any transformers model that dispatches through transformers' `AttentionInterface` (Llama,
Qwen2, Mistral, GPT-NeoX, ...) runs its attention in bounded memory:

    import framework  # registers "framework_chunked" (see `register_when_transformers_loads`)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="framework_chunked")

Exact: the same logits and gradients as "eager" and "sdpa" (tests/test_hf_attention.py: a tiny GQA Llama, fp32, with
right and left padding). Peak training memory of attention is O(T·chunk) instead of eager's O(T²).

The chunk size (queries and keys alike) is the model config's `framework_attention_chunk_size` when set, else
`DEFAULT_CHUNK_SIZE`: `config.framework_attention_chunk_size = 256` before or after building the model.

Masks: a custom implementation gets no mask at all from transformers unless a mask builder is registered for it under
the same name in `AttentionMaskInterface` (padding would be silently ignored), so "framework_chunked" registers
transformers' `sdpa_mask`: a boolean (B, 1, Tq, Tk) mask, True = attend (1 byte per element, not eager's 4), or None
when the batch has no padding and the pattern is plain causal; then `chunked_attention(causal=True)` runs, which builds
no mask and skips the blocks above the diagonal. An additive float mask (eager's, torch.finfo(dtype).min where masked;
what a caller's own 4-D mask usually is) is handled exactly too: `chunked_attention` keeps a masked row's maximum and
log-sum apart (see framework/nn/attention.py). A query row with every key masked (a left-padding position) gives zeros
with a bool mask, as SDPA does, and eager's uniform average with the finfo.min mask; either way only padded positions
see it.

Not supported (a clear error, never a silent difference): attention dropout > 0 while training (the kernel has no
dropout; Llama-family configs default to `attention_dropout=0.0`), `softcap` (Gemma 2), attention sinks (`s_aux`),
and a `position_bias` (T5-style relative bias). `output_attentions` gives None weights, as "sdpa" does.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import math
import sys
import warnings

import torch
from torch import Tensor

from framework.errors import ConfigError
from framework.nn.attention import chunked_attention

NAME = "framework_chunked"
DEFAULT_CHUNK_SIZE = 512
CHUNK_SIZE_KEY = "framework_attention_chunk_size"
"""The model config attribute that sets the chunk size of "framework_chunked"."""


def framework_chunked_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                                attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                                is_causal: bool | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-interface signature (as `sdpa_attention_forward`), computed by `chunked_attention`.

    Args:
        module: the calling attention layer; read for `num_key_value_groups` (GQA), `is_causal`, `training` and
            `config.framework_attention_chunk_size`.
        query, key, value: (B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, Dv), H a multiple of Hkv.
        attention_mask: None, a bool (True = attend) or an additive float mask broadcastable to (B, H, Tq, Tk), such as
            transformers' (B, 1, Tq, Tk) masks.
        dropout: must be 0 while training (refused otherwise); ignored in eval, as transformers' layers pass 0 then.
        scaling: the softmax scale; None means 1/√D.
        is_causal: None falls back to `module.is_causal` (default True); like SDPA, used only when there is no mask
            and more than one query (a mask already holds the causal pattern; one decoding query sees every key).

    Returns:
        (attn_output, None): attn_output (B, Tq, H, Dv) contiguous, as "sdpa" and "eager" return it.

    Raises:
        ConfigError: dropout > 0 while training, or an argument this kernel does not implement (softcap, s_aux,
            position_bias).
    """
    for unsupported in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise ConfigError(f"attn_implementation={NAME!r} does not support `{unsupported}`; use 'eager' (or "
                              f"'sdpa' where it does) for this model.")
    if dropout and getattr(module, "training", False):
        raise ConfigError(f"attn_implementation={NAME!r} has no attention dropout, but this model is training with "
                          f"dropout={dropout}; set the model config's attention dropout (Llama: attention_dropout) to "
                          f"0.0, or use attn_implementation='sdpa' or 'eager'.")
    if torch.is_autocast_enabled(query.device.type):
        # As SDPA does under autocast: RoPE leaves query and key in fp32 while the value comes out of its projection
        # in the autocast dtype, and the kernel's products need one dtype.
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # GQA: each key/value head serves `groups` query heads, as transformers' `repeat_kv` lays them out
        key, value = (_repeat_heads(t, groups) for t in (key, value))
    head_dim = query.shape[-1]
    if scaling is not None and not math.isclose(scaling, 1.0 / math.sqrt(head_dim), rel_tol=1e-12):
        query = query * (scaling * math.sqrt(head_dim))  # chunked_attention scales by 1/√D itself
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(is_causal) and attention_mask is None and query.shape[2] > 1
    config = getattr(module, "config", None)
    chunk = getattr(config, CHUNK_SIZE_KEY, None) or DEFAULT_CHUNK_SIZE
    out = chunked_attention(query, key, value, causal=causal, mask=attention_mask, q_chunk_size=chunk,
                            k_chunk_size=chunk)
    return out.transpose(1, 2).contiguous(), None


def _repeat_heads(x: Tensor, groups: int) -> Tensor:
    """(B, Hkv, T, D) -> (B, Hkv·groups, T, D), head h reading key/value head h // groups (transformers' repeat_kv)."""
    B, Hkv, T, D = x.shape
    return x[:, :, None].expand(B, Hkv, groups, T, D).reshape(B, Hkv * groups, T, D)


# --- registration ----------------------------------------------------------------------------------------------------
# `import transformers.modeling_utils` (where AttentionInterface lives) takes about 2 s, and most runs of this framework
# (vision recipes, GPT from framework/models) never load it. So `import framework` registers right away only when
# transformers' modeling code is already loaded, and otherwise leaves a one-shot import hook on sys.meta_path that
# registers the moment `transformers.modeling_utils` finishes loading: before any transformers model class exists, so
# `AutoModelForCausalLM.from_config(config, attn_implementation="framework_chunked")` works whatever the import order.
_WATCHED = "transformers.modeling_utils"


def register() -> None:
    """Register "framework_chunked" in transformers' AttentionInterface, and its mask builder (`sdpa_mask`) in
    AttentionMaskInterface (without one, transformers gives a custom implementation no mask: padding would be
    ignored). Imports transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, framework_chunked_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def register_when_transformers_loads() -> None:
    """Called by `import framework`: `register()` now if transformers' modeling code is loaded, else when it loads."""
    if _WATCHED in sys.modules:
        _register_or_warn()
    elif not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


def _register_or_warn() -> None:
    # A transformers release that moved these names must not break every `import transformers...` after
    # `import framework`: only "framework_chunked" is then missing, and this says why.
    try:
        register()
    except (ImportError, AttributeError) as error:
        warnings.warn(f"framework: could not register attn_implementation={NAME!r} with this transformers version: "
                      f"{error!r}", stacklevel=2)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `transformers.modeling_utils` is about to load, it takes the spec the other finders
    give, wraps its loader so that `register()` runs right after the module has executed, and leaves sys.meta_path."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _WATCHED:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # one shot; also keeps the lookup below from coming back here
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    """The original loader, with `register()` after `exec_module`; everything else is passed through."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register_or_warn()

    def __getattr__(self, name):  # get_source, get_filename, is_package, ... (inspect and tracebacks use them)
        return getattr(self._loader, name)
