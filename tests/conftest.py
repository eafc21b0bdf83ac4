from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py, tests/wandb_reader.py

from helpers import reset_accelerate  # noqa: E402

# Tests never reach W&B's servers.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process test starts with no Accelerator state left by the one before, and from the same torch seed
    (this torch build seeds itself at random, so an unseeded test would depend on the order tests run in)."""
    reset_accelerate()
    torch.manual_seed(0)
    yield
    reset_accelerate()


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """FRAMEWORK_CACHE in the test's own folder (image checks are cached by data fingerprint): no test sees another's
    cache. Opt-in: `pytestmark = pytest.mark.usefixtures("private_cache")`."""
    monkeypatch.setenv("FRAMEWORK_CACHE", str(tmp_path / "cache"))
