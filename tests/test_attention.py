"""Attention: chunked (with and without recompute) and SDPA against the naive reference — outputs and q/k/v gradients
for every mask kind, odd lengths and chunk sizes, fp32 and bf16; fully masked rows; the custom backward by gradcheck;
`attention`'s dispatch; and the memory claim: under backward, recompute keeps the peak far below naive's."""

from __future__ import annotations

import pytest
import torch

from framework.errors import ConfigError
from framework.nn.attention import (
    AUTO_MAX_SDPA_MASK_ELEMENTS,
    attention,
    choose_implementation,
    chunked_attention,
    naive_attention,
)
from helpers import PeakTensorBytes

MASKS = ("none", "causal", "padding", "causal+padding", "bool", "additive")
SHAPES = ((13, 13), (10, 17), (17, 10))  # (Tq, Tk): square, more keys, more queries; none a multiple of 7
FP32 = dict(rtol=1e-4, atol=1e-5)
BF16 = dict(rtol=3e-2, atol=3e-2)  # bf16 has 8 bits of mantissa: 2⁻⁸ ≈ 0.004 per rounding, several roundings deep


def make_inputs(Tq: int, Tk: int, masks: str, seed: int, dtype=torch.float32, B: int = 2, H: int = 3, D: int = 8):
    """Random q, k, v, an output gradient, and the keyword arguments of mask kind `masks`, all on a fresh seed."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, d_out = (torch.randn(B, H, T, D, generator=g).to(dtype) for T in (Tq, Tk, Tk, Tq))
    kwargs = {}
    if "causal" in masks:
        kwargs["causal"] = True
    if "padding" in masks:
        padding = torch.rand(B, Tk, generator=g) > 0.3
        padding[:, 0] = True  # every row keeps a key here; fully masked rows have their own test
        kwargs["key_padding_mask"] = padding
    if masks == "bool":
        mask = torch.rand(1, H, Tq, Tk, generator=g) > 0.4
        mask[..., 0] = True
        kwargs["mask"] = mask
    if masks == "additive":  # (Tq, Tk): broadcast over batch and heads; some -inf entries, as a user's bias may have
        kwargs["mask"] = torch.randn(Tq, Tk, generator=g).masked_fill(torch.rand(Tq, Tk, generator=g) > 0.8,
                                                                      float("-inf"))
        kwargs["mask"][:, 0] = 0.0
    return q, k, v, d_out, kwargs


def run(fn, q, k, v, d_out, **kwargs):
    """fn's output and the gradients of <output, d_out> with respect to q, k, v."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    out.backward(d_out)
    return out.detach(), q.grad, k.grad, v.grad


def reference(q, k, v, d_out, **kwargs):
    """The naive implementation in fp64 on the same inputs: the answer every dtype is measured against."""
    return run(naive_attention, *(t.double() for t in (q, k, v, d_out)), **kwargs)


def assert_all_close(actual, expected, **tolerance):
    for name, a, e in zip(("output", "dq", "dk", "dv"), actual, expected):
        torch.testing.assert_close(a.double(), e.double(), **tolerance, msg=lambda m, name=name: f"{name}: {m}")


# --- agreement -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("chunk", [1, 7, 64])  # one row per block; lengths not multiples of it; larger than n
def test_chunked_matches_naive_and_sdpa_in_fp32(masks, chunk):
    for seed, (Tq, Tk) in enumerate(SHAPES):
        q, k, v, d_out, kwargs = make_inputs(Tq, Tk, masks, seed=100 * chunk + 10 * MASKS.index(masks) + seed)
        expected = reference(q, k, v, d_out, **kwargs)
        assert_all_close(run(naive_attention, q, k, v, d_out, **kwargs), expected, **FP32)
        assert_all_close(run(attention, q, k, v, d_out, implementation="sdpa", **kwargs), expected, **FP32)
        for recompute in (True, False):
            chunked = run(chunked_attention, q, k, v, d_out, q_chunk_size=chunk, k_chunk_size=chunk,
                          recompute=recompute, **kwargs)
            assert chunked[0].dtype == torch.float32
            assert_all_close(chunked, expected, **FP32)


def test_unequal_query_and_key_chunks_and_value_width():
    q, k, v, d_out, kwargs = make_inputs(23, 19, "causal+padding", seed=7)
    v = torch.randn(2, 3, 19, 5)  # Dv ≠ D
    d_out = torch.randn(2, 3, 23, 5)
    expected = reference(q, k, v, d_out, **kwargs)
    for q_chunk, k_chunk in ((3, 8), (8, 3), (23, 1)):
        got = run(chunked_attention, q, k, v, d_out, q_chunk_size=q_chunk, k_chunk_size=k_chunk, **kwargs)
        assert_all_close(got, expected, **FP32)


@pytest.mark.parametrize("masks", ["none", "causal+padding", "additive"])
def test_bf16_within_bf16_tolerance_and_returns_bf16(masks):
    q, k, v, d_out, kwargs = make_inputs(37, 37, masks, seed=3, dtype=torch.bfloat16, D=16)
    expected = reference(q, k, v, d_out, **kwargs)  # fp64 on the very same (bf16-rounded) inputs
    for implementation in ("naive", "sdpa", "chunked"):
        got = run(attention, q, k, v, d_out, implementation=implementation, chunk_size=8, **kwargs)
        assert all(t.dtype == torch.bfloat16 for t in got), implementation
        assert_all_close(got, expected, **BF16)


def test_custom_backward_passes_gradcheck():
    """The hand-written backward against finite differences of the forward, in fp64, with all masks at once."""
    q, k, v, _, kwargs = make_inputs(6, 7, "causal+padding", seed=11, dtype=torch.float64, B=1, H=2, D=3)
    additive = torch.randn(6, 7, dtype=torch.float64)

    def f(q, k, v):
        return chunked_attention(q, k, v, mask=additive, q_chunk_size=4, k_chunk_size=3, **kwargs)

    assert torch.autograd.gradcheck(f, tuple(t.requires_grad_() for t in (q, k, v)))


# --- fully masked rows -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("implementation", ["naive", "sdpa", "chunked"])
def test_a_row_with_every_key_masked_gives_zeros_and_zero_gradients(implementation):
    q, k, v, d_out, _ = make_inputs(9, 9, "none", seed=5)
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[0] = False  # sequence 0: every key is padding -> every row empty
    padding[1, :4] = False  # sequence 1, left-padded: under causal, rows 0-3 see only padding
    out, dq, dk, dv = run(attention, q, k, v, d_out, causal=True, key_padding_mask=padding,
                          implementation=implementation, chunk_size=4)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert (out[0] == 0).all() and (out[1, :, :4] == 0).all() and (out[1, :, 4:] != 0).all()
    assert (dq[0] == 0).all() and (dq[1, :, :4] == 0).all()
    assert (dk[0] == 0).all() and (dv[0] == 0).all()  # nothing attended to these keys
    assert_all_close((out, dq, dk, dv), reference(q, k, v, d_out, causal=True, key_padding_mask=padding), **FP32)


# --- additive masks at torch.finfo(dtype).min (Hugging Face's) -----------------------------------------------------
def hf_additive_mask(B: int, Tq: int, Tk: int, causal: bool, dtype=torch.float32) -> torch.Tensor:
    """A (B, 1, Tq, Tk) additive mask as Hugging Face models build it: 0 where allowed, torch.finfo(dtype).min where
    not. Sequence 0 is left-padded, 1 right-padded (and its middle query row masked outright), 2 all padding. Causal is
    bottom-right aligned as with a key cache (so for Tq > Tk the first queries see no key). Left padding under causal,
    the all-padding sequence and the masked row leave rows with every key masked by a finite value."""
    assert B >= 3
    allowed = torch.ones(B, 1, Tq, Tk, dtype=torch.bool)
    if causal:
        allowed &= torch.arange(Tk) <= torch.arange(Tq)[:, None] + (Tk - Tq)
    allowed[0, ..., : Tk // 3] = False  # left padding
    allowed[1, ..., Tk - Tk // 4:] = False  # right padding
    allowed[1, :, Tq // 2] = False  # one query row with no allowed key
    allowed[2] = False  # a sequence of padding only
    return torch.zeros(B, 1, Tq, Tk, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


FINFO_MIN_IMPLEMENTATIONS = {
    "naive": lambda q, k, v, chunk, **kw: naive_attention(q, k, v, **kw),
    "sdpa": lambda q, k, v, chunk, **kw: attention(q, k, v, implementation="sdpa", **kw),
    "auto": lambda q, k, v, chunk, **kw: attention(q, k, v, implementation="auto", chunk_size=chunk, **kw),
    "chunked": lambda q, k, v, chunk, **kw: attention(q, k, v, implementation="chunked", chunk_size=chunk, **kw),
    "chunked_uneven": lambda q, k, v, chunk, **kw: chunked_attention(q, k, v, q_chunk_size=chunk,
                                                                     k_chunk_size=chunk + 2, **kw),
    "chunked_no_recompute": lambda q, k, v, chunk, **kw: chunked_attention(q, k, v, q_chunk_size=chunk,
                                                                           k_chunk_size=chunk, recompute=False, **kw),
}


@pytest.mark.parametrize("implementation", list(FINFO_MIN_IMPLEMENTATIONS))
@pytest.mark.parametrize("causal", [False, True], ids=["padding", "causal+padding"])
def test_finfo_min_additive_mask_gradients_match_fp64_reference(implementation, causal):
    """A row whose keys are all masked by a large finite value is not empty: softmax of equal scores is uniform, and
    the fp64 reference differentiates it as such. The fp32 log-sum-exp m + log(l) at m ≈ −3.4e38 drops log(l), which
    made such rows' dq/dk/dv up to Tk times too large in the chunked kernel and in torch's fused CPU SDPA."""
    fn = FINFO_MIN_IMPLEMENTATIONS[implementation]
    for seed, ((Tq, Tk), chunk) in enumerate(zip(SHAPES + ((6, 23), (23, 6)), (4, 7, 3, 5, 8))):
        q, k, v, d_out, _ = make_inputs(Tq, Tk, "none", seed=500 + 10 * seed + causal, B=3)
        mask = hf_additive_mask(3, Tq, Tk, causal)
        expected = reference(q, k, v, d_out, mask=mask)
        got = run(lambda q, k, v, **kw: fn(q, k, v, chunk, **kw), q, k, v, d_out, mask=mask)
        assert all(torch.isfinite(t).all() for t in got), implementation
        assert_all_close(got, expected, **FP32)
        # the uniform average over keys, with nonzero gradients, as the reference has it
        assert (got[1][2] != 0).any() and (got[3][2] != 0).any()


@pytest.mark.parametrize("mask_dtype", [torch.bfloat16, torch.float32])
def test_finfo_min_additive_mask_gradients_in_bf16(mask_dtype):
    """bf16 inputs with HF's bf16 mask (finfo(bf16).min), or with an fp32 one, whose finfo.min is beyond bf16's range:
    SDPA must not let it overflow to −inf (which would make the row empty instead of uniform)."""
    q, k, v, d_out, _ = make_inputs(29, 29, "none", seed=8, dtype=torch.bfloat16, B=3, D=16)
    mask = hf_additive_mask(3, 29, 29, causal=True, dtype=mask_dtype)
    expected = reference(q, k, v, d_out, mask=mask)
    for implementation, chunk in (("chunked", 6), ("chunked", 29), ("sdpa", 6), ("auto", 6)):
        got = run(attention, q, k, v, d_out, mask=mask, implementation=implementation, chunk_size=chunk)
        assert all(t.dtype == torch.bfloat16 for t in got), implementation
        assert_all_close(got, expected, **BF16)


def test_auto_sends_additive_masks_to_chunked_unless_they_learn():
    """torch's fused SDPA (CPU) loses a fully masked row's log(Tk) at finfo.min like the old chunked kernel did, so
    `auto` never hands it an additive mask; a mask that requires grad goes to SDPA's MATH backend, which is exact."""
    q = k = torch.empty(1, 2, 16, 8, device="meta")
    hf = torch.zeros(1, 1, 16, 16, device="meta")
    assert choose_implementation(q, k, mask=hf) == "chunked"
    assert choose_implementation(q, k, mask=torch.zeros(16, device="meta")) == "chunked"  # even a (Tk,) key mask
    assert choose_implementation(q, k, mask=hf.bool()) == "sdpa"  # bool masks are -inf: SDPA handles them
    assert choose_implementation(q, k, mask=hf.clone().requires_grad_()) == "sdpa"
    # and the learned mask gets the reference's gradient through SDPA, finfo.min rows included
    q, k, v, d_out, _ = make_inputs(9, 11, "none", seed=4, B=3)
    bias = hf_additive_mask(3, 9, 11, causal=True).requires_grad_()
    attention(q, k, v, mask=bias).backward(d_out)
    bias64 = bias.detach().double().requires_grad_()
    naive_attention(*(t.double() for t in (q, k, v)), mask=bias64).backward(d_out.double())
    torch.testing.assert_close(bias.grad.double(), bias64.grad, **FP32)


# --- the entry point -------------------------------------------------------------------------------------------------
def test_unknown_implementation_is_a_config_error_naming_the_choices():
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(ConfigError, match="flash.*auto, sdpa, chunked, naive"):
        attention(q, q, q, implementation="flash")
    with pytest.raises(ConfigError, match="chunk_size"):
        attention(q, q, q, implementation="chunked", chunk_size=0)


def test_auto_uses_sdpa_unless_it_would_need_a_large_mask():
    def qk(T, B=1):  # meta tensors: shapes without memory (meta devices get the CPU limit)
        return torch.empty(B, 8, T, 64, device="meta"), torch.empty(B, 8, T, 64, device="meta")

    def padding(B, T):
        return torch.ones(B, T, dtype=torch.bool, device="meta")

    q, k = qk(16384, B=4)
    assert choose_implementation(q, k) == "sdpa"
    assert choose_implementation(q, k, causal=True) == "sdpa"  # is_causal: no mask built
    assert choose_implementation(q, k, key_padding_mask=padding(4, 16384)) == "sdpa"  # a (B, 1, 1, Tk) view
    assert choose_implementation(q, k, causal=True, key_padding_mask=padding(4, 16384)) == "chunked"  # (B,1,Tq,Tk)
    assert choose_implementation(q, k, mask=torch.empty(16384, 16384, device="meta")) == "chunked"
    # The CPU limit is B·Tq·Tk elements: one 2048² sequence is at it, two are beyond it, as is one 4096² sequence.
    assert AUTO_MAX_SDPA_MASK_ELEMENTS["cpu"] == 2048 * 2048
    assert choose_implementation(*qk(2048), causal=True, key_padding_mask=padding(1, 2048)) == "sdpa"
    assert choose_implementation(*qk(2048, B=2), causal=True, key_padding_mask=padding(2, 2048)) == "chunked"
    assert choose_implementation(*qk(4096), causal=True, key_padding_mask=padding(1, 4096)) == "chunked"
    key_mask = torch.empty(1, 1, 4096, dtype=torch.bool, device="meta")
    assert choose_implementation(*qk(4096), mask=key_mask) == "sdpa"  # (1, 1, 1, Tk)
    learned = torch.empty(4096, 4096, device="meta", requires_grad=True)
    assert choose_implementation(*qk(4096), mask=learned) == "sdpa"  # chunked gives an additive mask no gradient


def test_auto_computes_the_same_attention():
    q, k, v, d_out, kwargs = make_inputs(13, 13, "causal+padding", seed=9)
    assert_all_close(run(attention, q, k, v, d_out, **kwargs), reference(q, k, v, d_out, **kwargs), **FP32)


def test_additive_mask_gradient_only_without_recompute():
    q, k, v, _, _ = make_inputs(5, 6, "none", seed=2)
    bias = torch.randn(5, 6, requires_grad=True)
    with pytest.raises(ValueError, match="recompute=False"):
        chunked_attention(q, k, v, mask=bias)
    chunked_attention(q, k, v, mask=bias, recompute=False, q_chunk_size=2, k_chunk_size=4).sum().backward()
    expected = torch.autograd.grad(naive_attention(q, k, v, mask=bias).sum(), bias)[0]
    torch.testing.assert_close(bias.grad, expected, **FP32)


def test_bad_shapes_are_refused():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="shapes do not fit"):
        attention(q, torch.randn(1, 2, 4, 4), q)
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention(q, q, q, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))


# --- memory: recompute is really applied -----------------------------------------------------------------------------
def test_recompute_keeps_only_output_and_row_statistics_for_backward():
    """What autograd holds between forward and backward: O(T·D) with recompute, O(T²) without (the tutorial version)."""
    T, D = 512, 16

    def saved_bytes(**kwargs) -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        q, k, v = (torch.randn(1, 1, T, D, requires_grad=True) for _ in range(3))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            chunked_attention(q, k, v, q_chunk_size=64, k_chunk_size=64, **kwargs)
        return total

    scores = T * T * 4
    assert saved_bytes(recompute=True) < 6 * T * D * 4  # q, k, v, output, log-sum-exp
    assert saved_bytes(recompute=False) > scores  # every block's probabilities, at least


def training_peak_mib(fn, T: int) -> float:
    q, k, v = (torch.randn(1, 1, T, 64, requires_grad=True) for _ in range(3))
    with PeakTensorBytes() as memory:
        fn(q, k, v).backward(torch.randn(1, 1, T, 64))
    return memory.peak / 2**20


def test_training_peak_memory_of_chunked_with_recompute_is_far_below_naive():
    # One head at T = 4096: a (T, T) fp32 matrix is 64 MiB; q, k, v, the output and their gradients 1 MiB each.
    T, square = 4096, 64
    peaks = {"naive": training_peak_mib(naive_attention, T),
             "chunked": training_peak_mib(lambda q, k, v: chunked_attention(q, k, v, q_chunk_size=256,
                                                                              k_chunk_size=256), T),
             "chunked_no_recompute": training_peak_mib(lambda q, k, v: chunked_attention(
                 q, k, v, q_chunk_size=256, k_chunk_size=256, recompute=False), T)}
    # naive holds scores, probabilities and a (T, T) gradient at once in backward.
    assert peaks["naive"] >= 3 * square, peaks
    # Chunking alone saves no training memory: autograd keeps every block's probabilities, (T, T) in all.
    assert peaks["chunked_no_recompute"] >= square, peaks
    # Recompute: O(T·chunk): the 1 MiB tensors and one row of (256, T) blocks (4 MiB) recomputed in backward.
    assert peaks["chunked"] < 16, peaks
