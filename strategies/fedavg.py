"""FedAvg for diffusion: every node trains the whole denoiser and the server averages the weights
by examples (Flower's `aggregate_arrayrecords`, the arithmetic of `flwr.serverapp.strategy.FedAvg`).
A reply must match the global model (names, shapes, dtypes, finite) with a positive example
count. One client cannot take the average over: its claim is capped (base `_cap_claims`) and its
update scaled down to `robust.CLIP_FACTOR` x the others' median norm, both flagged by client where
at least `robust.MIN_OTHERS` others make the median (with one other, neither is to blame).
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

from .base import DiffusionStrategy, ImplausibleUpload, MalformedReply, decoded
from .robust import CLIP_FACTOR, MIN_OTHERS, clip_bounds, clipped, update_norms

#: fedavg-aggregation: FedAvg's weighted mean, FedMedian, FedTrimmedAvg (TRIM_BETA of each tail)
AGGREGATIONS = ("mean", "median", "trimmed-mean")
TRIM_BETA = 0.2  # FedTrimmedAvg's default


class FedAvgDiffusion(DiffusionStrategy):
    """FedAvg over a diffusion denoiser. aggregation: "mean" (example-weighted), "median" or
    "trimmed-mean" (unweighted: Flower's robust baselines); clip_updates: scale an oversized update down."""

    method = P.FEDAVG

    def __init__(self, *, aggregation: str = "mean", clip_updates: bool = True, **common: Any) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {list(AGGREGATIONS)}, got {aggregation!r}")
        super().__init__(**common)
        self.aggregation, self.clip_updates = aggregation, clip_updates
        self._global_arrays: dict[str, np.ndarray] = {}  # the model the round's replies must match

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t├──> aggregation=%s, update clipping %s", self.aggregation,
            "on" if self.clip_updates else "off")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global_arrays = {k: a.numpy() for k, a in arrays.items()}
        return self._train_messages(server_round, grid, config,
                                    lambda n, conf: RecordDict({P.ARRAYS: arrays, P.CONFIG: conf}))

    def validate_reply(self, phase: str, client: int, msg: Message) -> None:
        if phase != "train":
            return
        if P.ARRAYS not in msg.content.array_records:
            raise MalformedReply(f"weights: no '{P.ARRAYS}' array record")
        rec = msg.content[P.ARRAYS]
        if set(rec.keys()) != set(self._global_arrays):
            raise MalformedReply(f"weights: array names differ from the global model's "
                                 f"({sorted(set(rec) ^ set(self._global_arrays))[:3]} ...)")
        for k, a in rec.items():
            g = self._global_arrays[k]
            if (tuple(a.shape), a.dtype) != (g.shape, str(g.dtype)):
                raise MalformedReply(f"weights: '{k}' is {a.dtype}{tuple(a.shape)}, the global model's is "
                                     f"{g.dtype}{g.shape}")
            if not np.isfinite(decoded(a, f"{P.ARRAYS}/{k!r}")).all():  # what is averaged: as declared
                raise ImplausibleUpload(f"weights: '{k}' has non-finite values")
        n = msg.content[P.METRICS].get(P.NUM_EXAMPLES, 0)
        if not n > 0:
            raise MalformedReply(f"num-examples: must be > 0, got {n}")

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
        return arrays, self._train_done(server_round, ok)

    def _clipped_weights(self, server_round: int, ok: list[Message]) -> list[ArrayRecord]:
        """Each reply's weights, an update too large scaled down (the others exactly as sent: a
        round where nothing is clipped averages bit-identically to plain FedAvg)."""
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
            detail = (f"update norm {norms[c]:.4g} is {norms[c] * CLIP_FACTOR / bounds[c]:.3g}x the median of the "
                      f"other clients'; scaled down to {bounds[c]:.4g}")
            log(WARNING, "round %d: client %d (node %d): %s", server_round, c, m.metadata.src_node_id, detail)
            if len(ok) > MIN_OTHERS:  # one other client is no yardstick to blame by (robust.MIN_OTHERS)
                self.recorder.flag(server_round, c, "update-clipped", detail)
            out.append(ArrayRecord({k: Array(np.ascontiguousarray(v))
                                    for k, v in clipped(local[c], self._global_arrays, scale).items()}))
        return out

    def _robust_aggregate(self, records: list[ArrayRecord]) -> ArrayRecord:
        """Flower's FedMedian (np.median of the stacked layers) or FedTrimmedAvg (its `trim_mean`),
        layer by layer, in each layer's dtype."""
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
