"""Text data for language models: any source -> document splits -> tokens -> blocks -> DataLoaders.

Tokenizers (`data.tokenizer`), each a `transformers.PreTrainedTokenizerFast` with an end-of-document (eos) token:
    bytes   every UTF-8 byte is a token, id = byte value, eos = 0 (vocabulary 256, nothing to train or download)
    bpe     a byte-level BPE of `data.vocab_size` tokens trained with the `tokenizers` library on the training split
            only; saved once under the `datasets` cache, keyed by the training split's fingerprint and the vocabulary
            size, and reused by later runs and by every rank
    FOLDER  a tokenizer saved there with `save_pretrained` (loaded with `local_files_only`: nothing is downloaded)

Documents are tokenized through `datasets.map`, each followed by the eos token, and cut into blocks of
context_length + 1 tokens, the way HF's own language-model examples group texts. Each block carries `bytes`: the UTF-8
bytes its targets (tokens 1..T) stand for, an eos counting 1, so that bits per byte compares models whatever their
tokenizer.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader

from framework.data.loaders import make_loader
from framework.data.sources import (check_sizes, held_out_splits, load_source, make_splits, stream_source,
                                    streams_from_files)
from framework.data.streaming import StreamingLoader, StreamingSplit, in_memory_stream, rank_and_world, rank_stream
from framework.errors import ConfigError

if TYPE_CHECKING:  # transformers costs ~2 s to import; image runs never need it
    from transformers import PreTrainedTokenizerFast

END_OF_DOCUMENT = 0  # the `bytes` tokenizer's eos id: a byte that text hardly ever holds (NUL)
BPE_END_OF_DOCUMENT = "<|endoftext|>"
TOKENIZERS = ("bytes", "bpe")


@dataclass
class TextDataConfig:
    """Text data: source, splits, tokenizer, context length and loaders."""

    name: str = "stdlib"
    """Source: `stdlib` (embedded: the Python standard library's own source files), a hub id (`wikitext`), a local
    folder or text files (`corpus/*.txt`, one document per file), or parquet/CSV/JSON files with a text column."""
    subset: str | None = None
    """The hub data set's configuration name (e.g. `wikitext-2-raw-v1`)."""
    text_column: str | None = None
    """Default: `text`, else the first string column."""
    tokenizer: str = "bytes"
    """`bytes` (each UTF-8 byte a token, vocabulary 256), `bpe` (a byte-level BPE of `vocab_size` tokens trained on
    the training split, cached on disk), or a local folder holding a tokenizer saved with `save_pretrained` (it needs
    an eos token)."""
    vocab_size: int = 4096
    """Tokens of the `bpe` tokenizer (at least 257: the 256 bytes and the eos token); unused by the others."""
    context_length: int = 256
    """Tokens the model sees at once; each block is context_length + 1 tokens."""
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    """Shares of the documents held out, used only for splits the source does not have."""
    split_seed: int = 0
    max_eval_blocks: int | None = 512
    """Evaluate on at most this many blocks of each held-out split (the first ones: the same every time)."""
    batch_size: int = 16
    eval_batch_size: int = 32
    num_workers: int | None = 0
    """Blocks are in memory already: 0 loads in the training process. None: from the machine's cores."""
    streaming: bool = False
    """Read the training documents as a stream (`datasets.IterableDataset`), tokenized and packed into blocks
    chunk by chunk: each process reads only its own part, and a resumed run continues exactly where it stopped
    (framework/data/streaming.py). The number of blocks is unknown before tokenizing, so a streaming run is defined
    by --max_steps. Local files are read by `load_dataset(..., streaming=True)` and need their own validation and
    test splits (read into memory); the `bpe` tokenizer, trained on the whole training split, needs in-memory data."""
    shuffle_buffer: int = 256
    """Streaming: documents read, packed and shuffled together (by the run's seed, the pass and the chunk)."""

    def __post_init__(self) -> None:
        check_sizes("data", self.val_fraction, self.test_fraction,
                    {"context_length": self.context_length, "batch_size": self.batch_size,
                     "eval_batch_size": self.eval_batch_size, "max_eval_blocks": self.max_eval_blocks,
                     "shuffle_buffer": self.shuffle_buffer},
                    {"num_workers": self.num_workers})
        if self.tokenizer not in TOKENIZERS and not Path(self.tokenizer).expanduser().is_dir():
            raise _unknown_tokenizer(self.tokenizer)
        if self.streaming and self.tokenizer == "bpe" and streams_from_files(self.name):
            raise ConfigError("data.streaming with data.tokenizer bpe: the BPE is trained on the whole training split, "
                              "which a stream never holds; use bytes, or a tokenizer folder trained beforehand.")
        if self.tokenizer == "bpe" and self.vocab_size < 257:
            raise ConfigError(f"data.vocab_size must be at least 257 for the bpe tokenizer (the 256 bytes and the "
                              f"end-of-document token), got {self.vocab_size}: pass --data.vocab_size 257 or more.")


@dataclass
class TextData:
    config: TextDataConfig
    splits: datasets.DatasetDict
    """Blocks: {"input_ids": context_length + 1 token ids, "bytes": UTF-8 bytes of the targets, "index"} (no
    "train" split when streaming)."""
    loaders: dict[str, DataLoader]
    tokenizer: PreTrainedTokenizerFast
    vocab_size: int
    """len(tokenizer): the model's input and output size."""

    def unigram_bits_per_byte(self) -> float:
        """The loss of a model that ignores context, in bits per byte: the training blocks' tokens, each costing
        -log2 of its frequency there, over the bytes they stand for. Exact for byte-level tokenizers; otherwise the
        bytes come from the blocks' `bytes` (per target token, applied to all tokens): a close estimate."""
        train = self.splits["train"] if "train" in self.splits else self.splits["validation"]  # streaming: held out
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        for start in range(0, len(train), 4096):
            blocks = np.asarray(train[start:start + 4096]["input_ids"], dtype=np.int64)
            counts += np.bincount(blocks.ravel(), minlength=self.vocab_size)
        seen = counts[counts > 0]
        bits = float(-(seen * np.log2(seen / counts.sum())).sum())
        token_bytes = token_byte_lengths(self.tokenizer)
        if token_bytes is not None:
            return bits / float((counts * token_bytes).sum())
        targets = len(train) * self.config.context_length
        return bits / (float(train[:]["bytes"].double().sum()) * counts.sum() / targets)


def encode(text: str) -> list[int]:
    """Byte-level ids (what the `bytes` tokenizer gives, without going through it)."""
    return list(text.encode("utf-8"))


def decode(tokens) -> str:
    return bytes(int(t) for t in tokens if int(t) != END_OF_DOCUMENT).decode("utf-8", errors="replace")


def pack(documents: Iterable[Sequence[int]], eos_id: int, block_length: int) -> np.ndarray:
    """Join token sequences, each followed by `eos_id`, and cut into full blocks: (blocks, block_length) int64 (the
    tail shorter than a block is dropped)."""
    pieces = [piece for ids in documents for piece in (np.asarray(ids, dtype=np.int64), [eos_id])]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return stream[:len(stream) // block_length * block_length].reshape(-1, block_length)


def byte_blocks(texts: list[str], block_length: int) -> list[list[int]]:
    """Byte-level blocks: documents joined with END_OF_DOCUMENT and cut into full blocks (tail dropped)."""
    return pack([encode(text) for text in texts], END_OF_DOCUMENT, block_length).tolist()


def bytes_tokenizer() -> PreTrainedTokenizerFast:
    """Byte b -> id b, with id 0 (byte NUL) the eos token: today's `encode` as a tokenizer. A BPE without merges over
    GPT-2's byte-to-unicode alphabet, so the ByteLevel pre-tokenizer and decoder map bytes to and from text."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    backend = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    # split_special_tokens: a text holding the eos's character (Ā) still gets its own bytes, never the eos id.
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=alphabet[END_OF_DOCUMENT],
                                   split_special_tokens=True)


def train_bpe(texts: Iterable[str] | Iterable[list[str]], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's pre-tokenization) of `vocab_size` tokens trained on `texts` (an iterator of strings
    or of lists of strings); the eos token is id 0."""
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_END_OF_DOCUMENT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=BPE_END_OF_DOCUMENT, split_special_tokens=True)


def bpe_tokenizer(train: datasets.Dataset, column: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """The BPE of `train[column]`, trained once and saved under the `datasets` cache; later runs and the other ranks
    load it. Processes building it at once each save to a folder of their own and rename it into place: the first
    wins, the others' identical copies are dropped."""
    from transformers import AutoTokenizer

    key = f"bpe{vocab_size}-{train._fingerprint}-{datasets.fingerprint.Hasher.hash(column)}"
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "framework_tokenizers" / key
    if not folder.is_dir():
        tokenizer = train_bpe((train[i:i + 1000][column] for i in range(0, len(train), 1000)), vocab_size)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(dir=folder.parent, prefix=f".{key}-")
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, folder)
        except OSError:  # another process renamed its copy into place first
            shutil.rmtree(staging, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_tokenizer(name: str, train: datasets.Dataset, column: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """`bytes`, `bpe` (trained on `train[column]`, cached) or a local folder holding a saved tokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if name == "bytes":
        return bytes_tokenizer()
    if name == "bpe":
        return bpe_tokenizer(train, column, vocab_size)
    if not Path(name).expanduser().is_dir():
        raise _unknown_tokenizer(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(Path(name).expanduser()), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"data.tokenizer {name!r}: no tokenizer could be loaded from this folder ({first_line}). "
                          "Save one there with tokenizer.save_pretrained(folder).") from error
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ConfigError(f"data.tokenizer {name!r} loads as {type(tokenizer).__name__}, not a fast tokenizer: save "
                          "it with a tokenizer.json (PreTrainedTokenizerFast.save_pretrained).")
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"data.tokenizer {name!r} has no eos token to end documents with: add one and save it "
                          "again, e.g. tokenizer.add_special_tokens({'eos_token': '<|endoftext|>'}); "
                          "tokenizer.save_pretrained(folder).")
    return tokenizer


def _unknown_tokenizer(name: str) -> ConfigError:
    return ConfigError(f"data.tokenizer {name!r} is neither `bytes`, `bpe` nor an existing folder: pass bytes, bpe, "
                       "or a folder holding a tokenizer saved with save_pretrained.")


def token_byte_lengths(tokenizer: PreTrainedTokenizerFast) -> np.ndarray | None:
    """The UTF-8 bytes each token id stands for (the eos: 1), for byte-level tokenizers (ByteLevel decoder, every
    vocabulary entry spelled in the byte alphabet); None for others, whose bytes depend on their neighbours."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if not isinstance(tokenizer.backend_tokenizer.decoder, decoders.ByteLevel):
        return None
    alphabet = set(bytes_to_unicode().values())
    added = {token.content for token in tokenizer.added_tokens_decoder.values()}
    lengths = np.zeros(len(tokenizer), dtype=np.int64)
    for token, index in tokenizer.get_vocab().items():
        if token in added:  # added tokens are matched as written, not spelled in the byte alphabet
            lengths[index] = len(token.encode("utf-8"))
        elif set(token) <= alphabet:
            lengths[index] = len(token)
        else:
            return None
    lengths[tokenizer.eos_token_id] = 1
    return lengths


def target_bytes(blocks: np.ndarray, tokenizer: PreTrainedTokenizerFast,
                 token_bytes: np.ndarray | None) -> np.ndarray:
    """The UTF-8 bytes of each block's targets (tokens 1..T), an eos counting 1: exact from `token_bytes`, else by
    decoding the targets document by document (an estimate: a token cut from its neighbours may decode differently,
    e.g. a leading space or part of a character)."""
    if token_bytes is not None:
        return token_bytes[blocks[:, 1:]].sum(axis=1)
    eos = tokenizer.eos_token_id
    counts = []
    for targets in blocks[:, 1:].tolist():
        pieces, piece = [], []
        for token in targets:
            if token == eos:
                pieces.append(piece)
                piece = []
            else:
                piece.append(token)
        texts = tokenizer.batch_decode([*pieces, piece], clean_up_tokenization_spaces=False)
        counts.append(sum(len(text.encode("utf-8")) for text in texts) + len(pieces))
    return np.asarray(counts, dtype=np.int64)


def text_data(config: TextDataConfig, seed: int = 0) -> TextData:
    """Held-out splits by document, then blocks of context_length + 1 tokens as
    {"input_ids": (B, T + 1) long, "bytes": (B,) long, "index": (B,) long}."""
    rank, world = rank_and_world()
    if config.streaming and streams_from_files(config.name):
        streams, _ = stream_source(config.name, config.subset, **_text_builder_kwargs(config.name))
        column = text_column(streams["train"], config.text_column)
        splits = held_out_splits(streams, config.name)
        tokenizer = load_tokenizer(config.tokenizer, splits["validation"], column, config.vocab_size)
        train_stream = rank_stream(streams["train"].select_columns([column]), rank, world)
    else:
        loaded = load_source(config.name, config.subset, **_text_builder_kwargs(config.name))
        column = text_column(loaded["train"], config.text_column)
        splits = make_splits(loaded, config.val_fraction, config.test_fraction, config.split_seed)
        tokenizer = load_tokenizer(config.tokenizer, splits["train"], column, config.vocab_size)
        if config.streaming:  # the same documents, the training ones read as a stream
            train_stream = in_memory_stream(splits["train"].select_columns([column]), rank, world)
            splits = datasets.DatasetDict({name: splits[name] for name in ("validation", "test")})
    token_bytes = token_byte_lengths(tokenizer)
    block_length = config.context_length + 1

    def to_blocks(rows: dict) -> dict:
        if config.tokenizer == "bytes":
            # The bytes tokenizer's ids are the UTF-8 bytes (tests/test_tokenizers.py checks it): reading them off
            # directly is tens of times faster than its Rust pipeline, which the default run would otherwise wait on.
            ids = [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in rows[column]]
        else:
            # split_special_tokens: a document's text never becomes a special token (a literal "</s>" stays text).
            ids = tokenizer(rows[column], add_special_tokens=False, split_special_tokens=True,
                            verbose=False)["input_ids"]
        blocks = pack(ids, tokenizer.eos_token_id, block_length)
        return {"input_ids": blocks, "bytes": target_bytes(blocks, tokenizer, token_bytes)}

    blocks = splits.map(to_blocks, batched=True, remove_columns=splits["validation"].column_names,
                        desc="tokens -> blocks",
                        cache_file_names=None if config.tokenizer == "bytes" else block_cache_files(splits, tokenizer,
                                                                                                    block_length))
    if any(len(split) == 0 for split in blocks.values()):
        raise ConfigError(f"a split has no full block of {block_length} tokens "
                          f"({ {k: len(v) for k, v in blocks.items()} }): lower data.context_length or add text.")
    if config.max_eval_blocks is not None:
        for split in ("validation", "test"):
            blocks[split] = blocks[split].select(range(min(len(blocks[split]), config.max_eval_blocks)))
    # Each block's index travels with its batch, so a report (nan_guard's loss spikes) can name the samples.
    blocks = blocks.map(lambda _, index: {"index": index}, with_indices=True, desc="block indices")
    blocks = blocks.with_format("torch")
    loaders = {
        split: make_loader(dataset, config.batch_size if split == "train" else config.eval_batch_size,
                           shuffle=split == "train", num_workers=config.num_workers,
                           seed=seed if split == "train" else None, drop_last=split == "train")
        for split, dataset in blocks.items()
    }
    if config.streaming:
        def prepare(rows: list[dict], first: int) -> list[dict]:
            packed = to_blocks({column: [row[column] for row in rows]})
            base = (first * world + rank) << 32  # unique over ranks and chunks (a chunk makes < 2^32 blocks)
            return [{"input_ids": torch.from_numpy(ids), "bytes": int(n), "index": base + j}
                    for j, (ids, n) in enumerate(zip(packed["input_ids"], packed["bytes"]))]

        split = StreamingSplit(train_stream, prepare, seed, config.shuffle_buffer)
        loaders["train"] = StreamingLoader(split, config.batch_size, torch.utils.data.default_collate, None)
    return TextData(config, blocks, loaders, tokenizer, len(tokenizer))


def block_cache_files(splits: datasets.DatasetDict, tokenizer: PreTrainedTokenizerFast, block_length: int
                      ) -> dict[str, str]:
    """Where a split's blocks are kept between runs, named by what they depend on (the split's fingerprint, the
    tokenizer's whole definition, the block length), so a later run, and every rank of a launch, reads them instead of
    tokenizing again (20 s for the embedded 12 MB with a BPE on 2 cores). `datasets` caches only data sets read from
    files by itself; the embedded ones live in memory. (Not for `bytes`: reading bytes off is faster than a cache.)"""
    tokens = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "framework_blocks"
    folder.mkdir(parents=True, exist_ok=True)
    return {name: str(folder / f"{split._fingerprint}-{tokens}-{block_length}.arrow") for name, split in splits.items()}


def text_column(dataset: datasets.Dataset, wanted: str | None) -> str:
    """`wanted`, else `text`, else the first string column."""
    strings = [name for name, feature in dataset.features.items()
               if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")]
    if wanted is not None and wanted not in dataset.column_names:
        raise ConfigError(f"data.text_column {wanted!r} is not a column of the data set; its columns: "
                          f"{dataset.column_names}.")
    if wanted is None and not strings:
        raise ConfigError(f"no text column among {dataset.column_names}: name it with data.text_column.")
    return wanted or ("text" if "text" in strings else strings[0])


def _text_builder_kwargs(name: str) -> dict:
    # Plain text files: one document per file (the default reads one document per line, which would cut code and
    # prose into unrelated lines).
    return {"sample_by": "document"} if name.endswith(".txt") else {}
