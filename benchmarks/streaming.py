"""Streaming data: resident memory independent of the corpus's size, and throughput against a raw `DataLoader`.

A corpus is generated in a temporary folder: ~1 GB of text (100 files of stdlib source cut into 100 kB documents)
and ~20k small PNGs (32×32, 10 class folders). Each is streamed through the framework's `StreamingLoader`
(framework/data/streaming.py: chunked shuffle, position tracking, packing or the image transform) in a fresh
process per measurement, reading 10% and then 100% of the files, and the peak RSS of the two is compared (target:
within 10%). Throughput: the same `IterableDataset` through the `StreamingLoader` and through a raw
`DataLoader(dataset, batch_size)` doing the same work per row (bytes -> packed blocks; PNG -> the training
transform) without shuffling or positions, interleaved rounds of `--batches` batches each, both in the training
process (target: ≥ 0.98×).

    .venv/bin/python benchmarks/streaming.py [--text_mb 1000] [--images 20000] [--rounds 3] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from itertools import islice
from pathlib import Path

import common  # noqa: F401  (threads and sys.path first)
import datasets
import numpy as np
import torch
from common import RESULTS, ROOT
from datasets.distributed import split_dataset_by_node
from PIL import Image

from framework.data.augment import train_pipeline
from framework.data.images import ImageBatchTransform
from framework.data.streaming import RankStream, StreamingLoader, StreamingSplit
from framework.data.text import END_OF_DOCUMENT, pack

MEMORY_TARGET, THROUGHPUT_TARGET = 0.10, 0.98
BLOCK, TEXT_BATCH, IMAGE_BATCH = 257, 16, 64
BUFFER = {"text": 32, "images": 256}  # rows read, packed and shuffled together: 32 documents are ~3 MB of text


def make_text(folder: Path, megabytes: int, files: int = 100) -> list[str]:
    """`files` text files of megabytes / files MB each, cut from the stdlib's source at seeded offsets."""
    source = "".join(path.read_text(errors="replace") for path in
                     sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:200])
    folder.mkdir(parents=True, exist_ok=True)
    size, rng, paths = megabytes * 2 ** 20 // files, random.Random(0), []
    for index in range(files):
        path = folder / f"part-{index:04d}.txt"
        pieces, written = [], 0
        while written < size:
            start = rng.randrange(len(source) - 100_000)
            # 100 kB documents without blank lines inside, a blank line between them (the text builder's paragraphs)
            pieces.append(source[start:start + 100_000].replace("\n\n", "\n") + "\n\n")
            written += 100_002
        path.write_text("".join(pieces))
        paths.append(str(path))
    return paths


def make_images(folder: Path, count: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        label = index % 10
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        path = folder / str(label) / f"{index:06d}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def text_stream(paths: list[str]) -> datasets.IterableDataset:
    # One document per paragraph run: the text builder's "paragraph" mode splits on blank lines.
    return datasets.load_dataset("text", data_files=paths, sample_by="paragraph", streaming=True, split="train")


def image_stream(paths: list[str]) -> datasets.IterableDataset:
    return datasets.load_dataset("imagefolder", data_files=paths, streaming=True, split="train").cast_column(
        "image", datasets.Image(decode=False))


def packed(texts: list[str]) -> np.ndarray:
    """Byte-level blocks of BLOCK tokens, as the `bytes` tokenizer's path packs them."""
    return pack([np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts], END_OF_DOCUMENT, BLOCK)


def text_blocks(rows: list[dict]) -> list[torch.Tensor]:
    return list(torch.from_numpy(packed([row["text"] for row in rows])))


def image_collate():
    transform = ImageBatchTransform(lambda size: train_pipeline(size, {}, [0.5] * 3, [0.25] * 3), 32, "image",
                                    "label", "RGB", seed=0)
    decoder = datasets.Image()

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        images = [decoder.decode_example(row["image"]) for row in rows]
        columns = transform({"image": images, "label": [row["label"] for row in rows]}, list(range(len(rows))))
        return torch.utils.data.default_collate([dict(zip(columns, v)) for v in zip(*columns.values())])

    return collate


def framework_loader(kind: str, paths: list[str]) -> StreamingLoader:
    # Opened once, as the raw loader's is (listing 20k files costs seconds); each pass takes a fresh view of it.
    source = text_stream(paths) if kind == "text" else image_stream(paths)
    stream = RankStream(lambda: split_dataset_by_node(source, 0, 1), None)
    if kind == "text":
        split = StreamingSplit(stream, lambda rows, first: text_blocks(rows), 0, BUFFER["text"])
        return StreamingLoader(split, TEXT_BATCH, torch.stack, None)
    split = StreamingSplit(stream, lambda rows, first: rows, 0, BUFFER["images"])
    return StreamingLoader(split, IMAGE_BATCH, image_collate(), None)


def raw_loader(kind: str, paths: list[str]) -> torch.utils.data.DataLoader:
    if kind == "text":  # the same packing, per run of BUFFER documents, through datasets' own batched map
        blocks = text_stream(paths).map(lambda rows: {"ids": packed(rows["text"])},
                                        batched=True, batch_size=BUFFER["text"], remove_columns=["text"])
        blocks = blocks.with_format("torch")
        return torch.utils.data.DataLoader(blocks, batch_size=TEXT_BATCH, collate_fn=lambda rows: torch.stack(
            [row["ids"] for row in rows]))
    return torch.utils.data.DataLoader(image_stream(paths), batch_size=IMAGE_BATCH, collate_fn=image_collate())


def peak_rss(kind: str, paths_file: str, fraction: float) -> None:
    """In a fresh process: stream `fraction` of the files to their end through the framework's loader; print
    {"rss_mb", "batches", "seconds"}."""
    paths = json.loads(Path(paths_file).read_text())
    paths = paths[:max(1, round(len(paths) * fraction))]
    started, batches = time.perf_counter(), 0
    loader = framework_loader(kind, paths)
    for _ in loader:
        batches += 1
        if loader.passes:  # one pass over the files
            break
    print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "batches": batches,
                      "seconds": time.perf_counter() - started}))


def throughput(kind: str, paths: list[str], batches: int, rounds: int) -> dict[str, float]:
    """Samples per second of the first `batches` batches, raw and framework interleaved; the paired ratio."""
    ratios, speeds = [], {"raw": [], "framework": []}
    size = TEXT_BATCH if kind == "text" else IMAGE_BATCH
    for _ in range(rounds):
        seconds = {}
        for name, make in (("raw", raw_loader), ("framework", framework_loader)):
            loader = make(kind, paths)
            started = time.perf_counter()
            count = sum(1 for _ in islice(loader, batches))
            seconds[name] = time.perf_counter() - started
            common.check(count == batches, f"{name} gave {count} of {batches} batches")
            speeds[name].append(batches * size / seconds[name])
        ratios.append(seconds["raw"] / seconds["framework"])
    return {"raw_samples_per_s": statistics.median(speeds["raw"]),
            "framework_samples_per_s": statistics.median(speeds["framework"]),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text_mb", type=int, default=1000)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--kinds", nargs="+", default=["text", "images"], choices=["text", "images"])
    parser.add_argument("--smoke", action="store_true", help="20 MB of text, 1000 images, 1 round of 10 batches")
    parser.add_argument("--rss", nargs=3, metavar=("KIND", "PATHS", "FRACTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss:
        return peak_rss(args.rss[0], args.rss[1], float(args.rss[2]))
    if args.smoke:
        args.text_mb, args.images, args.rounds, args.batches = 20, 1000, 1, 10
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        make = {"text": lambda: make_text(Path(folder) / "text", args.text_mb),
                "images": lambda: make_images(Path(folder) / "images", args.images)}
        corpora = {kind: make[kind]() for kind in args.kinds}
        for kind, paths in corpora.items():
            listing = Path(folder) / f"{kind}.json"
            listing.write_text(json.dumps(paths))
            memory = {}
            for fraction in (0.1, 1.0):
                out = subprocess.run([sys.executable, __file__, "--rss", kind, str(listing), str(fraction)],
                                     capture_output=True, text=True, check=True, cwd=ROOT)
                memory[fraction] = json.loads(out.stdout.strip().splitlines()[-1])
            results[kind] = {"rss_10_mb": memory[0.1]["rss_mb"], "rss_100_mb": memory[1.0]["rss_mb"],
                             "rss_growth": memory[1.0]["rss_mb"] / memory[0.1]["rss_mb"] - 1,
                             "seconds_100": memory[1.0]["seconds"], "batches_100": memory[1.0]["batches"],
                             **throughput(kind, paths, args.batches, args.rounds)}
    size = {"text": f"{args.text_mb} MB text", "images": f"{args.images} PNGs"}
    print("| corpus | peak RSS 10% | peak RSS 100% | growth (target ≤ 10%) | raw samples/s | framework samples/s "
          "| ratio (target ≥ 0.98×) |")
    print("|---|---|---|---|---|---|---|")
    for kind, r in results.items():
        print(f"| {size[kind]} | {r['rss_10_mb']:.0f} MB | {r['rss_100_mb']:.0f} MB | {r['rss_growth']:+.1%} "
              f"| {r['raw_samples_per_s']:.0f} | {r['framework_samples_per_s']:.0f} | {r['ratio']:.3f}× "
              f"({r['ratio_min']:.3f}-{r['ratio_max']:.3f}) |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"streaming{'_smoke' if args.smoke else ''}_{'_'.join(args.kinds)}.json").write_text(
        json.dumps({"args": vars(args), "results": results,
                    "targets": {"rss_growth": MEMORY_TARGET, "ratio": THROUGHPUT_TARGET}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
