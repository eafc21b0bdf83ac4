"""The GPU check cannot rot without a GPU: `tests/gpu/run.sh --dry-run` in this interpreter imports everything the
GPU run imports, parses every part's arguments with the parsers that will read them, builds a tiny Llama with each
attention implementation, and collects the gpu-marked tests (skipped: nothing runs). It needs neither CUDA nor the
wheels of .whl/ (git-ignored; tests/gpu/prepare.sh makes them for the GPU machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import ROOT


def test_gpu_run_dry_run(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no_wheels")}
    env.pop("OUT", None)
    out = tmp_path / "gpu_results.json"
    done = subprocess.run(["bash", str(ROOT / "tests" / "gpu" / "run.sh"), "--dry-run", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "| part | status |" in done.stdout  # the one table
    record = json.loads(out.read_text())
    assert record["dry_run"] and record["verdict"] == "all parts passed"
    tests = record["parts"]["tests"]
    assert tests["status"] == "collected and skipped"
    assert tests["counts"]["skipped"] >= 11 and tests["counts"]["passed"] == tests["counts"]["failed"] == 0
    assert {row[0] for row in tests["rows"]} >= {"test_recipe_on_one_gpu[fp16]", "test_recipe_on_one_gpu[fsdp]",
                                                 "test_recipe_on_one_gpu[bf16]"}
    assert {name: part["status"] for name, part in record["parts"].items() if name != "tests"} == {
        "llama": "checked", "bf16": "checked", "loop_parity": "checked", "attention": "checked"}
