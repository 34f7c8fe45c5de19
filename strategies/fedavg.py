"""FedAvg for diffusion: every node trains the whole denoiser (all T steps) for the same local
steps and the server averages the weights, weighted by examples (Flower's
`aggregate_arrayrecords`, the same arithmetic as `flwr.serverapp.strategy.FedAvg`).

Every reply is checked against the global model before it is averaged in: the same array
names, shapes and dtypes, all finite, and a positive example count. On evaluation rounds each
node receives the global model and samples x_T -> x_0 on its own device.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from collafuse_flwr import protocol as P

from .base import DiffusionStrategy, common_args

if TYPE_CHECKING:
    from collafuse_flwr.config import RunConfig


class FedAvgDiffusion(DiffusionStrategy):
    """FedAvg over a diffusion denoiser. `**common`: `DiffusionStrategy` arguments."""

    method = P.FEDAVG

    def __init__(self, **common: Any) -> None:
        super().__init__(**common)
        self._global: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (shape, dtype)

    @classmethod
    def from_run_config(cls, cfg: RunConfig, capacity: int | None = None, **kwargs: Any) -> FedAvgDiffusion:
        return cls(**{**common_args(cfg), "capacity": capacity, **kwargs})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}
        return self._send(self._participants(grid),
                          lambda n: RecordDict({P.ARRAYS: arrays,
                                                P.CONFIG: self._config(config, server_round, n)}),
                          "train")

    def validate_reply(self, phase: str, client: int, msg: Message) -> str:
        if phase != "train":
            return ""
        if P.ARRAYS not in msg.content.array_records:
            return f"weights: no '{P.ARRAYS}' array record"
        rec = msg.content[P.ARRAYS]
        if set(rec.keys()) != set(self._global):
            return f"weights: array names differ from the global model's ({sorted(set(rec) ^ set(self._global))[:3]} ...)"
        for k, a in rec.items():
            if (tuple(a.shape), a.dtype) != self._global[k]:
                return f"weights: '{k}' is {a.dtype}{tuple(a.shape)}, the global model's is {self._global[k][1]}{self._global[k][0]}"
            if not np.isfinite(a.numpy()).all():
                return f"weights: '{k}' has non-finite values"
        n = msg.content[P.METRICS].get(P.NUM_EXAMPLES, 0)
        if not n > 0:
            return f"num-examples: must be > 0, got {n}"
        return ""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord]:
        ok = self._accept(server_round, replies, "train")
        arrays = None
        if ok:
            records = [RecordDict({"a": m.content[P.ARRAYS],
                                   "m": MetricRecord({P.NUM_EXAMPLES: m.content[P.METRICS][P.NUM_EXAMPLES]})})
                       for m in ok]
            arrays = aggregate_arrayrecords(records, P.NUM_EXAMPLES)
        metrics = self.mean_metrics(ok)
        self.recorder.record(server_round, **dict(metrics))
        self._progress(server_round, "train", **{k: float(v) for k, v in metrics.items() if k == P.TRAIN_LOSS})
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self._eval_messages(server_round, grid, config,
                                   lambda n, conf: RecordDict({P.ARRAYS: arrays, P.CONFIG: conf}),
                                   **{P.CLIENT_SAMPLING_STEPS: self.sampling_steps})
