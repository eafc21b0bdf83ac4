"""Drop path: drop a residual branch for whole samples (Huang et al., https://arxiv.org/abs/1603.09382).

The layer a model author puts on each residual branch, `x + self.drop_path(branch(x))`. Its drop probability `p`
starts at 0 (the identity) and is set by the `stochastic_depth` technique (framework/techniques/stochastic_depth.py)
in its `epoch_start` hook.
"""

from __future__ import annotations

import torch
from torch import nn


def drop_path(x: torch.Tensor, p: float, training: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero each sample of `x` (dim 0) independently with probability `p`; scale the others by 1 / (1 - p).

    One coin per sample, not one per batch, so every batch still trains every block on some samples. Scaling the
    survivors keeps the expected output equal to `x`, so evaluation (the identity) sees the same scale.

    Args:
        x: (B, ...) a residual branch's output.
        p: the probability of dropping a sample, in [0, 1].
        training: when False (evaluation) return `x` unchanged.
        generator: the random generator for the coins (on `x`'s device); default: torch's global one.

    Returns:
        A tensor shaped like `x`: `x` itself when `p == 0` or not training, zeros when `p == 1`.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop_path: p must be within [0, 1], got {p}.")
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)  # (B, 1, 1, ...)
    mask.bernoulli_(keep, generator=generator)
    if keep > 0.0:  # p == 1 leaves an all-zero mask: nothing to scale, no division by zero
        mask.div_(keep)
    # Multiplying (rather than returning fresh zeros) keeps the branch in the autograd graph even when every sample
    # is dropped, so DDP still sees a gradient (of zeros) for every parameter.
    return x * mask


class DropPath(nn.Module):
    """`drop_path` as a layer: per-sample drop of a residual branch in training, the identity in evaluation.

    Args:
        p: the drop probability, a plain float; the `stochastic_depth` technique sets it on every `DropPath` of the
            model. 0 (the default) is the identity, so a model with these layers behaves as without them.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
