"""Checkpoint after every round and resume a killed run from its last finished round.

The checkpoint holds what the next round needs to go on exactly as if nothing happened: the
strategy's state (server model, optimizer, upload buffer, registry, RNG states, records), the
global arrays, Flower's `Result` so far and the run-config. It is written atomically (a
temporary file, then a rename), so a kill during the write leaves the previous one intact.
The nodes keep their own state (client_app.py); the server tells them which run's state to
continue with (`run-key`).

A checkpoint is read with `torch.load(weights_only=True)`: resume-from names a folder, and a
file in it may have been replaced by anyone who could write there; a full unpickler would run
whatever code a crafted file carries, inside the ServerApp. So everything is stored as tensors
and plain containers: numpy arrays (recorded images, uploads, global arrays) travel as
`{NP_TAG: tensor}` and numpy scalars as Python numbers. A file that cannot be read this way -
truncated, corrupt, crafted, or not this project's - is one `CheckpointError` line naming the
file and what to do, not a traceback.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Result

FILE = "checkpoint.pt"
NP_TAG = "__numpy__"  # {NP_TAG: tensor}: a numpy array stored as a tensor (weights_only can read it)
_RESULT_KEYS = ("train_metrics_clientapp", "evaluate_metrics_clientapp", "evaluate_metrics_serverapp")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message is one line naming the file and the fix."""


def to_safe(obj: Any) -> Any:
    """`obj` with numpy arrays and scalars replaced by what `weights_only=True` loads."""
    if isinstance(obj, np.ndarray):
        return {NP_TAG: torch.from_numpy(np.ascontiguousarray(obj).copy())}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [to_safe(v) for v in obj]
        return tuple(out) if isinstance(obj, tuple) else out
    return obj


def from_safe(obj: Any) -> Any:
    """`to_safe` undone: numpy arrays back where they were."""
    if isinstance(obj, dict):
        if set(obj) == {NP_TAG} and isinstance(obj[NP_TAG], torch.Tensor):
            return obj[NP_TAG].numpy()
        return {k: from_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [from_safe(v) for v in obj]
        return tuple(out) if isinstance(obj, tuple) else out
    return obj


def _why(exc: Exception) -> str:
    """torch.load's error in a few words (its own text advises weights_only=False: never here)."""
    text = " ".join(str(exc).split())
    m = re.search(r"[Uu]nsupported (?:GLOBAL|global:? GLOBAL) ([\w.]+)", text)
    if m:
        return (f"it needs {m.group(1)} to load, which only an unpickler that runs code could do: a crafted file, "
                f"or a checkpoint of a collafuse-flwr older than its weights-only format")
    return f"{type(exc).__name__}: {text.split('. ')[0][:160]}: it is truncated, corrupt or not this project's"


def _arrays(rec: ArrayRecord | None) -> dict[str, np.ndarray] | None:
    return None if rec is None else {k: a.numpy() for k, a in rec.items()}


def save_checkpoint(run_dir: Path, strategy, server_round: int, arrays: ArrayRecord, result: Result,
                    config: dict[str, Any], run_key: int) -> Path:
    blob = {"round": server_round, "config": config, "run_key": run_key, "strategy": strategy.state_dict(),
            "arrays": _arrays(arrays),
            "result": {"arrays": _arrays(result.arrays),
                       **{name: {r: dict(m) for r, m in getattr(result, name).items()} for name in _RESULT_KEYS}}}
    path = Path(run_dir) / FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(to_safe(blob), tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The checkpoint of `run_dir`, with `arrays` and `result` as Flower objects again.

    Raises CheckpointError (one line) when the file is missing, unreadable or not a checkpoint
    of this project; nothing in the file is executed."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        raise CheckpointError(f"resume-from={str(run_dir)!r} has no {FILE}: point it at the run folder of a "
                              f"run that finished at least one round")
    fix = "resume from another run folder or start afresh (without resume-from)"
    try:
        blob = from_safe(torch.load(path, weights_only=True, map_location="cpu"))
    except Exception as exc:  # noqa: BLE001 - any reason the file cannot be read says the same to the user
        raise CheckpointError(f"resume-from={str(run_dir)!r}: {path.name} cannot be read ({_why(exc)}); {fix}") from None
    try:
        to_rec = lambda d: None if d is None else ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in d.items()})  # noqa: E731
        result = Result()
        result.arrays = to_rec(blob["result"]["arrays"])
        for name in _RESULT_KEYS:
            getattr(result, name).update({r: MetricRecord(m) for r, m in blob["result"][name].items()})
        blob["arrays"] = to_rec(blob["arrays"]) or ArrayRecord()
        blob["result"] = result
        for key, typ in (("round", int), ("config", dict), ("strategy", dict)):
            if not isinstance(blob[key], typ):
                raise TypeError(f"'{key}' is a {type(blob[key]).__name__}")
        blob["run_key"]  # noqa: B018 - present
    except Exception as exc:  # noqa: BLE001 - a readable file without a checkpoint's content
        raise CheckpointError(f"resume-from={str(run_dir)!r}: {path.name} is not a checkpoint of this project "
                              f"({type(exc).__name__}: {str(exc)[:120]}); {fix}") from None
    return blob
