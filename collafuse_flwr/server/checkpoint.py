"""Checkpoint after every round and resume a killed run from its last finished round.

The checkpoint holds what the next round needs to go on exactly as if nothing happened: the
strategy's state (server model, optimizer, upload buffer, registry, RNG states, records), the
global arrays, Flower's `Result` so far and the run-config. It is written atomically (a
temporary file, then a rename), so a kill during the write leaves the previous one intact.
The nodes keep their own state (client_app.py); the server tells them which run's state to
continue with (`run-key`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Result

FILE = "checkpoint.pt"


def _arrays(rec: ArrayRecord | None) -> dict[str, np.ndarray] | None:
    return None if rec is None else {k: a.numpy() for k, a in rec.items()}


def save_checkpoint(run_dir: Path, strategy, server_round: int, arrays: ArrayRecord, result: Result,
                    config: dict[str, Any], run_key: int) -> Path:
    blob = {"round": server_round, "config": config, "run_key": run_key, "strategy": strategy.state_dict(),
            "arrays": _arrays(arrays),
            "result": {"arrays": _arrays(result.arrays),
                       **{name: {r: dict(m) for r, m in getattr(result, name).items()}
                          for name in ("train_metrics_clientapp", "evaluate_metrics_clientapp",
                                       "evaluate_metrics_serverapp")}}}
    path = Path(run_dir) / FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The checkpoint of `run_dir`, with `arrays` and `result` as Flower objects again."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        raise FileNotFoundError(f"resume-from={str(run_dir)!r} has no {FILE}: point it at the run folder of a "
                                f"run that finished at least one round")
    blob = torch.load(path, weights_only=False)  # the server's own file, written by save_checkpoint
    to_rec = lambda d: None if d is None else ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in d.items()})  # noqa: E731
    result = Result()
    result.arrays = to_rec(blob["result"]["arrays"])
    for name in ("train_metrics_clientapp", "evaluate_metrics_clientapp", "evaluate_metrics_serverapp"):
        getattr(result, name).update({r: MetricRecord(m) for r, m in blob["result"][name].items()})
    blob["arrays"] = to_rec(blob["arrays"]) or ArrayRecord()
    blob["result"] = result
    return blob
