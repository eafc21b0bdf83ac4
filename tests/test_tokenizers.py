"""Tokenizers for the text data: bytes, a BPE trained on the training split (cached), a local folder; blocks packed
with the eos token, the bytes each block's targets stand for, and bits per byte through the language-model task."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import framework.data.text as text
from framework.data.text import END_OF_DOCUMENT, TextDataConfig, bytes_tokenizer, text_data, token_byte_lengths
from framework.errors import ConfigError
from framework.task import LanguageModelTask


@pytest.fixture(autouse=True)
def tokenizer_cache(tmp_path, monkeypatch):
    """Trained tokenizers go to this test's own cache, never the user's."""
    cache = tmp_path / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache / "framework_tokenizers"


def corpus(tmp_path) -> dict[str, list[str]]:
    """A saved DatasetDict with its own splits (so the test knows which text is held out): ASCII code-like training
    documents with a few é, and held-out documents made of a word that never occurs in training."""
    docs = {
        "train": [f"def quokka_{i}(x):\n" + "".join(f"    total_{j} = compute(alpha_{i * j}, beta) + quokka  # café {j}\n"
                                                   for j in range(15)) for i in range(12)],
        "validation": [f"zyxwvut {i} " * 150 for i in range(3)],
        "test": [f"def quokka_{i}(y):\n    return y\n" * 20 for i in range(3)],
    }
    datasets.DatasetDict({split: datasets.Dataset.from_dict({"text": texts}) for split, texts in docs.items()}
                         ).save_to_disk(str(tmp_path / "corpus"))
    return docs


def bpe_config(tmp_path, **overrides) -> TextDataConfig:
    options = {"name": str(tmp_path / "corpus"), "tokenizer": "bpe", "vocab_size": 300, "context_length": 16,
               "max_eval_blocks": None, "batch_size": 4}
    return TextDataConfig(**{**options, **overrides})


def test_bytes_tokenizer_is_utf8():
    tokenizer = bytes_tokenizer()
    sample = "déf \x00 Ā 日本\n\tx"  # Ā is the eos token's spelling: text holding it still gets its own bytes
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    assert ids == list(sample.encode()) and tokenizer.decode(ids) == sample
    assert len(tokenizer) == 256 and tokenizer.eos_token_id == END_OF_DOCUMENT == 0
    assert token_byte_lengths(tokenizer).tolist() == [1] * 256


def test_bytes_blocks_carry_their_length(tmp_path):
    docs = corpus(tmp_path)
    data = text_data(TextDataConfig(name=str(tmp_path / "corpus"), context_length=16, max_eval_blocks=None))
    blocks = data.splits["test"][:]["input_ids"]
    stream = [b for doc in docs["test"] for b in (*doc.encode(), 0)]
    assert blocks.flatten().tolist() == stream[:len(blocks) * 17]
    assert data.splits["train"][:]["bytes"].tolist() == [16] * len(data.splits["train"])
    assert data.vocab_size == 256 and isinstance(data.tokenizer, PreTrainedTokenizerFast)


def test_bpe_blocks_are_the_documents_joined_with_eos(tmp_path):
    docs = corpus(tmp_path)
    data = text_data(bpe_config(tmp_path))
    tokenizer, eos = data.tokenizer, data.tokenizer.eos_token_id
    assert eos == 0 and data.vocab_size == len(tokenizer) == 300
    for split in ("train", "validation", "test"):
        stream = [t for doc in docs[split] for t in (*tokenizer(doc, add_special_tokens=False)["input_ids"], eos)]
        blocks = data.splits[split][:]["input_ids"]
        assert blocks.shape[1] == 17 and blocks.flatten().tolist() == stream[:len(blocks) * 17]
        # the bytes of each block's targets by hand: decode each document's part, an eos counting 1
        for block, counted in zip(blocks.tolist(), data.splits[split][:]["bytes"].tolist()):
            pieces = np.split(np.asarray(block[1:]), np.flatnonzero(np.asarray(block[1:]) == eos))
            decoded = [tokenizer.decode([t for t in piece if t != eos]) for piece in pieces]
            assert "\ufffd" not in "".join(decoded)  # no character cut in two: decoding is exact here
            assert counted == sum(len(piece.encode()) for piece in decoded) + block[1:].count(eos)
    assert data.splits["train"][:]["bytes"].float().mean() > 16 * 1.5  # merges: tokens stand for several bytes


def test_bpe_learns_from_the_training_split_only(tmp_path):
    corpus(tmp_path)
    tokenizer = text_data(bpe_config(tmp_path)).tokenizer
    assert tokenizer.tokenize(" quokka") == ["Ġquokka"]  # frequent in training: one token
    # 450 times in the validation split, never in training: no merge holds any of its pairs
    assert tokenizer.tokenize("zyxwvut") == list("zyxwvut")
    assert not [token for token in tokenizer.get_vocab() if "zy" in token or "wv" in token]


def test_bpe_is_cached_by_training_split_and_vocab_size(tmp_path, monkeypatch, tokenizer_cache):
    corpus(tmp_path)
    trained = []
    train_bpe = text.train_bpe
    monkeypatch.setattr(text, "train_bpe", lambda texts, size: trained.append(size) or train_bpe(texts, size))
    first = text_data(bpe_config(tmp_path)).tokenizer
    [folder] = tokenizer_cache.iterdir()
    written = (folder / "tokenizer.json").stat().st_mtime_ns
    second = text_data(bpe_config(tmp_path)).tokenizer
    assert trained == [300] and (folder / "tokenizer.json").stat().st_mtime_ns == written
    assert second.get_vocab() == first.get_vocab()
    other = text_data(bpe_config(tmp_path, vocab_size=320)).tokenizer
    assert trained == [300, 320] and len(other) == 320 and len(list(tokenizer_cache.iterdir())) == 2


def test_bpe_built_by_two_processes_at_once(tmp_path, monkeypatch, tokenizer_cache):
    """Another rank renames its copy into place while this one trains: this one keeps that copy (told apart here by
    training it on other text), leaves no staging folder behind and loads it."""
    docs = corpus(tmp_path)
    winner = text.train_bpe(iter(docs["test"]), 300)
    replace = text.os.replace

    def another_rank_first(source, destination):
        winner.save_pretrained(destination)
        replace(source, destination)

    monkeypatch.setattr(text.os, "replace", another_rank_first)
    loaded = text_data(bpe_config(tmp_path)).tokenizer
    assert loaded.get_vocab() == winner.get_vocab()
    assert [p.name.startswith("bpe300-") for p in tokenizer_cache.iterdir()] == [True]


def test_local_tokenizer_folder(tmp_path):
    """A tokenizer saved with save_pretrained loads from its folder; this one is not byte-level (SentencePiece-like
    Metaspace pieces), so the blocks' bytes come from decoding: close to the truth, not exact."""
    docs = corpus(tmp_path)
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(docs["train"], trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>").save_pretrained(tmp_path / "saved")
    data = text_data(TextDataConfig(name=str(tmp_path / "corpus"), tokenizer=str(tmp_path / "saved"),
                                    context_length=16, max_eval_blocks=None))
    assert data.tokenizer.decode(data.tokenizer("café quokka")["input_ids"]) == "café quokka"
    assert data.vocab_size == backend.get_vocab_size() and token_byte_lengths(data.tokenizer) is None
    # the training split's bytes per token, from the whole documents, against the blocks' targets
    tokens = sum(len(data.tokenizer(doc, add_special_tokens=False)["input_ids"]) + 1 for doc in docs["train"])
    true_bytes_per_token = sum(len(doc.encode()) + 1 for doc in docs["train"]) / tokens
    bytes_per_token = data.splits["train"][:]["bytes"].double().mean().item() / 16
    assert bytes_per_token == pytest.approx(true_bytes_per_token, rel=0.05)


def test_bad_tokenizer_choices_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="'nowhere' is neither `bytes`, `bpe` nor an existing folder"):
        TextDataConfig(tokenizer="nowhere")
    with pytest.raises(ConfigError, match="vocab_size must be at least 257"):
        TextDataConfig(tokenizer="bpe", vocab_size=256)
    corpus(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no tokenizer could be loaded from this folder"):
        text_data(TextDataConfig(name=str(tmp_path / "corpus"), tokenizer=str(tmp_path / "empty")))
    backend = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path / "no_eos")
    with pytest.raises(ConfigError, match="has no eos token.*eos_token"):
        text_data(TextDataConfig(name=str(tmp_path / "corpus"), tokenizer=str(tmp_path / "no_eos")))


def test_bits_per_byte_of_uniform_logits(tmp_path):
    """Uniform logits over V tokens cost T ln V nats per block: bits per byte = blocks * T * log2 V / bytes."""
    corpus(tmp_path)
    data = text_data(bpe_config(tmp_path, eval_batch_size=5))
    task = LanguageModelTask()
    outputs = [task.eval_outputs(torch.zeros(len(batch["input_ids"]), 16, data.vocab_size), batch)
               for batch in data.loaders["validation"]]
    metrics = task.compute_metrics({key: torch.cat([out[key] for out in outputs]) for key in outputs[0]})
    blocks, total_bytes = len(data.splits["validation"]), data.splits["validation"][:]["bytes"].sum().item()
    assert metrics["loss"] == pytest.approx(math.log(data.vocab_size))
    assert metrics["bits_per_byte"] == pytest.approx(blocks * 16 * math.log2(data.vocab_size) / total_bytes)


def test_unigram_bits_per_byte_of_bpe(tmp_path):
    docs = corpus(tmp_path)
    data = text_data(bpe_config(tmp_path))
    counts = np.bincount(data.splits["train"][:]["input_ids"].flatten().numpy(), minlength=data.vocab_size)
    # each token's bytes by hand: its text decoded alone (the training text is ASCII but for é: check the é tokens)
    token_bytes = np.array([len(data.tokenizer.decode([t]).encode()) for t in range(data.vocab_size)])
    token_bytes[data.tokenizer.eos_token_id] = 1
    assert "é" in "".join(docs["train"]) and token_bytes[data.tokenizer.convert_tokens_to_ids("Ã©")] == 2
    p = counts[counts > 0] / counts.sum()
    expected = -(counts[counts > 0] * np.log2(p)).sum() / (counts * token_bytes).sum()
    assert data.unigram_bits_per_byte() == pytest.approx(expected)
