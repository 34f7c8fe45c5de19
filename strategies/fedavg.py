"""FedAvg for diffusion: every node trains the whole denoiser (all T steps) for the same local
steps and the server averages the weights, weighted by examples (Flower's
`aggregate_arrayrecords`, the same arithmetic as `flwr.serverapp.strategy.FedAvg`).

Every reply is checked against the global model before it is averaged in: the same array
names, shapes and dtypes, all finite, and a positive example count. One client cannot take the
average over: its example count weighs at most what it declared at first contact and twice the
median of the others' (base `_cap_claims`), and its update (weights minus the global model) is
scaled down to at most `robust.CLIP_FACTOR` x the median of the others' update norms; both are
logged naming the client and recorded for results.json. Flower's robust aggregations are
offered as baselines (`aggregation`): "median" (FedMedian's coordinate-wise median) and
"trimmed-mean" (FedTrimmedAvg's `trim_mean`). On evaluation rounds each node receives the
global model and samples x_T -> x_0 on its own device.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore import log

from collafuse_flwr import protocol as P

from .base import DiffusionStrategy
from .robust import CLIP_FACTOR, clip_bounds, clipped, update_norms

#: fedavg-aggregation choices: example-weighted mean (FedAvg), coordinate-wise median (FedMedian),
#: trimmed mean (FedTrimmedAvg, TRIM_BETA of each tail)
AGGREGATIONS = ("mean", "median", "trimmed-mean")
TRIM_BETA = 0.2  # FedTrimmedAvg's default



class FedAvgDiffusion(DiffusionStrategy):
    """FedAvg over a diffusion denoiser.

    aggregation : "mean" | "median" | "trimmed-mean"
        FedAvg's example-weighted mean (default), or Flower's FedMedian / FedTrimmedAvg rule
        (unweighted, so example counts do not matter to them) as robust baselines.
    clip_updates : bool
        Scale an update larger than `robust.CLIP_FACTOR` x the median of the others' down to it.
    **common
        `DiffusionStrategy` arguments.
    """

    method = P.FEDAVG

    def __init__(self, *, aggregation: str = "mean", clip_updates: bool = True, **common: Any) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {list(AGGREGATIONS)}, got {aggregation!r}")
        super().__init__(**common)
        self.aggregation, self.clip_updates = aggregation, clip_updates
        self._global: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (shape, dtype)
        self._global_arrays: dict[str, np.ndarray] = {}


    def summary(self) -> None:
        super().summary()
        log(INFO, "\t├──> aggregation=%s, update clipping %s", self.aggregation, "on" if self.clip_updates else "off")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}
        self._global_arrays = {k: a.numpy() for k, a in arrays.items()}
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
        ok = self._accept(server_round, replies, "train")  # example claims already capped there
        arrays = None
        if ok:
            weights = self._clipped_weights(server_round, ok)
            if self.aggregation == "mean":
                records = [RecordDict({"a": weights[i],
                                       "m": MetricRecord({P.NUM_EXAMPLES: m.content[P.METRICS][P.NUM_EXAMPLES]})})
                           for i, m in enumerate(ok)]
                arrays = aggregate_arrayrecords(records, P.NUM_EXAMPLES)
            else:
                arrays = self._robust_aggregate(weights)
        metrics = self.mean_metrics(ok)
        self.recorder.record(server_round, **dict(metrics))
        self._progress(server_round, "train", **{k: float(v) for k, v in metrics.items() if k == P.TRAIN_LOSS})
        return arrays, metrics

    def _clipped_weights(self, server_round: int, ok: list[Message]) -> list[ArrayRecord]:
        """Each reply's weights, an update too large scaled down (the others exactly as sent, so
        a round where nothing is clipped averages bit-identically to plain FedAvg)."""
        recs = [m.content[P.ARRAYS] for m in ok]
        if not self.clip_updates or len(ok) < 2 or not self._global_arrays:
            return recs
        clients = [self.client_of(m.metadata.src_node_id) for m in ok]
        local = {c: {k: a.numpy() for k, a in r.items()} for c, r in zip(clients, recs)}
        norms = update_norms(local, self._global_arrays)
        bounds = clip_bounds(norms)
        out = []
        for c, m, r in zip(clients, ok, recs):
            if norms[c] <= bounds[c]:
                out.append(r)
                continue
            scale = bounds[c] / norms[c]
            detail = (f"update norm {norms[c]:.4g} is {norms[c] * CLIP_FACTOR / bounds[c]:.3g}x the median of the other "
                      f"clients'; scaled down to {bounds[c]:.4g}")
            log(WARNING, "round %d: client %d (node %d): %s", server_round, c, m.metadata.src_node_id, detail)
            self.recorder.flag(server_round, c, "update-clipped", detail)
            out.append(ArrayRecord({k: Array(np.ascontiguousarray(v))
                                    for k, v in clipped(local[c], self._global_arrays, scale).items()}))
        return out

    def _robust_aggregate(self, records: list[ArrayRecord]) -> ArrayRecord:
        """Flower's FedMedian (np.median over the stacked layers, as flwr.serverapp.strategy.
        FedMedian does) or FedTrimmedAvg (its `trim_mean`), layer by layer, in each layer's dtype."""
        out = ArrayRecord()
        for k in records[0].keys():
            layers = np.stack([r[k].numpy() for r in records])
            agg = np.median(layers, axis=0) if self.aggregation == "median" else trim_mean(layers, TRIM_BETA)
            out[k] = Array(np.asarray(agg).astype(layers.dtype))
        return out

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self._eval_messages(server_round, grid, config,
                                   lambda n, conf: RecordDict({P.ARRAYS: arrays, P.CONFIG: conf}),
                                   **{P.CLIENT_SAMPLING_STEPS: self.sampling_steps})
