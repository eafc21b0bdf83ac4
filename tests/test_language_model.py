"""Byte-level language modelling: blocks by hand, the task's loss and bits, the GPT's causality, the recipe launched."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from framework.data.text import END_OF_DOCUMENT, TextDataConfig, byte_blocks, decode, encode, text_data
from framework.errors import ConfigError
from framework.models.gpt import GPT, GPTConfig
from framework.task import LanguageModelTask
from helpers import ROOT, launch


def test_byte_blocks_by_hand():
    # "ab" + EOD + "cde" + EOD = [97, 98, 0, 99, 100, 101, 0]: blocks of 3, the tail of 1 dropped
    assert byte_blocks(["ab", "cde"], 3) == [[97, 98, END_OF_DOCUMENT], [99, 100, 101]]
    assert encode("é") == [0xC3, 0xA9] and decode(encode("déf") + [END_OF_DOCUMENT]) == "déf"


def test_text_files_become_held_out_blocks(tmp_path):
    for i in range(20):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document {i}\n" * 30)
    data = text_data(TextDataConfig(name=str(tmp_path / "*.txt"), context_length=32, val_fraction=0.1,
                                    test_fraction=0.1, batch_size=4))
    held_out = set(data.splits["validation"]["input_ids"][0].tolist())
    assert len(data.splits["train"]) > len(data.splits["test"]) > 0
    batch = next(iter(data.loaders["train"]))["input_ids"]
    assert batch.shape == (4, 33) and batch.dtype == torch.long and held_out <= set(range(256))
    # unigram entropy by hand over the training blocks
    counts = np.bincount(np.asarray(data.splits["train"]["input_ids"]).ravel(), minlength=256)
    p = counts[counts > 0] / counts.sum()
    assert data.unigram_bits_per_byte() == pytest.approx(-(p * np.log2(p)).sum())
    with pytest.raises(ConfigError, match="no full block of 10001 tokens"):
        text_data(TextDataConfig(name=str(tmp_path / "*.txt"), context_length=10_000))


def test_language_model_task_loss_and_bits():
    task = LanguageModelTask()
    tokens = torch.randint(0, 256, (2, 9))
    logits = torch.randn(2, 8, 256)
    manual = -torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None]).mean()
    torch.testing.assert_close(task.loss(logits, {"input_ids": tokens}), manual)
    metrics = task.compute_metrics(task.eval_outputs(logits, {"input_ids": tokens}))
    assert metrics["loss"] == pytest.approx(manual.item(), rel=1e-6)
    assert metrics["bits_per_token"] == pytest.approx(manual.item() / math.log(2), rel=1e-6)
    assert task.batch_tokens({"input_ids": tokens}) == 16


@pytest.mark.parametrize("implementation", ["sdpa", "chunked", "naive"])
def test_gpt_is_causal_and_generates(implementation):
    torch.manual_seed(0)
    model = GPT(GPTConfig(context_length=16, n_layer=2, n_head=2, n_embd=16, attention=implementation,
                          attention_chunk_size=4)).eval()
    tokens = torch.randint(0, 256, (2, 12))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 256  # change the future only
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])  # positions before 8 never see positions ≥ 8
    assert not torch.allclose(a[:, 8:], b[:, 8:])
    assert model.lm_head.weight is model.wte.weight
    out = model.generate(tokens[:, :3], max_new_tokens=20, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 23) and torch.equal(out[:, :3], tokens[:, :3])


@pytest.mark.slow
def test_language_model_recipe_runs_end_to_end(tmp_path):
    result = launch(ROOT / "recipes" / "language_model.py", "--config",
                    str(ROOT / "recipes" / "configs" / "language_model.yaml"), "--output_dir", str(tmp_path),
                    "--tracker", "none", "--max_steps", "6", "--log_every", "2", "--data.context_length", "64",
                    "--data.max_eval_blocks", "16", "--model.n_layer", "1", "--model.n_embd", "32",
                    "--techniques.cosine_lr.warmup_steps", "2", "--techniques.text_sample.length", "40")
    assert result.returncode == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["run"]["steps"] == 6 and 4.0 < summary["unigram_bits_per_byte"] < 5.5
    # 6 steps of a tiny model: far from trained, but already below 8 bits (uniform over bytes)
    assert summary["metrics"]["test/bits_per_byte"] < 8.0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["tokens_seen"] for line in lines if "train/loss" in line] == [2 * 16 * 64 * k for k in (1, 2, 3)]
    assert len((tmp_path / "sample.txt").read_text(encoding="utf-8")) >= 40
    assert "--- sample" in result.stdout
