import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from collafuse_flwr.config import load_defaults, preset  # noqa: E402

# Keep the suite's memoised partitions (collafuse_flwr/data/splits.py) out of the user's cache; set
# before any test runs so the Flower subprocesses of the end-to-end tests inherit it too.
os.environ["COLLAFUSE_FLWR_CACHE"] = tempfile.mkdtemp(prefix="collafuse-test-cache-")
atexit.register(shutil.rmtree, os.environ["COLLAFUSE_FLWR_CACHE"], ignore_errors=True)

#: A run-config small enough for unit tests: the tiny preset (collafuse_flwr/presets/tiny.toml).
TINY = preset("tiny")


@pytest.fixture
def tiny_config():
    def make(**overrides):
        return {**load_defaults(), **TINY, **{k.replace("_", "-"): v for k, v in overrides.items()}}
    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _node_state(tmp_path, monkeypatch):
    """Each test's nodes keep their secret and private state in the test's own folder, so no
    test recovers another's private model (the state files outlive a Context, by design)."""
    monkeypatch.setenv("COLLAFUSE_FLWR_CACHE", str(tmp_path / "cache"))
