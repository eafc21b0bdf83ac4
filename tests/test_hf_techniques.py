"""The techniques on Hugging Face transformers models: a tiny `LlamaForCausalLM` built from a config (nothing
downloaded), trained through the framework's Trainer and LanguageModelTask.

- gradient_checkpointing finds the decoder layers the model declares (`_no_split_modules`), passes their keyword
  arguments (attention mask, position embeddings, cache), gives bit-identical losses and gradients, turns the KV
  cache off while training, and peaks no higher than transformers' own `gradient_checkpointing_enable()`;
- layerwise_lr finds `model.model.layers` (LRs against a hand computation);
- stochastic_depth refuses a model without DropPath before training;
- EMA (tied embeddings), gradient_clipping, cosine_lr, nan_guard and the doctor run in `Trainer.fit()`.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from framework.config import TrainerConfig
from framework.errors import ConfigError
from framework.loop import Trainer
from framework.state import TrainState
from framework.task import LanguageModelTask
from framework.technique import Technique
from framework.techniques import (EMA, CosineLR, Doctor, GradientCheckpointing, GradientClipping, LayerwiseLR, NaNGuard,
                                  StochasticDepth)
from framework.techniques.grad_checkpointing import default_targets
from helpers import PeakTensorBytes

VOCAB = 128


def tiny_llama(layers: int = 2, tie: bool = False, attention_dropout: float = 0.0) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                         tie_word_embeddings=tie, attention_dropout=attention_dropout)
    return LlamaForCausalLM(config)


def token_blocks(n: int = 4, length: int = 65, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def lm_step(model: torch.nn.Module, blocks: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """One training forward + backward from a fixed RNG state (attention dropout draws the same masks): loss, every
    parameter's gradient, and the peak bytes of tensors allocated meanwhile."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    with PeakTensorBytes() as memory:
        logits = model(blocks[:, :-1], attention_mask=attention_mask).logits
        loss = F.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten())
        loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}, memory.peak


# --- gradient checkpointing -----------------------------------------------------------------------------------------
def test_checkpointing_finds_the_declared_decoder_layers_and_is_bit_identical():
    model = tiny_llama(layers=3, attention_dropout=0.1)
    blocks = token_blocks()
    # Right padding on two samples: a real mask reaches the layers as the keyword argument `attention_mask`.
    mask = torch.ones(blocks.shape[0], blocks.shape[1] - 1, dtype=torch.long)
    mask[0, -10:] = mask[2, -3:] = 0
    reference = lm_step(copy.deepcopy(model), blocks, mask)

    assert default_targets(model) == ["LlamaDecoderLayer"]  # declared in _no_split_modules; no class ends in Block
    technique = GradientCheckpointing()
    state = TrainState(None, model, None, None)
    technique.before_prepare(state)
    assert state.summary["gradient_checkpointing"]["modules"] == ["model.layers.0", "model.layers.1",
                                                                  "model.layers.2"]
    assert model.config.use_cache is False  # training builds no KV cache (the recomputation would write it again)

    loss, grads, _ = lm_step(model, blocks, mask)
    assert torch.isfinite(loss) and torch.equal(loss, reference[0])
    assert grads.keys() == reference[1].keys()
    for name, grad in grads.items():
        assert torch.equal(grad, reference[1][name]), name
    technique.fit_end(state)
    assert model.config.use_cache is True  # the user's setting back, for generation after training


def test_checkpointing_peak_memory_matches_transformers_own():
    plain_model = tiny_llama(layers=4)
    blocks = token_blocks()
    plain = lm_step(plain_model, blocks)

    ours_model = copy.deepcopy(plain_model)
    GradientCheckpointing().before_prepare(TrainState(None, ours_model, None, None))
    ours = lm_step(ours_model, blocks)

    theirs_model = copy.deepcopy(plain_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers 5 calls it a deprecated alias of activation_checkpointing_enable
        theirs_model.gradient_checkpointing_enable()
    theirs = lm_step(theirs_model, blocks)

    print(f"peak bytes: plain {plain[2]}, ours {ours[2]}, transformers {theirs[2]}")
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[0], plain[0])
    # Both keep only each layer's input and recompute the same layers, so the counts agree; the slack of one
    # (B, T, hidden) float32 activation covers a transformers release that keeps a tensor more or less at the model's
    # top level (e.g. the embedding output it marks as requiring grad).
    one_activation = blocks.shape[0] * (blocks.shape[1] - 1) * plain_model.config.hidden_size * 4
    assert ours[2] <= theirs[2] + one_activation
    assert ours[2] < 0.6 * plain[2]


def test_model_with_neither_declared_layers_nor_blocks_is_refused():
    with pytest.raises(ConfigError, match=r"Sequential declares no `_no_split_modules`.*`modules`"):
        GradientCheckpointing().before_prepare(TrainState(None, torch.nn.Sequential(torch.nn.Linear(2, 2)), None, None))


# --- layer-wise learning rates --------------------------------------------------------------------------------------
def test_layerwise_lr_finds_the_decoder_layers():
    model = tiny_llama(layers=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0)
    LayerwiseLR(layer_decay=0.5).before_prepare(TrainState(None, model, optimizer, None))
    lr_of = {name: group["lr"] for group in optimizer.param_groups for name in group["names"]}
    assert lr_of.keys() == {name for name, _ in model.named_parameters()}
    # 4 depths: embeddings 0, layer i at i + 1, final norm and head 3; LR = 0.01 × 0.5^(3 - depth).
    for name, lr in lr_of.items():
        if name.startswith("model.embed_tokens."):
            expected = 0.01 / 8
        elif name.startswith("model.layers.0."):
            expected = 0.01 / 4
        elif name.startswith("model.layers.1."):
            expected = 0.01 / 2
        else:
            assert name in ("model.norm.weight", "lm_head.weight"), name
            expected = 0.01
        assert lr == pytest.approx(expected, rel=1e-12), name
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(list(model.parameters()))


# --- stochastic depth ------------------------------------------------------------------------------------------------
def test_stochastic_depth_refuses_a_model_without_drop_path_before_training(tmp_path):
    model = tiny_llama(layers=2)
    trainer = Trainer(TrainerConfig(output_dir=str(tmp_path), epochs=1, tracker="none"), model,
                      torch.optim.SGD(model.parameters(), lr=0.1), LanguageModelTask(),
                      DataLoader([{"input_ids": b} for b in token_blocks(4, 9)], batch_size=2),
                      techniques=[StochasticDepth(rate=0.1)])
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ConfigError) as error:
        trainer.fit()
    message = str(error.value)
    assert "\n" not in message
    assert "LlamaForCausalLM has no DropPath" in message and "remove stochastic_depth" in message
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())  # not one step taken


# --- EMA, clipping, cosine LR, NaN guard and the doctor in the loop ------------------------------------------------
class WeightsAfterFirstStep(Technique):
    """Keeps the model's weights and the EMA's average right after the first optimizer step (listed after EMA)."""

    def __init__(self, ema: EMA):
        self.ema = ema
        self.weights: list[torch.Tensor] = []
        self.average: list[torch.Tensor] = []

    def after_optimizer_step(self, state: TrainState) -> None:
        if state.step == 1 and not self.weights:
            self.weights = [p.detach().clone() for p in state.model.parameters()]
            self.average = [t.clone() for t in self.ema.ema_params]


def counting_blocks(n: int = 32, length: int = 17) -> list[dict]:
    """Each block counts up by one from a random start (mod the vocabulary): a rule a tiny model learns in steps."""
    starts = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(2))
    return [{"input_ids": row} for row in (starts + torch.arange(length)) % VOCAB]


def test_ema_clipping_cosine_nan_guard_and_doctor_train_a_tied_llama(tmp_path):
    model = tiny_llama(layers=2, tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    initial = [p.detach().clone() for p in model.parameters()]
    ema = EMA(decay=0.9)
    probe = WeightsAfterFirstStep(ema)
    doctor = Doctor(check_every=1)
    data = counting_blocks(24)
    config = TrainerConfig(output_dir=str(tmp_path), epochs=2, tracker="none", log_every=1)
    trainer = Trainer(config, model, torch.optim.AdamW(model.parameters(), lr=1e-2), LanguageModelTask(),
                      DataLoader(data, batch_size=4), DataLoader(data[:4], batch_size=4),
                      techniques=[doctor, GradientClipping(max_norm=0.5), CosineLR(), NaNGuard(), ema, probe])
    summary = trainer.fit()
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in log if "train/loss" in line]
    assert len(steps) == 12

    # The doctor read the vocabulary from the logits (ln 128 expected at step 0) and found nothing wrong.
    assert doctor._chance == pytest.approx(math.log(VOCAB))
    assert summary["doctor"] == [] and json.loads((tmp_path / "summary.json").read_text())["doctor"] == []
    assert summary["nan_guard"] == {"skipped": 0, "rollbacks": 0, "spikes": 0}
    # The loss falls: the counting rule is learnt.
    assert steps[-1]["train/loss"] < steps[0]["train/loss"] - 0.5, [s["train/loss"] for s in steps]
    # Clipping: every gradient norm above 0.5 was clipped to 0.5.
    assert all(s["grad_norm_clipped"] == pytest.approx(min(s["grad_norm"], 0.5), rel=1e-5) for s in steps)
    assert any(s["grad_norm"] > 0.5 for s in steps)
    # Cosine: 0.01 · (1 + cos(π t / 12)) / 2 after step t, down to 0.
    for t, s in enumerate(steps, start=1):
        assert s["lr"] == pytest.approx(0.01 * (1 + math.cos(math.pi * t / 12)) / 2, abs=1e-12)

    # EMA, tied weights: one shared tensor, averaged once; after step 1 it is 0.9 · initial + 0.1 · weights.
    assert len(probe.average) == len(initial) == len(list(model.parameters()))
    for before, after, average in zip(initial, probe.weights, probe.average):
        # (float32: lerp and this formula may round differently, by an ulp)
        torch.testing.assert_close(average, before + 0.1 * (after - before), rtol=1e-6, atol=1e-7)
    assert not all(torch.equal(a, w) for a, w in zip(probe.average, probe.weights))
    exported, final = load_file(tmp_path / "model_ema.safetensors"), load_file(tmp_path / "model.safetensors")
    assert torch.equal(exported["lm_head.weight"], exported["model.embed_tokens.weight"])  # still tied
    assert not torch.equal(exported["model.embed_tokens.weight"], final["model.embed_tokens.weight"])


class NaNLossAt(Technique):
    """Turns the loss of one micro-batch into NaN (a real non-finite loss reaching backward); keeps the weights after
    every batch."""

    def __init__(self, batch: int):
        self.batch = batch
        self.weights: list[list[torch.Tensor]] = []

    def on_loss(self, state, loss, batch, outputs):
        return loss * float("nan") if state.batch_in_epoch == self.batch and state.epoch == 0 else loss

    def batch_end(self, state, metrics):
        self.weights.append([p.detach().clone() for p in state.model.parameters()])


def test_nan_guard_skips_a_nonfinite_step_of_a_llama(tmp_path):
    model = tiny_llama(layers=2)
    nan_at = NaNLossAt(batch=1)
    config = TrainerConfig(output_dir=str(tmp_path), epochs=1, tracker="none", log_every=1)
    trainer = Trainer(config, model, torch.optim.AdamW(model.parameters(), lr=1e-2), LanguageModelTask(),
                      DataLoader(counting_blocks(16), batch_size=4),
                      techniques=[nan_at, Doctor(check_every=1), NaNGuard()])
    summary = trainer.fit()
    # max_steps (4) counts updates, so the skipped batch is made up by one batch of a second epoch.
    assert summary["nan_guard"]["skipped"] == 1 and trainer.state.step == 4
    after = nan_at.weights
    assert len(after) == 5
    # The NaN batch (the second) changed no weight; the next one did.
    assert all(torch.equal(a, b) for a, b in zip(after[0], after[1]))
    assert not all(torch.equal(a, b) for a, b in zip(after[1], after[2]))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # The doctor saw the NaN, in the gradients and in the loss (for which it replayed the batch through the HF model
    # with a hook on every module, whose outputs are tuples and ModelOutputs), and left the recovery to the guard.
    assert sorted(f["code"] for f in summary["doctor"]) == ["exploding_gradients", "nonfinite_loss"]
