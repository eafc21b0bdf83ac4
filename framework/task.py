"""A Task is what varies between kinds of training (classification, language modelling, GANs): forward, loss,
evaluation outputs. The loop stays the same."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from framework.errors import ConfigError, IncompatibleError

IGNORE_INDEX = -100
"""A target that the loss skips (cross-entropy's `ignore_index`; transformers' label for padding)."""


class Task:
    """Base class. `eval_outputs` returns per-sample tensors; the loop gathers them over ranks (dropping the samples
    a distributed sampler duplicated) and `compute_metrics` reduces them.

    A task that needs more than one update per step (a GAN) sets `owns_step` and implements `train_step`; the loop
    then calls it instead of forward / loss / backward / step.
    """

    owns_step = False

    def check(self, backend: Any, techniques: list, gradient_accumulation_steps: int) -> None:
        """Refuse, before training, what this task cannot run with (a task owning its step: see below)."""
        if not self.owns_step:
            return
        name = type(self).__name__
        if backend.distributed_type == "DEEPSPEED":
            raise IncompatibleError(
                f"{name} takes several optimizer updates per step, but the DeepSpeed engine couples one backward to "
                "one step. Use a DDP launch config (multi_cpu.yaml, ddp.yaml) or a single process.")
        if gradient_accumulation_steps != 1:
            raise ConfigError(f"{name} runs its own updates each step; gradient_accumulation_steps must be 1, got "
                              f"{gradient_accumulation_steps}. Raise data.batch_size instead.")
        owners = [t.name for t in techniques if t.owns_optimizer_step]
        if owners:
            raise IncompatibleError(f"{owners[0]} replaces the optimizer step, which {name} runs itself. Remove it.")

    def train_step(self, trainer: Any, batch: Any) -> tuple[torch.Tensor, Any]:
        """Only when `owns_step`: run this step's updates, each through `trainer.update(loss, batch, outputs,
        parameters)`; return the loss and outputs to log (`train_metrics` reads them)."""
        raise NotImplementedError

    def forward(self, model: torch.nn.Module, batch: Any) -> Any:
        raise NotImplementedError

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def train_metrics(self, outputs: Any, batch: Any) -> dict[str, torch.Tensor]:
        """Per-batch training metrics as 0-dim tensors (kept on the device; the loop averages them per log line)."""
        return {}

    def eval_outputs(self, outputs: Any, batch: Any) -> dict[str, torch.Tensor]:
        return {"loss": self.loss(outputs, batch).reshape(1)}

    def compute_metrics(self, gathered: dict[str, torch.Tensor]) -> dict[str, float]:
        return {name: values.float().mean().item() for name, values in gathered.items()}

    def batch_size(self, batch: Any) -> int:
        """Samples in this batch on this rank (for throughput and `samples_seen`)."""
        raise NotImplementedError

    def batch_tokens(self, batch: Any) -> int:
        """Tokens predicted in this batch on this rank (for `tokens_seen` and tokens/s; 0 when not a sequence task)."""
        return 0

    def loss_items(self, batch: Any) -> torch.Tensor | None:
        """How many items (e.g. real target tokens) `loss` averages over in this batch, as a 0-dim tensor on the
        batch's device; None (the default) when the loss is a mean over equal-weight samples.

        With a count, the loop makes each optimizer step's gradient that of the mean over every item of the step (all
        micro-batches, all ranks), not the mean of the micro-batches' means, which would weight a token in a batch
        full of padding more than one in a full batch. It counts the batch as the loader gives it (before `on_batch`
        hooks), and is asked for every batch or for none."""
        return None

    def output_classes(self, outputs: Any) -> int | None:
        """The number of classes the loss chooses among (the doctor expects a fresh model's loss near ln C), or None
        when the loss is no choice among classes. Default: the task's `num_classes` attribute, if it has one."""
        return getattr(self, "num_classes", None)


def dominant_label(target: torch.Tensor) -> torch.Tensor:
    """Class indices for index targets (B,) or for soft targets (B, C): the class with the largest share."""
    return target.argmax(dim=-1) if target.is_floating_point() else target


class ClassificationTask(Task):
    """Inputs to class logits with cross-entropy.

    Targets are class indices (B,) or, after Mixup / CutMix / label smoothing, probabilities (B, num_classes);
    `F.cross_entropy` takes both. Accuracy is measured against the dominant label of a soft target (the class with
    the largest share), so training accuracy under Mixup/CutMix is an honest "did it find the main class".

    Args:
        num_classes: the number of classes (techniques that build soft targets need it).
        input_key / target_key: the batch's keys for inputs and targets.
    """

    def __init__(self, num_classes: int, input_key: str = "pixel_values", target_key: str = "label"):
        self.num_classes = num_classes
        self.input_key = input_key
        self.target_key = target_key

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch[self.input_key])

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(outputs, batch[self.target_key])

    def train_metrics(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        correct = outputs.detach().argmax(dim=-1) == dominant_label(batch[self.target_key])
        return {"accuracy": correct.float().mean()}

    def eval_outputs(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        target = batch[self.target_key]
        return {
            "loss": F.cross_entropy(outputs.float(), target, reduction="none"),
            "accuracy": (outputs.argmax(dim=-1) == dominant_label(target)).float(),
        }

    def batch_size(self, batch: dict[str, torch.Tensor]) -> int:
        return batch[self.target_key].shape[0]

    def output_classes(self, outputs: Any) -> int | None:
        """`num_classes`, else (when it was left unset) the logits' last dimension."""
        if self.num_classes is None and isinstance(outputs, torch.Tensor) and outputs.ndim >= 2:
            return outputs.shape[-1]
        return self.num_classes


class LanguageModelTask(Task):
    """Next-token prediction: the model maps (B, T) tokens to (B, T, vocab) logits (a tensor, or a transformers
    `ModelOutput` with `.logits`); each block of T + 1 tokens gives T predictions.

    Padding: a batch may carry `attention_mask` (B, T + 1), 1 = real token, 0 = padding. The model then gets
    `attention_mask=attention_mask[:, :-1]` (transformers models and `framework.models.gpt.GPT` take it; a model of
    your own must too), and a target that is padding is ignored: the loss is the mean over the batch's real targets,
    and `loss_items` counts them, so an optimizer step averages over every real token it holds (see the loop).

    Metrics: `loss` (nats per predicted token, summed over the split then divided: exact whatever the blocks'
    lengths) and, when the batches carry `bytes` (the UTF-8 bytes the block's targets stand for, as
    `framework.data.text` writes them), `bits_per_byte` = total nats / total bytes / ln 2: comparable across
    tokenizers. Without `bytes`: `bits_per_token`.

    Args:
        input_key: the batch's token blocks (B, T + 1).
        tokenizer: the data's transformers tokenizer, for techniques that decode tokens (`text_sample`); None: the
            tokens are UTF-8 bytes.
    """

    def __init__(self, input_key: str = "input_ids", tokenizer: Any = None):
        self.input_key = input_key
        self.tokenizer = tokenizer  # for what turns tokens into text (text_sample); None: UTF-8 bytes

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = batch[self.input_key][:, :-1]
        if "attention_mask" in batch:
            outputs = model(inputs, attention_mask=batch["attention_mask"][:, :-1])
        else:
            outputs = model(inputs)
        return getattr(outputs, "logits", outputs)

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T): the next token at every position, IGNORE_INDEX where that token is padding."""
        targets = batch[self.input_key][:, 1:]
        if "attention_mask" in batch:
            targets = targets.masked_fill(batch["attention_mask"][:, 1:] == 0, IGNORE_INDEX)
        return targets

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        targets = self.targets(batch)
        nats = F.cross_entropy(outputs.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
        # Divided here rather than by cross_entropy's mean: a micro-batch of padding only gives 0, not 0 / 0.
        return nats / (targets != IGNORE_INDEX).sum().clamp(min=1)

    def loss_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The real targets in the batch (all B·T without `attention_mask`: a smaller last batch weighs less too)."""
        return (self.targets(batch) != IGNORE_INDEX).sum()

    def eval_outputs(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        targets = self.targets(batch)
        nats = F.cross_entropy(outputs.transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX,
                               reduction="none").sum(dim=1)  # (B,); ignored targets add 0
        per_block = {"nats": nats, "tokens": (targets != IGNORE_INDEX).sum(dim=1).to(nats)}
        if "bytes" in batch:
            per_block["bytes"] = batch["bytes"].to(nats)
        return per_block

    def compute_metrics(self, gathered: dict[str, torch.Tensor]) -> dict[str, float]:
        nats = gathered["nats"].double().sum().item()
        metrics = {"loss": nats / gathered["tokens"].double().sum().item()}
        if "bytes" in gathered:
            metrics["bits_per_byte"] = nats / gathered["bytes"].double().sum().item() / math.log(2)
        else:
            metrics["bits_per_token"] = metrics["loss"] / math.log(2)
        return metrics

    def batch_size(self, batch: dict[str, torch.Tensor]) -> int:
        return batch[self.input_key].shape[0]

    def batch_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        if "attention_mask" in batch:  # real targets only (one host read, as `int` needs)
            return int(batch["attention_mask"][:, 1:].count_nonzero())
        blocks = batch[self.input_key]
        return blocks.shape[0] * (blocks.shape[1] - 1)

    def output_classes(self, outputs: Any) -> int | None:
        """The vocabulary: the size of the logits' last dimension (the model's output size)."""
        return outputs.shape[-1] if isinstance(outputs, torch.Tensor) and outputs.ndim >= 2 else None


class WGANTask(Task):
    """Wasserstein GAN training (Arjovsky et al. 2017; with the `gradient_penalty` technique, WGAN-GP). The task owns
    its step: each training step is one critic update on a real batch, and every `n_critic`-th step is followed by
    one generator update, both through `Trainer.update` (so the techniques' hooks, the accelerator and the optimizer
    are the loop's). The model is a `framework.models.dcgan.WGAN`; one optimizer holds both networks' parameters,
    and each update drops the other network's gradients, so its weights and optimizer state stay untouched.

    Logged: `train/loss` (the critic's loss, penalty included), `train/wasserstein` (the critic's estimate of the
    Wasserstein distance, E[f(real)] − E[f(fake)]) and `generator_loss`.

    Args:
        n_critic: critic updates per generator update (the paper's 5).
        judge: optional, normalized images -> {name: score} (see `framework.techniques.gan_samples`).
    """

    owns_step = True

    def __init__(self, n_critic: int = 5, input_key: str = "pixel_values", judge: Any = None):
        self.n_critic = n_critic
        self.input_key = input_key
        self.judge = judge

    def train_step(self, trainer: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        state = trainer.state
        gan = state.accelerator.unwrap_model(state.model)
        real = batch[self.input_key]
        scored = state.model(mode="critic", real=real)  # the wrapped model: DDP syncs the critic's gradients
        critic_loss = scored["fake_scores"].mean() - scored["real_scores"].mean()
        outputs = {**scored, "critic": gan.critic, "real": real}  # what gradient_penalty needs
        loss = trainer.update(critic_loss, batch, outputs, gan.critic.parameters())
        if (state.step + 1) % self.n_critic == 0:
            generated = state.model(mode="generator", batch_size=real.shape[0])
            generator_loss = -generated["fake_scores"].mean()
            trainer.update(generator_loss, batch, generated, gan.generator.parameters())
            state.log(generator_loss=generator_loss.detach())
        return loss, outputs

    def train_metrics(self, outputs: dict[str, Any], batch: Any) -> dict[str, torch.Tensor]:
        return {"wasserstein": outputs["real_scores"].detach().mean() - outputs["fake_scores"].detach().mean()}

    def batch_size(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch[self.input_key])
