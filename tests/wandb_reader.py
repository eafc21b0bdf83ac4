"""Read back what a W&B offline run logged (wandb has no public reader for `run-*.wandb` files).

The file is a record log in LevelDB's log format: a 7-byte file header (":W&B", magic 0xBEE1, version 0), then
32 KiB blocks of chunks, each with a 7-byte header (CRC32 of type byte + data, little-endian length, type:
1 full, 2 first, 3 middle, 4 last). Chunks join into serialized `wandb_internal_pb2.Record` protobufs.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, records, pending = HEADER, [], b""
    while position + HEADER <= len(data):
        space_in_block = BLOCK - position % BLOCK
        if space_in_block < HEADER:  # the rest of the block is padding
            position += space_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[position:position + HEADER])
        chunk = data[position + HEADER:position + HEADER + length]
        if kind == 0 and length == 0:  # zero padding at the end of the file
            break
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"bad CRC at byte {position}"
        position += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def logged_history(path: str | Path) -> list[dict]:
    """Every `wandb.log` row of the run, as {key: value}."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def run_file(output_dir: str | Path) -> Path:
    """The one offline run file under output_dir/wandb (asserting there is exactly one run)."""
    runs = sorted(Path(output_dir, "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, f"expected exactly one W&B run under {output_dir}, found {runs}"
    return runs[0]


def finished_records(path: str | Path, timeout: float = 60) -> list[wandb_internal_pb2.Record]:
    """The records of a run that finished in this process: W&B's service writes the file after `finish()` returns,
    so wait for its `exit` record (the last one it writes)."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)
