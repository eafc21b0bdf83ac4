"""Gradient (activation) checkpointing as a model-level kernel: keep only the inputs of chosen blocks in the forward
pass and recompute what happens inside them during backward (Chen et al., https://arxiv.org/abs/1604.06174).

Models use it directly (`GPT.set_grad_checkpointing`); the `gradient_checkpointing` technique
(framework/techniques/grad_checkpointing.py) applies it from a config. It lives here, with the other building blocks
of models, because a model must not import a plug-in.

Policies:

* ``full``: every matching block is recomputed; only block inputs are stored. Costs about one more forward
  (~+30% of a training step).
* ``every_k``: blocks 0, k, 2k, … (in module order) are recomputed; the others keep their activations. Memory and
  time land between no checkpointing and ``full`` (k=2: about half of the saving, half of the cost).
* ``selective``: every matching block, through torch's selective activation checkpointing: the outputs of
  matmul-like ops (``mm``, ``addmm``, ``bmm``, attention kernels, convolutions) are kept and only the cheap ops
  around them (norms, activations, dropout, residual adds) are recomputed (Korthikanti et al.,
  https://arxiv.org/abs/2205.05198). Most of the time back, part of the memory.

Wrapping sets an instance attribute ``forward`` on each chosen module (the class's ``forward`` runs inside
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``), so parameter names and ``state_dict`` keys do not
change: checkpoints and exported weights load into a plain model. Keyword arguments reach the recomputation as they
are (transformers' decoder layers get the attention mask, position embeddings and cache as keywords); a layer that
writes a KV cache would write it again when recomputed, so callers turn the cache off for training (the technique
sets `config.use_cache = False`). Non-reentrant checkpointing recomputes inside the one backward pass, so DDP's
gradient hooks fire once per parameter (no "marked ready twice", which the reentrant variant's nested backward
causes); launched for real under DDP and DeepSpeed ZeRO 2 and 3, with the same losses and weights as without it.
Random ops (dropout, drop path) draw the same numbers in the recomputation (torch restores the RNG state), and
BatchNorm running statistics move once per step, not twice (the recomputation updates copies).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from framework.errors import ConfigError

POLICIES = ("full", "every_k", "selective")

#: Ops whose outputs the `selective` policy keeps: the matmuls, attention kernels and convolutions, which hold
#: nearly all of a block's FLOPs. (`aten.linear` is composite and reaches the policy as `mm` / `addmm`; names a
#: torch build lacks are skipped.)
SAVED_OPS = (
    "mm", "addmm", "bmm", "baddbmm", "linear", "convolution", "_convolution",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_flash_attention_forward", "_efficient_attention_forward",
)


@functools.cache
def _saved_op_packets() -> frozenset:
    return frozenset(getattr(torch.ops.aten, name) for name in SAVED_OPS if hasattr(torch.ops.aten, name))


def selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """The `selective` policy: keep the outputs of matmul-like ops, recompute everything else.

    Only ops that run with grad enabled are kept. Inside a custom `torch.autograd.Function`'s forward (grad off there)
    in-place ops do not bump version counters, so torch cannot notice when such code overwrites a kept matmul output
    (framework.nn.attention's chunked attention turns its score blocks into probabilities in place): the
    recomputation would read the overwritten values and give wrong gradients. Recomputing those ops is always exact.
    """
    if torch.is_grad_enabled() and getattr(op, "overloadpacket", op) in _saved_op_packets():
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(selective_policy)


# Route the tensors the selective policy keeps through saved-tensor hooks (torch.autograd.graph.save_on_cpu, memory
# accounting) like every other saved tensor: the future default of torch, opt-in in the versions that have the flag.
_SELECTIVE_OPTIONS: dict[str, Any] = {"context_fn": _selective_contexts}
if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters:
    _SELECTIVE_OPTIONS["respect_saved_tensors_hooks"] = True


def _checkpointed_forward(module: nn.Module, original: Any, policy: str, *args: Any, **kwargs: Any) -> Any:
    """A wrapped module's forward: recompute `original` in backward while training with grad; plain otherwise."""
    if not (module.training and torch.is_grad_enabled()):
        return original(*args, **kwargs)  # evaluation / no_grad: nothing is stored for backward anyway
    norms = [m for m in module.modules() if isinstance(m, _NormBase) and m.training and m.track_running_stats]
    function = _recomputing_on_scratch_statistics(original, norms) if norms else original
    options = _SELECTIVE_OPTIONS if policy == "selective" else {}
    return checkpoint(function, *args, use_reentrant=False, **options, **kwargs)


_RUNNING_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _recomputing_on_scratch_statistics(original: Any, norms: list[_NormBase]) -> Any:
    """`original`, whose recomputations update copies of the BatchNorm running statistics instead of the real ones.

    A recomputation runs the BatchNorms in training mode again: the same batch statistics, so the same outputs, but
    it would also update `running_mean` / `running_var` / `num_batches_tracked` a second time per step. The copies
    are made here, outside the checkpointed region: under the selective policy a recomputation must run exactly the
    ops of the forward pass, so it cannot copy or restore tensors itself (swapping attributes is no tensor op).
    """
    scratch = [[None if (b := getattr(m, n)) is None else b.clone() for n in _RUNNING_STATISTICS] for m in norms]
    calls = 0

    def run(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:  # the forward pass itself
            return original(*args, **kwargs)
        real = [[getattr(m, n) for n in _RUNNING_STATISTICS] for m in norms]
        _set_statistics(norms, scratch)
        try:
            return original(*args, **kwargs)
        finally:  # also when torch stops the recomputation early, once it has what backward needs
            _set_statistics(norms, real)

    return run


def _set_statistics(norms: list[_NormBase], values: list[list[torch.Tensor | None]]) -> None:
    for module, tensors in zip(norms, values):
        for name, tensor in zip(_RUNNING_STATISTICS, tensors):
            setattr(module, name, tensor)  # re-registers the buffer (state_dict unchanged)


def is_checkpointed(module: nn.Module) -> bool:
    """True if `checkpoint_modules` wrapped this module."""
    forward = module.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _checkpointed_forward


def _matches(name: str, module: nn.Module, targets: Sequence[type | str]) -> bool:
    for target in targets:
        if isinstance(target, type):
            if isinstance(module, target):
                return True
        elif type(module).__name__ == target or fnmatchcase(name, target):
            return True
    return False


def check_policy(policy: str, every_k: int) -> None:
    """Raise `ConfigError` for a policy this module does not know or an every_k below 1."""
    if policy not in POLICIES:
        raise ConfigError(f"gradient_checkpointing.policy must be one of {', '.join(POLICIES)}; got {policy!r}.")
    if not isinstance(every_k, int) or isinstance(every_k, bool) or every_k < 1:
        raise ConfigError(f"gradient_checkpointing.every_k must be an integer ≥ 1; got {every_k!r}.")


def describe_modules(model: nn.Module) -> str:
    """The model's top-level modules and module classes, for messages that must say what could be named."""
    children = [f"{name} ({type(child).__name__})" for name, child in model.named_children()]
    blocks = sorted({type(m).__name__ for m in model.modules()} - {type(model).__name__})
    return f"top-level modules: {', '.join(children) or 'none'}; module classes: {', '.join(blocks) or 'none'}"


def checkpoint_modules(model: nn.Module, targets: Sequence[type | str], policy: Literal["full", "every_k", "selective"]
                       = "full", every_k: int = 2) -> list[str]:
    """Recompute the chosen submodules of `model` in backward instead of storing their activations.

    Any checkpointing set before on `model` is removed first, so calling this again replaces the configuration.

    Args:
        model: any module; `state_dict` keys stay the same (the wrap is an instance attribute `forward`).
        targets: module classes (`Block`, matched with isinstance), class names (`"Block"`), or fnmatch patterns on
            the names of `model.named_modules()` (`"blocks.*"`, `"layer[34].*"`). The model itself is never wrapped,
            nor a module nested inside another one that matches (the outer one already recomputes it).
        policy: "full" (every match), "every_k" (matches 0, k, 2k, … in module order; the others keep their
            activations), or "selective" (every match, keeping matmul/attention/conv outputs and recomputing the
            rest).
        every_k: the k of "every_k" (≥ 1; 1 is "full").

    Returns:
        The names of the wrapped modules, in module order.

    Raises:
        ConfigError: a bad policy or every_k, or no module matched (the message lists the model's modules).
    """
    check_policy(policy, every_k)
    remove_checkpointing(model)
    matched: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if name and _matches(name, module, targets) and not any(name.startswith(f"{outer}.") for outer, _ in matched):
            matched.append((name, module))
    if not matched:
        shown = [t.__name__ if isinstance(t, type) else t for t in targets]
        raise ConfigError(f"gradient_checkpointing: no module of {type(model).__name__} matches {shown}. Name block "
                          f"classes or name patterns in `modules`; {describe_modules(model)}.")
    if policy == "every_k":
        matched = matched[::every_k]  # indices 0, k, 2k, …
    for _, module in matched:
        module.forward = functools.partial(_checkpointed_forward, module, module.forward, policy)
    return [name for name, _ in matched]


def remove_checkpointing(model: nn.Module) -> list[str]:
    """Undo `checkpoint_modules`: every wrapped module of `model` gets its plain forward back. Returns their names."""
    removed = []
    for name, module in model.named_modules():
        if is_checkpointed(module):
            original = module.__dict__["forward"].args[1]
            bound_class_forward = getattr(original, "__func__", None) is type(module).forward
            if bound_class_forward and getattr(original, "__self__", None) is module:
                del module.forward  # the class's forward again
            else:
                module.forward = original  # an instance forward someone had set before
            removed.append(name)
    return removed
