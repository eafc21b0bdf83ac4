"""Text data for byte-level language models: any source -> document splits -> blocks of bytes -> DataLoaders.

Byte-level: every UTF-8 byte is a token (vocabulary 256, nothing to train or download). Documents are joined with a
0 byte (end of document) and cut into blocks of context_length + 1 bytes through `datasets.map`, the way HF's own
language-model examples group texts.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np
from torch.utils.data import DataLoader

from framework.data.loaders import make_loader
from framework.data.sources import check_sizes, load_source, make_splits
from framework.errors import ConfigError

END_OF_DOCUMENT = 0  # a byte that UTF-8 text does not contain


@dataclass
class TextDataConfig:
    """Text data: source, splits, context length and loaders."""

    name: str = "stdlib"
    """Source: `stdlib` (embedded: the Python standard library's own source files), a hub id (`wikitext`), a local
    folder or text files (`corpus/*.txt`, one document per file), or parquet/CSV/JSON files with a text column."""
    subset: str | None = None
    """The hub data set's configuration name (e.g. `wikitext-2-raw-v1`)."""
    text_column: str | None = None
    """Default: `text`, else the first string column."""
    context_length: int = 256
    """Tokens (bytes) the model sees at once; each block is context_length + 1 bytes."""
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

    def __post_init__(self) -> None:
        check_sizes("data", self.val_fraction, self.test_fraction,
                    {"context_length": self.context_length, "batch_size": self.batch_size,
                     "eval_batch_size": self.eval_batch_size, "max_eval_blocks": self.max_eval_blocks},
                    {"num_workers": self.num_workers})


@dataclass
class TextData:
    config: TextDataConfig
    splits: datasets.DatasetDict
    loaders: dict[str, DataLoader]

    def unigram_bits_per_byte(self) -> float:
        """Entropy of the training split's byte frequencies: the loss of a model that ignores context."""
        counts = np.zeros(256, dtype=np.int64)
        for start in range(0, len(self.splits["train"]), 4096):
            blocks = self.splits["train"][start:start + 4096]["input_ids"]
            counts += np.bincount(np.asarray(blocks, dtype=np.int64).ravel(), minlength=256)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log2(p)).sum())


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(tokens) -> str:
    return bytes(int(t) for t in tokens if int(t) != END_OF_DOCUMENT).decode("utf-8", errors="replace")


def byte_blocks(texts: list[str], block_length: int) -> list[list[int]]:
    """Join documents with END_OF_DOCUMENT and cut into full blocks (the tail shorter than a block is dropped)."""
    stream = [token for text in texts for token in (*encode(text), END_OF_DOCUMENT)]
    return [stream[i:i + block_length] for i in range(0, len(stream) - block_length + 1, block_length)]


def text_data(config: TextDataConfig, seed: int = 0) -> TextData:
    """Held-out splits by document, then blocks of context_length + 1 bytes as {"input_ids": (B, T + 1) long}."""
    loaded = load_source(config.name, config.subset, **_text_builder_kwargs(config.name))
    column = text_column(loaded["train"], config.text_column)
    splits = make_splits(loaded, config.val_fraction, config.test_fraction, config.split_seed)
    block_length = config.context_length + 1
    blocks = splits.map(lambda rows: {"input_ids": byte_blocks(rows[column], block_length)}, batched=True,
                        remove_columns=splits["train"].column_names, desc="bytes -> blocks")
    if any(len(split) == 0 for split in blocks.values()):
        raise ConfigError(f"a split has no full block of {block_length} bytes "
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
    return TextData(config, blocks, loaders)


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
