"""Per-client index sets, memoised on disk: every Ray worker and the ServerApp partition the same
dataset, and partitioning imports flwr-datasets (2-3 s per worker start). The key hashes everything a
partition depends on (never the images, which no scheme reads); entries are written atomically, an
unreadable one is recomputed. In $COLLAFUSE_FLWR_CACHE (default ~/.cache/collafuse-flwr; "off": none)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from collafuse_flwr.data.dataset import ImageDataset

CACHE_ENV = "COLLAFUSE_FLWR_CACHE"
# Bump when partition.py changes how it assigns images, so older entries stop matching.
ALGORITHM_VERSION = 1


@dataclass(frozen=True)
class ClientSplit:
    client_id: int
    train_idx: np.ndarray
    test_idx: np.ndarray


def cache_dir() -> Path | None:
    """Where memoised partitions go; None when the memo is switched off."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in ("off", "0", "none", "false"):
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "collafuse-flwr"


def split_key(ds: ImageDataset, num_clients: int, params: dict[str, object]) -> str:
    """A digest of everything a partition depends on (see the module docstring)."""
    h = hashlib.sha256()
    meta = {"algorithm": ALGORITHM_VERSION, "flwr-datasets": metadata.version("flwr-datasets"),  # both required
            "datasets": metadata.version("datasets"), "dataset": ds.name, "n": len(ds),
            "class_names": list(ds.class_names), "attribute_names": list(ds.attribute_names or []),
            "num_clients": int(num_clients), "params": params}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(ds.labels.numpy(), dtype=np.int64).tobytes())
    if ds.attributes is not None:
        h.update(np.ascontiguousarray(ds.attributes.numpy()).tobytes())
    return h.hexdigest()[:32]


def memoised_splits(ds: ImageDataset, num_clients: int, params: dict[str, object],
                    compute: Callable[[], Sequence[ClientSplit]]) -> list[ClientSplit]:
    """compute() once per distinct input; later calls (any process) read the stored result."""
    root = cache_dir()
    if root is None:
        return list(compute())
    path = root / "splits" / f"{split_key(ds, num_clients, params)}.npz"
    try:
        with np.load(path) as z:
            return [ClientSplit(k, z[f"train_{k}"].astype(np.int64), z[f"test_{k}"].astype(np.int64))
                    for k in range(num_clients)]
    except (OSError, KeyError, ValueError):  # absent, truncated or from another layout: recompute
        pass
    splits = list(compute())
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{f"{part}_{s.client_id}": idx for s in splits
                           for part, idx in (("train", s.train_idx), ("test", s.test_idx))})
        os.replace(tmp, path)  # readers see the old file or the whole new one, never half
    except OSError:  # a read-only cache must not fail a run: the memo is only a shortcut
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return splits
