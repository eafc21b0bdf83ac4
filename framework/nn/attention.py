"""Exact attention in bounded memory: query and key chunks with an online softmax, backward by recomputation.

softmax(q kᵀ / √d) v is computed one (query chunk, key chunk) block at a time, keeping a running row maximum and
row sum (Milakov & Gimelshein, https://arxiv.org/abs/1805.02867; Rabe & Staats, https://arxiv.org/abs/2112.05682).
Under plain autograd that alone saves memory only in inference: every block's probabilities are kept for backward, so
training holds as much as naive attention. `chunked_attention(..., recompute=True)` is therefore a custom autograd
function in the style of FlashAttention (Dao et al., https://arxiv.org/abs/2205.14135, FlashAttention-2
https://arxiv.org/abs/2307.08691): forward keeps only the output and each row's maximum and log-sum; backward
recomputes each block's probabilities from them. Peak training memory then grows with chunk size × sequence length,
not length².

`attention` is the one entry point models call; it chooses between torch's fused `scaled_dot_product_attention`
("sdpa"), `chunked_attention` ("chunked") and the plain reference `naive_attention` ("naive") the tests compare against.

Conventions shared by all three (and by SDPA, so they agree):
    * q: (B, H, Tq, D), k: (B, H, Tk, D), v: (B, H, Tk, Dv); the result is (B, H, Tq, Dv) in q's dtype; scale 1/√D.
    * causal: query i attends keys j ≤ i, aligned top-left like SDPA's `is_causal` (also when Tq ≠ Tk: query 0 sees
      key 0 only). For a query block that ends a longer cached key sequence (bottom-right alignment), pass a `mask`.
    * key_padding_mask: (B, Tk) bool, True = a real token (attend), False = padding.
    * mask: bool (True = attend) or additive float, broadcastable to (B, H, Tq, Tk). It gets no gradient in "chunked".
    * A query row whose keys are all masked gives zeros and zero gradients (FlashAttention's choice; SDPA in torch
      ≥ 2.5 gives zeros too), never NaN.
    * A row whose keys are all masked by a large *finite* additive value (Hugging Face's torch.finfo(dtype).min) is
      not empty: its scores are all equal, so it is the uniform average of v, with the matching nonzero gradients,
      exactly as `naive_attention` in fp64 gives. Fused kernels that save one log-sum-exp m + log l lose log l at
      m ≈ −3.4e38 (torch's CPU SDPA does; so did "chunked"), so "chunked" keeps m and log l apart and `sdpa_attention`
      runs additive masks under SDPA's MATH backend; `attention(implementation="auto")` sends them to "chunked".
    * Softmax statistics are fp32 even for bf16/fp16 inputs; the scores q kᵀ are computed in the input dtype (as the
      fused kernels' matmuls do) and the probabilities are cast back to it for the product with v.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel

from framework.errors import ConfigError

IMPLEMENTATIONS = ("auto", "sdpa", "chunked", "naive")

AUTO_MAX_SDPA_MASK_ELEMENTS = {"cpu": 2**22, "cuda": 2**28}
"""Per device type: `auto` hands a case to SDPA unless SDPA would need a (…, Tq, Tk) mask with more elements than this
(or the mask is additive: see `choose_implementation`).

Causal + padding is the common case: SDPA takes `is_causal` or a mask, not both, so the two become one (B, 1, Tq, Tk)
mask, which the kernel also converts to the query's dtype, and with which it can no longer skip the blocks above the
diagonal. Chunked attention reads the (B, Tk) padding mask and the causal rule block by block and builds no such mask.
CPU, measured (benchmarks/attention.py --mask causal+padding, 8 heads × 64, fp32, 2 threads, torch 2.14): at n = 2048
SDPA and chunked take the same time (0.16 / 0.18 s, 72 / 61 MB); at 4096 chunked is faster and smaller (0.55 vs
0.64 s, 93 vs 195 MB), at 8192 too (2.4 vs 2.8 s, 150 vs 498 MB). Hence 2048² = 2²² elements. CUDA: not measured
(no GPU here); the fused kernels are far ahead of a Python loop of blocks there, so the limit only guards memory:
2²⁸ elements, a 768 MiB bool + bf16 mask. Run the benchmark with --device cuda --dtype bf16 --mask causal+padding
to place it. Other devices use the CPU limit."""


# --- the reference ---------------------------------------------------------------------------------------------------
def naive_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Tensor | None = None,
                    mask: Tensor | None = None) -> Tensor:
    """Attention as written in the paper: the whole (Tq, Tk) score matrix at once. The reference the others are tested
    against; training holds several (B, H, Tq, Tk) fp32 tensors for backward.

    Args:
        q, k, v: (B, H, Tq, D), (B, H, Tk, D), (B, H, Tk, Dv).
        causal: query i attends keys j ≤ i (top-left aligned).
        key_padding_mask: (B, Tk) bool, True = attend.
        mask: bool (True = attend) or additive float, broadcastable to (B, H, Tq, Tk).

    Returns:
        (B, H, Tq, Dv) in q's dtype; zeros for a row whose keys are all masked.
    """
    _check_inputs(q, k, v, key_padding_mask)
    scores = (q @ k.transpose(-2, -1)).to(_stats_dtype(q)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, Tq, Tk)
    allowed = _full_bool_mask(q, k, causal, key_padding_mask, mask)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None and mask.dtype != torch.bool:
        scores = scores + mask.to(scores.dtype)
    if key_padding_mask is None and mask is None:  # causal alone (top-left) always leaves key 0 to every row
        probs = torch.softmax(scores, dim=-1)
    else:
        # A row with every key masked: softmax of all -inf is NaN (and so would be its gradient). Give it zero
        # scores, then zero probabilities: the output row is 0 and no gradient flows through it.
        empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
        probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return probs.to(v.dtype) @ v


# --- chunked ---------------------------------------------------------------------------------------------------------
def chunked_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                      key_padding_mask: Tensor | None = None, mask: Tensor | None = None, q_chunk_size: int = 512,
                      k_chunk_size: int = 512, recompute: bool = True) -> Tensor:
    """Exact attention over (query chunk, key chunk) blocks with an online softmax; never a whole (Tq, Tk) matrix.

    Args:
        q, k, v: (B, H, Tq, D), (B, H, Tk, D), (B, H, Tk, Dv); lengths need not be multiples of the chunk sizes.
        causal: query i attends keys j ≤ i (top-left aligned); blocks wholly above the diagonal are skipped.
        key_padding_mask: (B, Tk) bool, True = attend.
        mask: bool (True = attend) or additive float, broadcastable to (B, H, Tq, Tk); sliced per block, never
            expanded. No gradient flows to it with `recompute=True` (one that requires grad is refused).
        q_chunk_size, k_chunk_size: rows and columns of one block. Memory of one block: B·H·q_chunk·k_chunk fp32.
        recompute: True (use this): a custom autograd function keeps only the output and per-row max and log-sum, and
            backward recomputes each block, so training peak memory is O(T·chunk). False: the same loop under plain
            autograd (the usual tutorial version), which saves memory only in inference — autograd keeps every
            block's probabilities, about as much as naive attention (0.7-1.5× its peak in benchmarks/attention.py).
            Kept as the benchmark's contender.

    Returns:
        (B, H, Tq, Dv) in q's dtype; zeros for a row whose keys are all masked.
    """
    _check_inputs(q, k, v, key_padding_mask)
    if q_chunk_size < 1 or k_chunk_size < 1:
        raise ValueError(f"chunked_attention: chunk sizes must be ≥ 1, got q_chunk_size={q_chunk_size}, "
                         f"k_chunk_size={k_chunk_size}.")
    mask = _as_4d(mask)
    padding = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # (B, 1, 1, Tk), True = drop
    if not recompute:
        return _chunked_autograd(q, k, v, causal, padding, mask, q_chunk_size, k_chunk_size)
    if mask is not None and mask.requires_grad:
        raise ValueError("chunked_attention(recompute=True) gives no gradient to `mask`; use recompute=False or "
                         "implementation='naive'/'sdpa' to learn an additive mask.")
    return _ChunkedAttention.apply(q, k, v, causal, padding, mask, q_chunk_size, k_chunk_size)


class _ChunkedAttention(torch.autograd.Function):
    """Forward saves q, k, v, the output and each row's softmax statistics; backward recomputes each block's
    probabilities (FlashAttention-2's backward, Algorithm 2, one block of scores at a time).

    The statistics are the row maximum m and log l, l = Σ exp(s − m), kept apart rather than as one log-sum-exp
    m + log l: with an additive mask at torch.finfo(dtype).min (Hugging Face's), a row with every key masked has
    m ≈ −3.4e38, where m + log l rounds to m in fp32, and backward's exp(s − lse) would be 1 instead of 1/Tk. So with an
    additive mask backward subtracts m, then log l (one more elementwise pass over the block); without one, scores are
    bounded by |q||k|/√D, and the single lse = m + log l (formed once per call) is as exact and one pass cheaper.

    Written for CPU speed, where an elementwise pass over a block costs a quarter to a third of the block's GEMM:
    q, k, v are (B·H, T, D) so every block product is one batched GEMM; the two block-sized tensors (scores, dS) are
    written into buffers allocated once per call (a fresh multi-MB tensor per block costs its page faults every time,
    about doubling the GEMM's time); accumulations happen inside the GEMM (`_accumulate_`); the rest is in place.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal, padding, mask, q_chunk, k_chunk):
        B, H, Tq, D = q.shape
        Tk, Dv = k.shape[2], v.shape[-1]
        # (B·H, T, D), contiguous: one copy here (if any), not one per block inside the products.
        q3, k3, v3 = (t.reshape(B * H, t.shape[2], t.shape[3]).contiguous() for t in (q, k, v))
        scale = 1.0 / math.sqrt(D)
        out = q3.new_empty((B * H, Tq, Dv))
        row_max, log_sum = (q3.new_empty((B * H, Tq, 1), dtype=_stats_dtype(q)) for _ in range(2))
        scores = _block_buffer(q3, q_chunk, k_chunk, Tk)
        for i0 in range(0, Tq, q_chunk):
            i1 = min(i0 + q_chunk, Tq)
            out[:, i0:i1], row_max[:, i0:i1], log_sum[:, i0:i1] = _forward_rows(
                q3[:, i0:i1] * scale, k3, v3, B, i0, causal, padding, mask, k_chunk, scores)
        ctx.save_for_backward(q3, k3, v3, out, row_max, log_sum)
        ctx.shape, ctx.causal, ctx.padding, ctx.mask = (B, H, Tq, Tk, D, Dv), causal, padding, mask
        ctx.q_chunk, ctx.k_chunk = q_chunk, k_chunk
        return out.view(B, H, Tq, Dv)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        q, k, v, out, row_max, log_sum = ctx.saved_tensors  # (B·H, T, ·)
        B, H, Tq, Tk, D, Dv = ctx.shape
        causal, padding, mask, k_chunk = ctx.causal, ctx.padding, ctx.mask, ctx.k_chunk
        scale = 1.0 / math.sqrt(D)
        stats = _stats_dtype(q)
        d_out = d_out.reshape(B * H, Tq, Dv).contiguous()
        additive = mask is not None and mask.dtype != torch.bool
        # Without an additive mask one subtraction of lse = m + log l per block (see the class docstring). An empty row
        # has m = 0, log l = +inf: exp(s − ·) is 0 there either way.
        shift, shift2 = (row_max, log_sum) if additive else (row_max + log_sum, None)
        # D_i = Σ_j P_ij dP_ij = rowsum(dO ∘ O): the softmax backward's row term, without any P.
        delta = (d_out.to(stats) * out.to(stats)).sum(-1, keepdim=True)  # (B·H, Tq, 1)
        # One contiguous accumulator per chunk, joined at the end (see `_accumulate_`).
        k_starts = range(0, Tk, k_chunk)
        dk = [k.new_zeros((B * H, min(k_chunk, Tk - j0), D), dtype=stats) for j0 in k_starts]
        dv = [v.new_zeros((B * H, min(k_chunk, Tk - j0), Dv), dtype=stats) for j0 in k_starts]
        dq = []
        p_buffer, ds_buffer = (_block_buffer(q, ctx.q_chunk, k_chunk, Tk) for _ in range(2))
        for i0 in range(0, Tq, ctx.q_chunk):
            i1 = min(i0 + ctx.q_chunk, Tq)
            qi, doi = q[:, i0:i1] * scale, d_out[:, i0:i1]
            shift_i, delta_i = shift[:, i0:i1], delta[:, i0:i1]
            shift2_i = None if shift2 is None else shift2[:, i0:i1]
            dqi = q.new_zeros((B * H, i1 - i0, D), dtype=stats)
            for j, j0 in enumerate(range(0, _keys_needed(causal, i1, Tk), k_chunk)):
                j1 = min(j0 + k_chunk, Tk)
                kj, vj = k[:, j0:j1], v[:, j0:j1]
                # (baddbmm could add −lse inside the GEMM, but expanding a (rows, 1) column over the block first is
                # a slow, unvectorised copy on CPU: a separate subtraction is 4× faster.) Masks first, as in forward:
                # an additive mask must be added before m is taken away.
                p = _mask_block_(_product(qi, kj.transpose(1, 2), p_buffer), B, i0, j0, causal, padding, mask)
                p = p.sub_(shift_i) if shift2_i is None else p.sub_(shift_i).sub_(shift2_i)
                p = p.exp_()  # the probabilities forward had
                _accumulate_(dv[j], p.to(q.dtype).transpose(1, 2), doi)
                ds = _product(doi, vj.transpose(1, 2), ds_buffer).sub_(delta_i).mul_(p)  # dS = P ∘ (dP − D)
                ds = ds.to(q.dtype)  # (a no-op for fp32; bf16 GEMMs take bf16 operands, as in FlashAttention)
                _accumulate_(dqi, ds, kj)
                _accumulate_(dk[j], ds.transpose(1, 2), qi)  # qi carries the scale: d(scale·q kᵀ)/dk
            dq.append(dqi.mul_(scale))
        grads = (torch.cat(g, dim=1).to(t.dtype).view(B, H, t.shape[1], t.shape[2])
                 for g, t in ((dq, q), (dk, k), (dv, v)))
        return (*grads, None, None, None, None, None)


def _forward_rows(qi: Tensor, k: Tensor, v: Tensor, B: int, i0: int, causal: bool, padding: Tensor | None,
                  mask: Tensor | None, k_chunk: int, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One query chunk (B·H, rows, D), already scaled, against all keys (B·H, Tk, ·), in place (autograd is off) and
    in the flat block buffer `scores`.
    Returns the output rows in v's dtype, and their maximum score m and log l = log Σ exp(s − m), (B·H, rows, 1) each
    in the statistics dtype, kept apart (see `_ChunkedAttention`). A row with no key has m = 0 and log l = +inf, so
    backward's exp(s − m − log l) is 0 there."""
    BH, rows, _ = qi.shape
    Tk = k.shape[1]
    stats = _stats_dtype(qi)
    row_max = qi.new_full((BH, rows, 1), float("-inf"), dtype=stats)
    row_sum = qi.new_zeros((BH, rows, 1), dtype=stats)
    acc = qi.new_zeros((BH, rows, v.shape[-1]), dtype=stats)
    for j0 in range(0, _keys_needed(causal, i0 + rows, Tk), k_chunk):
        j1 = min(j0 + k_chunk, Tk)
        s = _mask_block_(_product(qi, k[:, j0:j1].transpose(1, 2), scores), B, i0, j0, causal, padding, mask)
        new_max = torch.maximum(row_max, s.amax(-1, keepdim=True))
        # Rows with no key so far have max −inf; subtract 0 instead, so exp(−inf − 0) = 0 rather than NaN.
        shift = new_max.masked_fill(torch.isneginf(new_max), 0.0)
        p = s.sub_(shift).exp_()
        rescale = (row_max - shift).exp_()  # earlier blocks were normalised to the old maximum
        row_sum.mul_(rescale).add_(p.sum(-1, keepdim=True))
        _accumulate_(acc.mul_(rescale), p.to(v.dtype), v[:, j0:j1])
        row_max = new_max
    empty = row_sum == 0
    out = acc.div_(row_sum.masked_fill(empty, 1.0))  # an empty row's acc is 0: its output stays 0
    log_sum = row_sum.log_().masked_fill_(empty, float("inf"))  # an empty row: log 0 = −inf → +inf
    return out.to(v.dtype), row_max.masked_fill_(empty, 0.0), log_sum


def _chunked_autograd(q: Tensor, k: Tensor, v: Tensor, causal: bool, padding: Tensor | None, mask: Tensor | None,
                      q_chunk: int, k_chunk: int) -> Tensor:
    """The same online softmax with out-of-place ops, so plain autograd can differentiate it — and keeps every block's
    probabilities for backward. The recompute=False contender; its gradients to an additive `mask` are exact."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    Tq, Tk = q.shape[2], k.shape[2]
    outputs = []
    for i0 in range(0, Tq, q_chunk):
        i1 = min(i0 + q_chunk, Tq)
        qi = q[:, :, i0:i1] * scale
        row_max = row_sum = acc = None
        for j0 in range(0, _keys_needed(causal, i1, Tk), k_chunk):
            j1 = min(j0 + k_chunk, Tk)
            s = _block_scores(qi, k[:, :, j0:j1], i0, j0, causal, padding, mask)
            block_max = s.detach().amax(-1, keepdim=True)  # any shift gives the same softmax: no gradient needed
            new_max = block_max if row_max is None else torch.maximum(row_max, block_max)
            shift = new_max.masked_fill(torch.isneginf(new_max), 0.0)
            p = (s - shift).exp()
            pv = p.to(v.dtype) @ v[:, :, j0:j1]
            if row_max is None:
                row_sum, acc = p.sum(-1, keepdim=True), pv.to(p.dtype)
            else:
                rescale = (row_max - shift).exp()
                row_sum, acc = row_sum * rescale + p.sum(-1, keepdim=True), acc * rescale + pv
            row_max = new_max
        outputs.append((acc / row_sum.masked_fill(row_sum == 0, 1.0)).to(v.dtype))
    return torch.cat(outputs, dim=2)


def _keys_needed(causal: bool, row_end: int, Tk: int) -> int:
    """How many keys rows [.., row_end) can see: under the causal rule none beyond the last row's index."""
    return min(row_end, Tk) if causal else Tk


def _block_scores(qi: Tensor, kj: Tensor, i0: int, j0: int, causal: bool, padding: Tensor | None,
                  mask: Tensor | None) -> Tensor:
    """Masked scores of one block for autograd (out of place): (B, H, rows, cols) = qi kjᵀ, −inf where not allowed."""
    return _apply_masks((qi @ kj.transpose(-2, -1)).to(_stats_dtype(qi)), i0, j0, causal, padding, mask, inplace=False)


def _mask_block_(s: Tensor, B: int, i0: int, j0: int, causal: bool, padding: Tensor | None,
                 mask: Tensor | None) -> Tensor:
    """Mask in place a (B·H, rows, cols) block of scores whose rows start at query i0 and columns at key j0."""
    _apply_masks(s.view(B, -1, *s.shape[1:]), i0, j0, causal, padding, mask, inplace=True)
    return s


def _apply_masks(s: Tensor, i0: int, j0: int, causal: bool, padding: Tensor | None, mask: Tensor | None,
                 inplace: bool) -> Tensor:
    """s: (B, H, rows, cols) scores; −inf where a key is not allowed, plus an additive mask's slice."""
    rows, cols = s.shape[-2:]
    fill = torch.Tensor.masked_fill_ if inplace else torch.Tensor.masked_fill
    if causal and j0 + cols - 1 > i0:  # the block reaches above the diagonal (key index > query index somewhere)
        above = torch.arange(j0, j0 + cols, device=s.device) > torch.arange(i0, i0 + rows, device=s.device)[:, None]
        s = fill(s, above, float("-inf"))
    if padding is not None:
        s = fill(s, padding[..., j0:j0 + cols], float("-inf"))
    if mask is not None:
        m = mask[..., i0:i0 + rows, :] if mask.shape[-2] > 1 else mask  # a broadcast dim (size 1) is not sliced
        m = m[..., j0:j0 + cols] if m.shape[-1] > 1 else m
        if m.dtype == torch.bool:
            s = fill(s, ~m, float("-inf"))
        else:
            s = s.add_(m) if inplace else s + m
    return s


# --- the entry point -------------------------------------------------------------------------------------------------
def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Tensor | None = None,
              mask: Tensor | None = None, implementation: Literal["auto", "sdpa", "chunked", "naive"] = "auto",
              chunk_size: int = 512) -> Tensor:
    """softmax(q kᵀ / √D + masks) v by the chosen implementation; the one call models make.

    Args:
        q, k, v: (B, H, Tq, D), (B, H, Tk, D), (B, H, Tk, Dv).
        causal: query i attends keys j ≤ i (top-left aligned, as SDPA's `is_causal`).
        key_padding_mask: (B, Tk) bool, True = a real token, False = padding.
        mask: bool (True = attend) or additive float, broadcastable to (B, H, Tq, Tk).
        implementation: "sdpa" (torch's fused kernels: fastest, O(T) memory unless a (Tq, Tk) mask is needed; an
            additive mask runs under SDPA's O(T²) MATH backend, see `sdpa_attention`), "chunked" (`chunked_attention`
            with recompute: O(T·chunk_size) memory whatever the masks), "naive" (the reference: O(T²) memory), or
            "auto": "sdpa", except "chunked" where SDPA would need a mask of more than `AUTO_MAX_SDPA_MASK_ELEMENTS`
            elements or is given an additive mask that does not require grad (see `choose_implementation`). Ask for
            "chunked" to bound memory whatever the masks.
        chunk_size: the query and key chunk size of "chunked".

    Returns:
        (B, H, Tq, Dv) in q's dtype.

    Raises:
        ConfigError: an unknown `implementation`, or `chunk_size` < 1.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"attention: unknown implementation {implementation!r}; choose one of "
                          f"{', '.join(IMPLEMENTATIONS)}.")
    if chunk_size < 1:
        raise ConfigError(f"attention: chunk_size must be ≥ 1, got {chunk_size}.")
    if implementation == "auto":
        implementation = choose_implementation(q, k, causal=causal, key_padding_mask=key_padding_mask, mask=mask)
    if implementation == "sdpa":
        return sdpa_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, mask=mask)
    if implementation == "chunked":
        return chunked_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, mask=mask,
                                 q_chunk_size=chunk_size, k_chunk_size=chunk_size)
    return naive_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, mask=mask)


def choose_implementation(q: Tensor, k: Tensor, *, causal: bool = False, key_padding_mask: Tensor | None = None,
                          mask: Tensor | None = None) -> Literal["sdpa", "chunked"]:
    """What `attention(implementation="auto")` runs: "sdpa" unless the mask SDPA would receive (see `sdpa_attention`)
    has more elements than `AUTO_MAX_SDPA_MASK_ELEMENTS` allows on q's device type, then "chunked". Shapes only: no
    look at the masks' values, no device synchronisation.

    No mask, causal alone (`is_causal`) and padding alone (a (B, 1, 1, Tk) view) reach SDPA without any (Tq, Tk)
    tensor, so they always go to SDPA. Causal + padding, or an explicit (…, Tq, Tk) bool mask, do not.

    An additive (float) mask never goes to SDPA's fused kernels: with Hugging Face's masks (torch.finfo(dtype).min where
    masked) a row with every key masked has a row maximum ≈ −3.4e38, at which the kernels' saved log-sum-exp loses
    log(Tk), and that row's dq/dk/dv come out up to Tk times too large (seen in torch's CPU kernel; the forward is
    right). So an additive mask goes to "chunked", which keeps the maximum and the sum apart, unless it requires grad:
    then to "sdpa", which runs additive masks under SDPA's MATH backend (softmax differentiated explicitly: exact, and
    it gives the mask its gradient, which "chunked" does not).
    """
    if mask is not None and mask.dtype != torch.bool:
        return "sdpa" if mask.requires_grad else "chunked"
    limit = AUTO_MAX_SDPA_MASK_ELEMENTS.get(q.device.type, AUTO_MAX_SDPA_MASK_ELEMENTS["cpu"])
    return "chunked" if _sdpa_mask_elements(q, k, causal, key_padding_mask, mask) > limit else "sdpa"


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Tensor | None = None,
                   mask: Tensor | None = None) -> Tensor:
    """torch's `F.scaled_dot_product_attention` under this module's conventions.

    SDPA takes either `is_causal` or one `attn_mask`, so causal + any mask becomes a single boolean (or additive) mask
    of shape (B | 1, H | 1, Tq, Tk); padding alone stays a (B, 1, 1, Tk) view. Fully masked rows: zeros in torch ≥ 2.5.

    An additive (float) mask runs under the MATH backend only (`sdpa_kernel(SDPBackend.MATH)`): the fused kernels
    save a log-sum-exp m + log l that rounds to m for a row masked everywhere by torch.finfo(dtype).min (Hugging
    Face's masks), so their gradients for such rows are up to Tk times too large; MATH forms the softmax and
    differentiates it explicitly, as `naive_attention` does (O(Tq·Tk) memory: `attention(implementation="auto")` sends
    such masks to "chunked" instead unless they require grad). A finite mask value below q's dtype's range (fp32's
    finfo.min with bf16 q) becomes that dtype's finfo.min, not −inf, so the row stays a finite, not an empty, row.
    """
    _check_inputs(q, k, v, key_padding_mask)
    if key_padding_mask is None and mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    allowed = _full_bool_mask(q, k, causal, key_padding_mask, mask)
    if mask is None or mask.dtype == torch.bool:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    attn_mask = _additive_mask_as(mask, q.dtype)
    if allowed is not None:
        attn_mask = attn_mask.masked_fill(~allowed, float("-inf"))
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


# --- helpers ---------------------------------------------------------------------------------------------------------
def _block_buffer(q: Tensor, q_chunk: int, k_chunk: int, Tk: int) -> Tensor:
    """A flat buffer for one (B·H, q_chunk, k_chunk) block in the statistics dtype, reused for every block."""
    return q.new_empty(q.shape[0] * min(q_chunk, q.shape[1]) * min(k_chunk, Tk), dtype=_stats_dtype(q))


def _product(a: Tensor, b: Tensor, buffer: Tensor) -> Tensor:
    """a @ b (batched) in the statistics dtype, written into the front of `buffer` (a contiguous view of it, as
    partial blocks at the ends are smaller): no allocation for fp32; a bf16 product is formed, then copied up."""
    out = buffer[: a.shape[0] * a.shape[1] * b.shape[2]].view(a.shape[0], a.shape[1], b.shape[2])
    return torch.bmm(a, b, out=out) if a.dtype == buffer.dtype else out.copy_(a @ b)


def _accumulate_(acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """acc += a @ b (batched). Inside the GEMM (`baddbmm_`, no temporary) when the dtypes agree, as for fp32; a bf16
    product is formed in bf16 and added to the fp32 accumulator. `acc` must be contiguous: in-place batched GEMMs into
    a slice of a larger tensor fall back to one GEMM per batch entry on CPU."""
    return acc.baddbmm_(a, b) if a.dtype == acc.dtype else acc.add_(a @ b)


def _stats_dtype(x: Tensor) -> torch.dtype:
    """The dtype of scores and softmax statistics: fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 (gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be (B, H, T, D), got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}.")
    if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"attention: shapes do not fit: q {tuple(q.shape)} (B, H, Tq, D), k {tuple(k.shape)} "
                         f"(B, H, Tk, D), v {tuple(v.shape)} (B, H, Tk, Dv).")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2])):
        raise ValueError(f"attention: key_padding_mask must be bool (B, Tk) = {(k.shape[0], k.shape[2])}, got "
                         f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}.")


def _additive_mask_as(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """An additive mask in `dtype`, finite values saturating at its range instead of overflowing to ±inf (fp32's
    finfo.min is −inf in bf16: a row masked with it would turn from uniform into empty). Differentiable."""
    converted = mask.to(dtype)
    if not mask.is_floating_point() or torch.finfo(dtype).max >= torch.finfo(mask.dtype).max:
        return converted
    return torch.where(mask.isfinite(), mask.clamp(torch.finfo(dtype).min, torch.finfo(dtype).max).to(dtype),
                       converted)


def _as_4d(mask: Tensor | None) -> Tensor | None:
    """A mask broadcastable to (B, H, Tq, Tk) as a 4-d view (leading 1s), so blocks can slice its last two dims."""
    if mask is None or mask.dim() == 4:
        return mask
    if mask.dim() > 4:
        raise ValueError(f"attention: mask must broadcast to (B, H, Tq, Tk), got shape {tuple(mask.shape)}.")
    return mask[(None,) * (4 - mask.dim())]


def _full_bool_mask(q: Tensor, k: Tensor, causal: bool, key_padding_mask: Tensor | None,
                    mask: Tensor | None) -> Tensor | None:
    """causal, padding and a boolean `mask` merged into one broadcastable bool tensor (True = attend), or None.
    Shapes stay as small as broadcasting allows: padding alone is (B, 1, 1, Tk)."""
    allowed = None
    if causal:
        allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if key_padding_mask is not None:
        padding = key_padding_mask[:, None, None, :]
        allowed = padding if allowed is None else allowed & padding
    if mask is not None and mask.dtype == torch.bool:
        allowed = mask if allowed is None else allowed & mask
    return allowed


def _sdpa_mask_elements(q: Tensor, k: Tensor, causal: bool, key_padding_mask: Tensor | None,
                        mask: Tensor | None) -> int:
    """The element count of the mask `sdpa_attention` would build (0 when it passes none), from shapes alone."""
    if key_padding_mask is None and mask is None:
        return 0
    shape = [1, 1, q.shape[2] if causal else 1, k.shape[2] if causal else 1]
    if key_padding_mask is not None:
        shape = [max(shape[0], k.shape[0]), shape[1], shape[2], k.shape[2]]
    if mask is not None:
        shape = list(torch.broadcast_shapes(tuple(shape), _as_4d(mask).shape))
    return math.prod(shape)
