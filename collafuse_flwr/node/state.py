"""A node's private state for one run: its denoiser, optimizer and uploads, in memory and on disk.

The client denoiser and its optimizer must survive between rounds yet never leave the node.
Flower keeps `context.state` per node across a run's rounds (Ray actors are shared between
virtual nodes, so module globals are not safe); weights go in as an ArrayRecord, the optimizer's
nested state as torch-serialized bytes in a ConfigRecord.

`context.state` dies with the SuperNode process, so the same records are also written to a file
in the node's own state folder after every round (`persist`), and read back when a restarted
node or a resumed run finds `context.state` empty (`recover`). Two versions are kept, each tagged
with the round it finished: a run resumed from the server's last checkpoint re-sends a round the
node may already have trained, and the node then continues from the version before it, so the
resumed run computes what the uninterrupted one would have. Files are written atomically, 0600,
and read with `weights_only=True`; an unreadable one is set aside and the node starts that run's
model afresh (one warning naming the file), instead of failing every later round. The upload
caps that protect the data are not in these files when the node trusts nobody (`ledger.py`).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from collafuse_flwr.node.files import CorruptFile, load_tensors, save_tensors

MODEL_KEY = "private-denoiser"
OPTIM_KEY = "private-optimizer"
UPLOADS_KEY = "upload-history"  # indices of the last upload, and per-image counts of this run
META_KEY = "private-meta"  # the round these records finished
_BLOB, _ROUND, _INDICES, _COUNTS = "blob", "round", "indices", "counts"
_LOG = logging.getLogger("collafuse_flwr.node")


def save_private(state: RecordDict, model: nn.Module, optimizer: torch.optim.Optimizer, server_round: int) -> None:
    state[MODEL_KEY] = ArrayRecord(model.state_dict())
    buf = io.BytesIO()
    torch.save(optimizer.state_dict(), buf)
    state[OPTIM_KEY] = ConfigRecord({_BLOB: buf.getvalue()})
    state[META_KEY] = ConfigRecord({_ROUND: int(server_round)})


def restore_private(state: RecordDict, model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Load the node's model and optimizer if it has them; False on the node's first round."""
    if MODEL_KEY not in state.array_records:
        return False
    model.load_state_dict(state.array_records[MODEL_KEY].to_torch_state_dict())
    blob = state.config_records[OPTIM_KEY][_BLOB]
    optimizer.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True))  # type: ignore[arg-type]
    return True


def state_round(state: RecordDict) -> int:
    """The round the in-memory records finished (0: none)."""
    return int(state.config_records[META_KEY][_ROUND]) if META_KEY in state.config_records else 0


def remember_upload(state: RecordDict, indices: np.ndarray, num_train: int) -> None:
    """Which training images the last upload came from, and this run's count per image."""
    idx = np.asarray(indices, dtype=np.int64)
    counts = upload_counts(state, num_train)
    np.add.at(counts, idx, 1)
    state[UPLOADS_KEY] = ArrayRecord({_INDICES: Array(idx), _COUNTS: Array(counts)})


def upload_counts(state: RecordDict, num_train: int) -> np.ndarray:
    """This run's uploads of each training image (zeros before the first)."""
    if UPLOADS_KEY not in state.array_records:
        return np.zeros(num_train, dtype=np.int64)
    counts = state.array_records[UPLOADS_KEY][_COUNTS].numpy().copy()
    return counts if counts.shape == (num_train,) else np.zeros(num_train, dtype=np.int64)


def last_upload(state: RecordDict) -> np.ndarray | None:
    if UPLOADS_KEY not in state.array_records:
        return None
    return state.array_records[UPLOADS_KEY][_INDICES].numpy()


# -- on disk ----------------------------------------------------------------------------------------
def _previous(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def persist(state: RecordDict, path: Path) -> None:
    """Write the records to `path` (the last version moves to `<name>.prev`), atomically, 0600."""
    blob = {_ROUND: state_round(state),
            "records": {k: {n: torch.from_numpy(np.ascontiguousarray(a.numpy())) for n, a in state[k].items()}
                       for k in (MODEL_KEY, UPLOADS_KEY) if k in state.array_records},
            OPTIM_KEY: bytes(state.config_records[OPTIM_KEY][_BLOB]) if OPTIM_KEY in state.config_records else b""}
    if path.is_file():
        path.replace(_previous(path))
    save_tensors(path, blob)


def _load(path: Path) -> dict | None:
    try:
        blob = load_tensors(path, "the node's private state file", "it was set aside")
        if not isinstance(blob, dict) or _ROUND not in blob:
            raise CorruptFile(f"the node's private state file {path} has an unknown layout")
        return blob
    except CorruptFile as exc:
        bad = path.with_name(path.name + ".corrupt")
        path.replace(bad)
        _LOG.warning("%s; moved to %s, this run's private model starts afresh", exc, bad.name)
        return None


def recover(state: RecordDict, path: Path, server_round: int) -> int:
    """Fill `state` for round `server_round` from memory or the files; returns the round it holds.

    The version that finished round `server_round - 1` is preferred: a resumed run re-sends a round
    the node may have trained already. Otherwise the newest version before `server_round`, else
    nothing (the node's first round in this run)."""
    have = state_round(state)
    if MODEL_KEY in state.array_records and have < server_round:
        return have
    versions = [b for b in (_load(p) for p in (path, _previous(path)) if p.is_file()) if b is not None]
    usable = [b for b in versions if int(b[_ROUND]) < server_round]
    if not usable:
        return have if MODEL_KEY in state.array_records and have < server_round else _clear(state)
    blob = max(usable, key=lambda b: int(b[_ROUND]))
    _clear(state)
    for k, arrays in blob["records"].items():
        state[k] = ArrayRecord({n: Array(t.numpy()) for n, t in arrays.items()})
    if blob[OPTIM_KEY]:
        state[OPTIM_KEY] = ConfigRecord({_BLOB: blob[OPTIM_KEY]})
    state[META_KEY] = ConfigRecord({_ROUND: int(blob[_ROUND])})
    return int(blob[_ROUND])


def _clear(state: RecordDict) -> int:
    for k in (MODEL_KEY, OPTIM_KEY, UPLOADS_KEY, META_KEY):
        if k in state:
            del state[k]
    return 0


def discard(path: Path) -> None:
    """Remove both versions of a finished run's state."""
    for p in (path, _previous(path)):
        p.unlink(missing_ok=True)
