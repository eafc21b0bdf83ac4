"""A task that counts its loss items (a language model with padding): each optimizer step's gradient is that of the
mean over every real target token of the step (all micro-batches, all ranks), in one process and under 2-process DDP.
The references are computed by hand from one large batch; the old mean of micro-batch means is shown to differ."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import DataLoader, default_collate

from framework.config import TrainerConfig
from framework.loop import Trainer
from framework.task import LanguageModelTask
from helpers import ROOT, launch, reset_accelerate

_spec = importlib.util.spec_from_file_location("padded_lm_step", ROOT / "tests" / "scripts" / "padded_lm_step.py")
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)

TOLERANCE = 1e-6


def token_nats(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the cross-entropy over the real targets, their count), written out without the task's code."""
    tokens, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(tokens[:, :-1], key_padding_mask=mask[:, :-1].bool())
    per_token = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")  # (B, T)
    real = mask[:, 1:].bool()
    return per_token[real].sum(), real.sum()


def gradients(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters())))


def token_mean_gradients(model: torch.nn.Module, micro_batches: list[dict]) -> list[torch.Tensor]:
    """The gradient of one large batch holding all the micro-batches: the mean over all its real targets."""
    nats, count = token_nats(model, default_collate(sum((split(b) for b in micro_batches), [])))
    return gradients(model, nats / count)


def mean_of_means_gradients(model: torch.nn.Module, micro_batches: list[dict]) -> list[torch.Tensor]:
    """The old normalization: each micro-batch's token mean, averaged over the micro-batches."""
    means = [nats / count for nats, count in (token_nats(model, b) for b in micro_batches)]
    return gradients(model, torch.stack(means).mean())


def split(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def sgd_reference(micro_batches: list[dict], accumulation: int, step_gradients, epochs: int = 1) -> torch.nn.Module:
    """The tiny GPT after SGD (lr 1) steps over windows of `accumulation` micro-batches (each epoch's last window
    may be partial)."""
    model = script.tiny_gpt()
    for start in [start for _ in range(epochs) for start in range(0, len(micro_batches), accumulation)]:
        step = step_gradients(model, micro_batches[start:start + accumulation])
        with torch.no_grad():
            for parameter, gradient in zip(model.parameters(), step):
                parameter -= gradient
    return model


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("fullness", [
    [1.0, 0.1, 0.6, 0.03],  # one full window of 4
    [1.0, 0.1, 0.6, 0.03, 0.05, 1.0],  # a full window, then a partial one of 2 (the epoch's last step)
])
def test_each_step_applies_the_mean_over_all_its_real_tokens(tmp_path, fullness):
    samples = script.padded_blocks(fullness, batch_size=4)
    micro_batches = [default_collate(samples[i:i + 4]) for i in range(0, len(samples), 4)]
    config = TrainerConfig(output_dir=str(tmp_path), epochs=1, tracker="none", log_every=1, doctor=False,
                           gradient_accumulation_steps=4)
    model = script.tiny_gpt()
    trainer = Trainer(config, model, torch.optim.SGD(model.parameters(), lr=1.0), LanguageModelTask(),
                      DataLoader(samples, batch_size=4), techniques=[])
    trainer.fit()
    assert trainer.state.step == len(range(0, len(fullness), 4))

    expected = sgd_reference(micro_batches, 4, token_mean_gradients)
    trained = trainer.accelerator.unwrap_model(trainer.state.model)
    for a, b in zip(trained.parameters(), expected.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=TOLERANCE)
    # The old mean of micro-batch means lands far outside the tolerance: this test tells the two apart.
    old = sgd_reference(micro_batches, 4, mean_of_means_gradients)
    assert max_difference(old, expected) > 100 * TOLERANCE
    assert max_difference(expected, script.tiny_gpt()) > 1e-2  # and training moved the weights

    # train/loss is the step's plain token mean (before the update), not the loss scaled for backward.
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first_loss = next(line["train/loss"] for line in logged if "train/loss" in line)
    with torch.no_grad():
        nats, count = token_nats(script.tiny_gpt(), default_collate(samples[:16]))
    assert first_loss == pytest.approx((nats / count).item(), rel=1e-5)
    assert trainer.state.tokens_seen == sum(int(b["attention_mask"][:, 1:].sum()) for b in micro_batches)


def test_resuming_mid_epoch_continues_the_same_token_weighted_windows(tmp_path):
    """Stopped after step 1 (mid-epoch: 4 of 6 micro-batches), then resumed: the weights of the uninterrupted run,
    and both are the reference over 2 epochs of a full and a partial window."""
    samples = script.padded_blocks([1.0, 0.1, 0.6, 0.03, 0.05, 1.0], batch_size=2)
    micro_batches = [default_collate(samples[i:i + 2]) for i in range(0, len(samples), 2)]

    def train(output_dir, **config):
        model = script.tiny_gpt()
        trainer = Trainer(TrainerConfig(output_dir=str(output_dir), epochs=2, tracker="none", doctor=False,
                                        gradient_accumulation_steps=4, **config),
                          model, torch.optim.SGD(model.parameters(), lr=1.0), LanguageModelTask(),
                          DataLoader(samples, batch_size=2), techniques=[])
        trainer.fit()
        return trainer

    whole = train(tmp_path / "whole")
    reset_accelerate()
    train(tmp_path / "resumed", max_steps=1)
    reset_accelerate()
    resumed = train(tmp_path / "resumed", resume_from="latest")
    assert resumed.resume_path is not None and resumed.resume_path.name == "step_00000001"  # mid-epoch
    assert whole.state.step == resumed.state.step == 4
    expected = sgd_reference(micro_batches, 4, token_mean_gradients, epochs=2)
    for a, b, c in zip(whole.state.model.parameters(), resumed.state.model.parameters(), expected.parameters()):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=0, atol=TOLERANCE)


def test_language_model_task_ignores_padded_targets():
    task = LanguageModelTask()
    model = script.tiny_gpt()
    batch = default_collate(script.padded_blocks([0.5], batch_size=4, seed=1))
    batch["attention_mask"][0] = 0  # a block of padding only
    outputs = task.forward(model, batch)
    nats, count = token_nats(model, batch)
    torch.testing.assert_close(task.loss(outputs, batch), nats / count)
    assert task.loss_items(batch).item() == count.item() == task.batch_tokens(batch)
    per_block = task.eval_outputs(outputs, batch)
    torch.testing.assert_close(per_block["nats"].sum(), nats)
    assert per_block["tokens"].tolist() == batch["attention_mask"][:, 1:].sum(dim=1).float().tolist()
    # A micro-batch with no real target: loss 0 (no gradient), not 0 / 0.
    empty = {**batch, "attention_mask": torch.zeros_like(batch["attention_mask"])}
    assert task.loss(task.forward(model, empty), empty).item() == 0.0 and task.loss_items(empty).item() == 0
    # Without a mask every target counts, as before.
    plain = {"input_ids": batch["input_ids"]}
    assert task.loss_items(plain).item() == task.batch_tokens(plain) == 4 * script.LENGTH


def test_two_ranks_with_uneven_padding_apply_the_mean_over_all_their_tokens(tmp_path):
    """Rank 0 holds full blocks, rank 1 sparse ones: the step averages every real token of both ranks."""
    result = launch(ROOT / "tests" / "scripts" / "padded_lm_step.py", str(tmp_path), launch_config="multi_cpu.yaml")
    assert result.returncode == 0 and "steps 1" in result.stdout
    ranks = [load_file(tmp_path / f"weights_rank{r}.safetensors") for r in range(script.RANKS)]
    samples = script.padded_blocks(script.rank_fullness())
    size = script.BATCH_SIZE
    micro_batches = [default_collate(samples[i:i + size]) for i in range(0, len(samples), size)]
    expected = sgd_reference(micro_batches, len(micro_batches), token_mean_gradients).state_dict()
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), f"{name} differs between the ranks"
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-5)
    # What DDP's average of the ranks' means of micro-batch means would have given instead: far off.
    old = sgd_reference(micro_batches, len(micro_batches), mean_of_means_gradients).state_dict()
    assert max((old[name] - expected[name]).abs().max().item() for name in ranks[0]) > 1e-3
