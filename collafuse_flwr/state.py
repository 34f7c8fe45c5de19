"""Per-client private state: Flower's `context.state`, and a node-local file that outlives it.

The client denoiser and its optimizer must survive between rounds yet never leave the node.
Flower keeps `context.state` per node across rounds (Ray actors are shared between virtual
nodes, so module globals are not safe); weights go in as an ArrayRecord, the optimizer's nested
state as torch-serialized bytes in a ConfigRecord.

`context.state` dies with the SuperNode process. A restarted node would silently start from a
fresh denoiser and forget how often each image was uploaded (so its epsilon would be wrong).
`persist`/`recover` keep the same records in a file under the node's own state folder, written
atomically after every round, and load it when `context.state` is empty.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from torch import nn

MODEL_KEY = "private-denoiser"
OPTIM_KEY = "private-optimizer"
LAST_UPLOAD_KEY = "last-upload"


def save_private(state: RecordDict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    state[MODEL_KEY] = ArrayRecord(model.state_dict())
    buf = io.BytesIO()
    torch.save(optimizer.state_dict(), buf)
    state[OPTIM_KEY] = ConfigRecord({"blob": buf.getvalue()})


def restore_private(state: RecordDict, model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Load the node's model and optimizer if it has them; False on the node's first round."""
    if MODEL_KEY not in state.array_records:
        return False
    model.load_state_dict(state.array_records[MODEL_KEY].to_torch_state_dict())
    blob = state.config_records[OPTIM_KEY]["blob"]
    optimizer.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True))
    return True


def remember_upload(state: RecordDict, indices: np.ndarray, num_train: int) -> None:
    """Which training images the last upload came from, and how often each image was uploaded.

    Only the measurement harness reads these (disclosure scoring and the privacy accountant).
    """
    idx = np.asarray(indices, dtype=np.int64)
    counts = upload_counts(state, num_train)
    np.add.at(counts, idx, 1)
    state[LAST_UPLOAD_KEY] = ArrayRecord({"indices": Array(idx), "counts": Array(counts)})


def upload_counts(state: RecordDict, num_train: int) -> np.ndarray:
    if LAST_UPLOAD_KEY not in state.array_records:
        return np.zeros(num_train, dtype=np.int64)
    return state.array_records[LAST_UPLOAD_KEY]["counts"].numpy().copy()


def last_upload(state: RecordDict) -> np.ndarray | None:
    if LAST_UPLOAD_KEY not in state.array_records:
        return None
    return state.array_records[LAST_UPLOAD_KEY]["indices"].numpy()


def persist(state: RecordDict, path: Path) -> None:
    """Write the node's private records to `path` atomically (tmp file + rename)."""
    records = {k: v for k, v in state.items() if k in (MODEL_KEY, OPTIM_KEY, LAST_UPLOAD_KEY)}
    blob = {
        "arrays": {k: {n: a.numpy() for n, a in v.items()} for k, v in records.items() if isinstance(v, ArrayRecord)},
        "configs": {k: dict(v) for k, v in records.items() if isinstance(v, ConfigRecord)},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def recover(state: RecordDict, path: Path) -> bool:
    """Fill an empty `context.state` from `path` (after a node restart); False if nothing to load."""
    if MODEL_KEY in state.array_records or not path.is_file():
        return False
    blob = torch.load(path, weights_only=False)
    for k, arrays in blob["arrays"].items():
        state[k] = ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in arrays.items()})
    for k, conf in blob["configs"].items():
        state[k] = ConfigRecord(conf)
    return True
