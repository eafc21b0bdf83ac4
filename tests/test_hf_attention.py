"""attn_implementation="framework_chunked" in transformers models (framework/nn/hf_attention.py): registered by
`import framework` whatever the import order; a tiny GQA Llama gives the logits and parameter gradients of "eager" and
"sdpa" with no padding, right padding and left padding (as a 2-D mask, and as Hugging Face's own 4-D finfo.min mask);
the attention function alone agrees with transformers' eager on finfo.min masks with fully masked rows and a custom
scale; what it refuses; and, counted allocation by allocation, a training peak far below eager's at 512 tokens."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import eager_attention_forward

from framework.errors import ConfigError
from framework.nn.hf_attention import CHUNK_SIZE_KEY, NAME, framework_chunked_attention
from helpers import PeakTensorBytes

IMPLEMENTATIONS = ("eager", "sdpa", NAME)
T, CHUNK = 37, 8  # 5 query chunks × 5 key chunks, the last ones partial
EXACT = dict(rtol=1e-5, atol=1e-5)  # fp32 logits and outputs; the differences seen are ≤ 2e-7 (sdpa vs eager: 2.4e-7)
GRADS = dict(rtol=1e-5, atol=1e-6)  # parameter gradients (largest ~0.1); the differences seen are ≤ 3e-8


def tiny_llama_config(chunk: int = CHUNK) -> LlamaConfig:
    """hidden 64, 2 layers, 4 query heads sharing 2 key/value heads (GQA), vocab 97, fp32."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=1024, dtype=torch.float32)
    setattr(config, CHUNK_SIZE_KEY, chunk)
    return config


def tiny_llamas(chunk: int = CHUNK) -> dict[str, torch.nn.Module]:
    """One set of random weights, loaded under each attention implementation; training mode (dropout is 0)."""
    torch.manual_seed(0)
    models = {}
    for implementation in IMPLEMENTATIONS:
        models[implementation] = AutoModelForCausalLM.from_config(tiny_llama_config(chunk),
                                                                  attn_implementation=implementation).train()
        assert models[implementation].config._attn_implementation == implementation
    weights = models["eager"].state_dict()
    for model in models.values():
        model.load_state_dict(weights)
    return models


def hf_additive_mask(keep: torch.Tensor) -> torch.Tensor:
    """keep (B, T) 0/1 -> Hugging Face's eager (B, 1, T, T) causal + padding mask: 0 or torch.finfo(float32).min."""
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & keep.bool()[:, None, None, :]
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def batch(padding: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """input ids (3, T), which positions count (3, T) bool, and the model's mask keyword arguments."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, T), generator=generator)
    keep = torch.ones(3, T, dtype=torch.long)
    if padding == "right":
        keep[0, 29:], keep[1, 11:] = 0, 0  # real tokens first; row 1 ends inside the second chunk
    elif padding in ("left", "left-4d-float"):
        keep[0, :8], keep[1, :19] = 0, 0  # real tokens last; row 0 pads exactly one chunk
    kwargs = {}
    if padding in ("right", "left"):
        kwargs["attention_mask"] = keep
    elif padding == "left-4d-float":
        kwargs["attention_mask"] = hf_additive_mask(keep)  # transformers passes a 4-D mask through as it is
    return ids, keep.bool(), kwargs


def logits_and_grads(model: torch.nn.Module, padding: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits at real positions, and every parameter's gradient of a next-token-style loss over real positions."""
    ids, keep, kwargs = batch(padding)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, **kwargs).logits
    targets = torch.randint(0, 97, ids.shape, generator=torch.Generator().manual_seed(2))
    F.cross_entropy(logits[keep], targets[keep]).backward()
    return logits[keep].detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def models():
    return tiny_llamas()


@pytest.mark.parametrize("padding", ["none", "right", "left", "left-4d-float"])
def test_logits_and_gradients_equal_eager_and_sdpa(models, padding):
    results = {name: logits_and_grads(model, padding) for name, model in models.items()}
    chunked_logits, chunked_grads = results[NAME]
    for reference in ("eager", "sdpa"):
        logits, grads = results[reference]
        torch.testing.assert_close(chunked_logits, logits, **EXACT, msg=lambda m: f"logits vs {reference}: {m}")
        assert grads.keys() == chunked_grads.keys()
        for name, grad in grads.items():
            assert chunked_grads[name] is not None, name
            torch.testing.assert_close(chunked_grads[name], grad, **GRADS,
                                       msg=lambda m, name=name: f"grad of {name} vs {reference}: {m}")


@pytest.mark.parametrize("padding", ["none", "right"])
def test_under_bf16_autocast_it_trains_like_sdpa(models, padding):
    """Under autocast Llama's RoPE leaves query and key in fp32 while the value comes out of its projection in bf16;
    SDPA casts all three to the autocast dtype, and so must framework_chunked (it once failed in backward with
    "Expected out tensor to have dtype c10::BFloat16, but got float": the bf16 recipe and the GPU script's run)."""
    results = {}
    for name in ("sdpa", NAME):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[name] = logits_and_grads(models[name], padding)
    (logits, grads), (chunked_logits, chunked_grads) = results["sdpa"], results[NAME]
    assert chunked_logits.dtype == logits.dtype == torch.bfloat16  # the attention ran in bf16, as SDPA's did
    # bf16 rounding sets the tolerance: logits differ by ≤ 0.004 here, as much as sdpa and eager differ from each
    # other; gradients by ≤ 1.3% of each parameter's largest
    torch.testing.assert_close(chunked_logits.float(), logits.float(), rtol=0, atol=0.01)
    for name, grad in grads.items():
        assert (chunked_grads[name] - grad).abs().max() <= 0.03 * grad.abs().max(), name


def test_padding_changes_the_result(models):
    """Guards the comparison above: with the mask dropped, the real positions' logits differ (so a kernel that ignored
    padding, as transformers' default for an implementation without a registered mask builder, would fail)."""
    ids, keep, kwargs = batch("left")
    with torch.no_grad():
        masked = models[NAME](input_ids=ids, **kwargs).logits[keep]
        unmasked = models[NAME](input_ids=ids).logits[keep]
    assert (masked - unmasked).abs().max() > 1e-2


# --- the attention function alone ------------------------------------------------------------------------------------
class _Attention(torch.nn.Module):
    """What the interface reads off a transformers attention layer."""

    def __init__(self, groups: int, chunk: int = 4):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True
        self.config = tiny_llama_config(chunk)


@pytest.mark.parametrize("scaling", [None, 0.3])
def test_finfo_min_mask_with_fully_masked_rows_matches_eager(scaling):
    """Hugging Face's additive masks at torch.finfo(float32).min, including query rows with every key masked (left
    padding): eager gives those rows the uniform average of v, and so must the chunked kernel, gradients included.
    GQA (4 query heads on 2 key/value heads) and a scale other than 1/√D."""
    torch.manual_seed(3)
    module = _Attention(groups=2).train()
    B, H, Hkv, Tq, D = 2, 4, 2, 11, 8
    q = torch.randn(B, H, Tq, D, requires_grad=True)
    k, v = (torch.randn(B, Hkv, Tq, D, requires_grad=True) for _ in range(2))
    keep = torch.ones(B, Tq, dtype=torch.bool)
    keep[0, :6] = False  # rows 0-5 of sequence 0 see no key at all
    allowed = torch.ones(Tq, Tq, dtype=torch.bool).tril() & keep[:, None, None, :]
    mask = torch.zeros(B, 1, Tq, Tq).masked_fill(~allowed, torch.finfo(torch.float32).min)
    d_out = torch.randn(B, Tq, H, D)
    results = {}
    for name, fn in (("eager", eager_attention_forward), ("sdpa", sdpa_attention_forward),
                     (NAME, framework_chunked_attention)):
        out, weights = fn(module, q, k, v, mask, dropout=0.0, scaling=D ** -0.5 if scaling is None else scaling)
        assert out.shape == (B, Tq, H, D) and out.is_contiguous()
        results[name] = (out, *torch.autograd.grad(out, (q, k, v), d_out))
    for got, want in zip(results[NAME], results["eager"]):
        torch.testing.assert_close(got, want, **EXACT)
    torch.testing.assert_close(results[NAME][0], results["sdpa"][0], **EXACT)  # sdpa's gradients: see below
    # The rows this is about are uniform averages: the mean of v over all keys (the mask is finite everywhere)
    torch.testing.assert_close(results[NAME][0][0, :6], v[0].repeat_interleave(2, 0).mean(1).unsqueeze(0).expand(
        6, H, D), **EXACT)


def test_scaling_none_is_one_over_sqrt_d_and_causal_without_a_mask():
    torch.manual_seed(4)
    module = _Attention(groups=1)
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    out, weights = framework_chunked_attention(module, q, k, v, None)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    assert weights is None
    torch.testing.assert_close(out, want, **EXACT)
    module.is_causal = False  # an encoder layer: no causal rule
    out, _ = framework_chunked_attention(module, q, k, v, None)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v).transpose(1, 2), **EXACT)


def test_refuses_what_it_does_not_implement():
    q = k = v = torch.randn(1, 2, 5, 8)
    module = _Attention(groups=1).train()
    with pytest.raises(ConfigError, match="dropout"):
        framework_chunked_attention(module, q, k, v, None, dropout=0.1)
    framework_chunked_attention(module.eval(), q, k, v, None, dropout=0.1)  # eval: no dropout anyway
    with pytest.raises(ConfigError, match="softcap"):
        framework_chunked_attention(module, q, k, v, None, softcap=30.0)


# --- registration ----------------------------------------------------------------------------------------------------
BUILD_AFTER_IMPORT = """
import sys
{imports}
assert "{name}" in AttentionInterface._global_mapping and "{name}" in AttentionMaskInterface._global_mapping
config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=11)
model = AutoModelForCausalLM.from_config(config, attn_implementation="{name}")
assert model.config._attn_implementation == "{name}"
import torch
model(torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1, 1]]))
print("ok")
"""
TRANSFORMERS = ("from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig\n"
                "from transformers.masking_utils import AttentionMaskInterface")


@pytest.mark.parametrize("order", ["framework first", "transformers first"])
def test_registered_by_import_framework(order):
    """In a fresh interpreter: `import framework` before transformers (the import hook) or after it (at once)."""
    imports = ("import framework\nassert 'transformers.modeling_utils' not in sys.modules\n" + TRANSFORMERS
               if order == "framework first" else TRANSFORMERS + "\nimport framework")
    code = textwrap.dedent(BUILD_AFTER_IMPORT.format(imports=imports, name=NAME))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_not_registered_without_framework():
    """The check above can fail: without `import framework` transformers rejects the name."""
    code = ("from transformers import AutoModelForCausalLM, LlamaConfig\n"
            f"AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, "
            f"num_attention_heads=2, vocab_size=11), attn_implementation='{NAME}')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and NAME in result.stderr, result.stderr[-3000:]


# --- memory ----------------------------------------------------------------------------------------------------------
def training_peak_mib(model: torch.nn.Module, n: int) -> float:
    ids = torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(5))
    with PeakTensorBytes() as memory:
        logits = model(input_ids=ids).logits
        F.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    return memory.peak / 2**20


def test_training_peak_memory_far_below_eager_at_512_tokens():
    """Every tensor allocation counted (deterministic). At 512 tokens one layer's (4, 512, 512) fp32 score matrix is
    4 MiB, and eager keeps scores and probabilities of both layers for backward, plus a 1 MiB causal mask: its peak
    grows with T² (6.1, 19.8, 71.2 MiB at 256, 512, 1024 tokens). The chunked model (chunks of 64) keeps per layer
    only q, k, v, the output and row statistics, and one (4, 64, 64) block at a time: its peak grows with T like the
    fused SDPA kernel's (3.3, 6.3, 12.3 MiB against SDPA's 3.0, 5.8, 11.3), the rest of the model's activations."""
    n, peaks = 512, {}
    models = tiny_llamas(chunk=64)
    for name in IMPLEMENTATIONS:
        peaks[name] = training_peak_mib(models[name], n)
    assert peaks["eager"] > 12, peaks
    assert peaks[NAME] < peaks["eager"] / 3, peaks
    assert peaks[NAME] < 1.2 * peaks["sdpa"], peaks  # no (T, T) tensor: what remains is the model's own
