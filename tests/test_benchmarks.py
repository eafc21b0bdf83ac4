"""CI smoke of benchmarks/: every benchmark runs a few steps (`--smoke`), writes its JSON with the expected keys, and
its equality checks pass (a mismatch raises before any time is reported). No time is asserted: machines are noisy."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

RECORD_KEYS = {"benchmark", "machine", "args", "checks", "rows", "raw"}
ROW_KEYS = {"benchmark", "contender", "value", "unit", "low", "high", "ratio", "target", "met", "note"}


@pytest.fixture(autouse=True)
def keep_threads():
    """The benchmarks fix torch's thread count; the tests after these keep theirs."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def smoke(name: str, tmp_path: Path, *args: str) -> dict:
    module = importlib.import_module(name)
    out = tmp_path / f"{name}.json"
    record = module.main(["--smoke", "--out", str(out), *args])
    written = json.loads(out.read_text())
    assert RECORD_KEYS <= written.keys() and written["benchmark"] == name
    assert written["rows"] and all(ROW_KEYS == row.keys() for row in written["rows"])
    assert written["machine"]["cores"] and written["machine"]["cpu"]
    return record


def rows(record: dict) -> dict[str, dict]:
    return {row["contender"]: row for row in record["rows"]}


def test_loop_parity(tmp_path):
    record = smoke("loop_parity", tmp_path)
    checks = record["checks"]
    assert checks["b_c_bitwise_equal"]
    assert all(d == 0.0 for name, d in checks["max_abs_difference_to_b_after_timed_runs"].items()
               if not name.startswith("(d)"))
    assert {"(a) plain PyTorch", "(b) Accelerate", "(c) framework Trainer", "(d) Lightning Trainer",
            "(c) / (b)"} <= rows(record).keys()
    assert all(len(rounds) == 1 and rounds[0] for rounds in record["raw"]["step_seconds"].values())


def test_dispatch(tmp_path):
    record = smoke("dispatch", tmp_path)
    assert record["checks"]["same_weights"] == {0: 0.0, 4: 0.0, 16: 0.0}
    assert "per technique per step, hook calls alone (slope)" in rows(record)


def test_host_syncs(tmp_path):
    record = smoke("host_syncs", tmp_path)
    # Logging and the progress bar sync only on log steps, never in between.
    assert record["checks"]["no techniques, log_every 50 (default)"]["syncs_between_log_lines"] == 0
    assert record["checks"]["no techniques, log_every 10"]["syncs_between_log_lines"] == 0
    # The default doctor's reads ride in the log line's: no sync of its own, between log lines or on them.
    doctor, plain = record["raw"]["doctor (default techniques), log_every 50"], record["raw"]["no techniques, log_every 50 (default)"]
    assert doctor["syncs_on_steps_without_a_log_line"] == 0
    assert sum(doctor["per_step"]) == sum(plain["per_step"])
    counted = record["raw"]["no techniques, log_every 10"]
    assert sum(counted["per_step"]) == sum(counted["sites"].values()) > 0  # the log lines' syncs are found


def test_technique_prices(tmp_path):
    record = smoke("technique_prices", tmp_path)
    assert record["checks"]["ema_ops_per_update"] == {"_foreach_lerp_": 1, "_foreach_copy_": 1}
    assert rows(record)["ema: aten ops per update"]["met"]
    forwards = record["checks"]["forward_passes"]
    assert forwards["sam"][0] == 2 * forwards["no technique"][0]
    assert {"ema", "gradient_clipping", "gradient_centralization", "mixup", "cutmix", "label_smoothing",
            "stochastic_depth (drop path)", "lookahead", "sam"} <= rows(record).keys()


@pytest.mark.slow
def test_accumulation(tmp_path):
    record = smoke("accumulation", tmp_path)
    assert record["checks"]["weights_allclose"]
    assert record["checks"]["ddp_all_reduces_per_step"] and all(
        n == 1 for n in record["checks"]["ddp_all_reduces_per_step"])
    assert all(rank["world_size"] == 2 for rank in record["checks"]["ddp"])


def test_data_loading(tmp_path):
    record = smoke("data_loading", tmp_path)
    assert record["checks"]["same_batches"]
    for wait in record["checks"]["data_wait"].values():
        assert 0 <= wait["logged"] <= 1 and 0 <= wait["external"] <= 1


def test_time_to_accuracy(tmp_path):
    record = smoke("time_to_accuracy", tmp_path)
    accuracy = record["checks"]["accuracy"]
    assert set(accuracy) == {"image recipe (framework Trainer)", "plain Accelerate loop"}
    assert record["checks"]["svc_accuracy"] > 0.9  # the reference on the same split


@pytest.mark.slow
def test_sharding(tmp_path):
    record = smoke("sharding", tmp_path, "--backends", "zero3")  # DDP launches in test_accumulation
    # Byte counts are exact, not timings: the paper's formulas hold per rank.
    assert all(row["met"] for row in record["rows"]), record["rows"]


@pytest.mark.slow
def test_run_all_memory_benchmarks(tmp_path):
    """The memory issue's benchmarks inside the suite's table (tiny sizes), through run_all as `make bench` runs them;
    attention's includes the tiny Llama under each attn_implementation."""
    run_all = importlib.import_module("run_all")
    status = run_all.main(["--smoke", "--only", "attention", "checkpointing", "--results", str(tmp_path)])
    assert status == 0
    llama = json.loads((tmp_path / "attention.json").read_text())["llama"]
    peaks = {row["variant"]: row["peak_mb"] for row in llama["results"]}
    assert peaks.keys() == {"eager", "sdpa", "framework_chunked"}
    assert peaks["framework_chunked"] < peaks["eager"]  # counted allocations: exact, no noise to allow for
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {row["benchmark"] for row in summary["rows"]} == {"attention", "checkpointing"}
    assert (tmp_path / "summary.md").read_text().startswith("Measured ")
