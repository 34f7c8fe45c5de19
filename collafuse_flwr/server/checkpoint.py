"""Checkpoint after every round (strategy state, global arrays, Flower's `Result`, run-config; written
atomically) and resume a killed run from its last finished round. Read with `torch.load(weights_only=True)`:
anyone who could write to resume-from could plant a file there, and a full unpickler would run its code in
the ServerApp; so it holds only tensors and plain containers (numpy arrays as `{NP_TAG: tensor}`), and a
file that cannot be read so is one `CheckpointError` line naming the file and the fix, not a traceback."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Result

FILE = "checkpoint.pt"
_FIX = "resume from another run folder or start afresh (without resume-from)"
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
    return type(obj)(to_safe(v) for v in obj) if isinstance(obj, (list, tuple)) else obj


def from_safe(obj: Any) -> Any:
    """`to_safe` undone: numpy arrays back where they were."""
    if isinstance(obj, dict) and set(obj) == {NP_TAG} and isinstance(obj[NP_TAG], torch.Tensor):
        return obj[NP_TAG].numpy()
    if isinstance(obj, dict):
        return {k: from_safe(v) for k, v in obj.items()}
    return type(obj)(from_safe(v) for v in obj) if isinstance(obj, (list, tuple)) else obj


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
    """The checkpoint of `run_dir`, `arrays` and `result` as Flower objects; nothing in it is executed."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        raise CheckpointError(f"resume-from={str(run_dir)!r} has no {FILE}: point it at the run folder of a "
                              f"run that finished at least one round")
    try:
        blob = from_safe(torch.load(path, weights_only=True, map_location="cpu"))
    except Exception as exc:  # noqa: BLE001 - any reason the file cannot be read says the same to the user
        raise CheckpointError(f"resume-from={str(run_dir)!r}: {path.name} cannot be read ({_why(exc)}); "
                              f"{_FIX}") from None

    def to_rec(d: dict | None) -> ArrayRecord | None:
        return None if d is None else ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in d.items()})

    try:
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
                              f"({type(exc).__name__}: {str(exc)[:120]}); {_FIX}") from None
    return blob


@contextmanager
def applying(run_dir: Path | str) -> Iterator[None]:
    """Wraps the use of a loaded checkpoint's strategy state (its registry, `strategy.load_state_dict`): a file
    `load_checkpoint` accepts can still hold a strategy state that is not this project's, and its failure
    there is the same one `CheckpointError` line as a corrupt file's, not a bare KeyError traceback."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - any reason the state does not fit says the same to the user
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
        raise CheckpointError(f"resume-from={str(run_dir)!r}: {FILE} holds a strategy state this run cannot use "
                              f"({why}): it is corrupt or not this project's; {_FIX}") from None
