"""A node's private state for one run: its denoiser, optimizer and uploads, in memory and on disk.

`context.state` holds it between rounds (Ray actors are shared, so no module globals), and a file in
the state folder after every round, for a restarted node or a resumed run. Two versions are kept: a
resumed run re-sends a round the node may have trained. An unreadable file is set aside (one warning).
"""

import io
import json
import logging
import secrets
import shutil
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from collafuse_flwr.node.files import write_private

MODEL_KEY = "private-denoiser"
OPTIM_KEY = "private-optimizer"
UPLOADS_KEY = "upload-history"  # indices of the last upload, and per-image counts of this run
META_KEY = "private-meta"  # the round these records finished
_BLOB, _ROUND, _INDICES, _COUNTS, _ID, _IDS = "blob", "round", "indices", "counts", "id", "ids"
SCORED_KEY = "harness-scored"  # ids of this run's uploads whose reconstructions were scored
RUNS_KEPT = 4  # run folders a deployed node's state folder keeps, the newest
_LOG = logging.getLogger("collafuse_flwr.node")


def save_private(state: RecordDict, model: nn.Module, optimizer: torch.optim.Optimizer, server_round: int) -> None:
    state[MODEL_KEY] = ArrayRecord(model.state_dict())
    buf = io.BytesIO()
    torch.save(optimizer.state_dict(), buf)
    state[OPTIM_KEY] = ConfigRecord({_BLOB: buf.getvalue()})
    state[META_KEY] = ConfigRecord({_ROUND: int(server_round)})


def restore_private(state: RecordDict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    if MODEL_KEY in state.array_records:
        model.load_state_dict(state.array_records[MODEL_KEY].to_torch_state_dict())
        blob = state.config_records[OPTIM_KEY][_BLOB]
        optimizer.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True))  # type: ignore[arg-type]


def state_round(state: RecordDict) -> int:
    return int(state.config_records[META_KEY][_ROUND]) if META_KEY in state.config_records else 0


def remember_upload(state: RecordDict, indices: np.ndarray, num_train: int) -> None:
    idx = np.asarray(indices, dtype=np.int64)
    counts = upload_counts(state, num_train)
    np.add.at(counts, idx, 1)
    # a random id: a redone round's upload (a resumed run) is a new upload, scored once again
    state[UPLOADS_KEY] = ArrayRecord({_INDICES: Array(idx), _COUNTS: Array(counts),
                                      _ID: Array(np.array([secrets.randbits(62)], dtype=np.int64))})


def upload_counts(state: RecordDict, num_train: int) -> np.ndarray:
    """This run's uploads of each training image (zeros before the first)."""
    if UPLOADS_KEY not in state.array_records:
        return np.zeros(num_train, dtype=np.int64)
    counts = state.array_records[UPLOADS_KEY][_COUNTS].numpy().copy()
    return counts if counts.shape == (num_train,) else np.zeros(num_train, dtype=np.int64)


def last_upload(state: RecordDict) -> np.ndarray | None:
    return state.array_records[UPLOADS_KEY][_INDICES].numpy() if UPLOADS_KEY in state.array_records else None


def first_scoring(state: RecordDict, path: Path) -> bool:
    """Whether the last upload's reconstructions may be scored: once per upload, by its random id,
    kept in `state` (the Flower run's memory, whatever run key a message names) and in `path` (across
    restarts and runs) before any score leaves. Scores of crafted reconstructions, asked for again and
    again, would solve the uploaded images pixel by pixel (mean PSNR against x0 +- d e_k)."""
    rec = state.array_records[UPLOADS_KEY]
    if _ID not in rec:  # a state file written before uploads had ids
        rec[_ID] = Array(np.array([secrets.randbits(62)], dtype=np.int64))
    upload = int(rec[_ID].numpy()[0])
    seen = set(state.config_records[SCORED_KEY][_IDS]) if SCORED_KEY in state.config_records else set()
    try:
        done = {int(u) for u in json.loads(path.read_text(encoding="utf-8"))} if path.is_file() else set()
    except (OSError, ValueError, TypeError):  # unreadable: the memory still holds this run's
        done = set()
    if upload in seen | done:
        return False
    state[SCORED_KEY] = ConfigRecord({_IDS: sorted(seen | {upload})})
    write_private(path, json.dumps(sorted(done | {upload})).encode())
    return True


def prune_runs(path: Path, keep: int = RUNS_KEPT) -> None:
    """Before a run's first file: all but the newest `keep` - 1 other run folders beside it go, so a server
    that invents run keys (2^64 of them) cannot fill the node's disk with private models."""
    if path.parent.exists():
        return

    def age(d: Path) -> float:
        try:
            return d.stat().st_mtime
        except OSError:  # removed meanwhile by another worker of this node
            return 0.0

    runs = sorted((d for d in path.parent.parent.glob("run-*") if d.is_dir()), key=age, reverse=True)
    for old in runs[keep - 1:]:  # only the server that started the runs can invent keys: its own runs go
        _LOG.warning("the node keeps the state of its newest %d runs; removing %s", keep, old.name)
        shutil.rmtree(old, ignore_errors=True)


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
    buf = io.BytesIO()
    torch.save(blob, buf)
    write_private(path, buf.getvalue())


def _load(path: Path) -> dict | None:
    """A saved version, or None where it cannot be read (set aside, with one warning)."""
    try:  # weights_only: a crafted pickle raises here instead of running code
        blob = torch.load(path, weights_only=True, map_location="cpu")
        if not isinstance(blob, dict) or _ROUND not in blob:
            raise ValueError("unknown layout")
        return blob
    except Exception as exc:  # noqa: BLE001 - truncated, crafted or foreign: all mean "unreadable"
        bad = path.with_name(path.name + ".corrupt")
        path.replace(bad)
        _LOG.warning("the node's private state file %s cannot be read (%s: %s); moved to %s, this run's private "
                     "model starts afresh", path, type(exc).__name__, str(exc).splitlines()[0][:160] if str(exc)
                     else "no detail", bad.name)
        return None


def recover(state: RecordDict, path: Path, server_round: int) -> None:
    """Fill `state` for round `server_round` from memory or the files (the newest version before it, else nothing)."""
    if MODEL_KEY in state.array_records and state_round(state) < server_round:
        return
    versions = [b for b in (_load(p) for p in (path, _previous(path)) if p.is_file()) if b is not None]
    usable = [b for b in versions if int(b[_ROUND]) < server_round]
    for k in (MODEL_KEY, OPTIM_KEY, UPLOADS_KEY, META_KEY):
        state.pop(k, None)
    if not usable:
        return
    blob = max(usable, key=lambda b: int(b[_ROUND]))
    for k, arrays in blob["records"].items():
        state[k] = ArrayRecord({n: Array(t.numpy()) for n, t in arrays.items()})
    if blob[OPTIM_KEY]:
        state[OPTIM_KEY] = ConfigRecord({_BLOB: blob[OPTIM_KEY]})
    state[META_KEY] = ConfigRecord({_ROUND: int(blob[_ROUND])})


def discard(path: Path) -> None:
    """Remove both versions of a finished run's state."""
    for p in (path, _previous(path)):
        p.unlink(missing_ok=True)
