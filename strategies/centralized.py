"""Centralized reference: the server pools the nodes' raw training images and trains one full
denoiser. This SHARES RAW DATA: it is the privacy worst case and the quality upper bound, not
a private method.

Round 1 collects the images; every round the server takes as many optimizer steps as all
nodes together take in FedAvg or local-only (nodes x local_steps), so total optimizer steps
match. At evaluation the server generates each node's samples and sends them to the node, which
scores them against its own held-out test split.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log
from torch import nn

from collafuse_flwr import protocol as P
from collafuse_flwr.core import diffusion as D
from collafuse_flwr.core.flops import FlopMeter
from collafuse_flwr.core.images import to_uint8
from collafuse_flwr.core.training import client_share_loss, generate, make_optimizer, train_steps

from .base import DiffusionStrategy



class Centralized(DiffusionStrategy):
    """The pooled-data reference. `local_steps`: per node per round (the server takes
    nodes x local_steps); the rest as in `CollaFuse`."""

    method = P.CENTRALIZED
    checkpoint_attrs = ("pool", "pool_labels", "num_contributors")

    def __init__(self, model: nn.Module, image_shape: tuple[int, int, int], *, diffusion_steps: int = 1000,
                 beta_schedule: str = "cosine", local_steps: int = 40, batch_size: int = 32,
                 learning_rate: float = 2e-3, seed: int = 0, device: torch.device | str | None = None,
                 count_flops: bool = False, flops_every_pass: bool = False, **common: Any) -> None:
        common.setdefault("capacity", getattr(model, "num_classes", 0) or None)
        super().__init__(**common)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = model.to(self.device)
        self.image_shape = tuple(image_shape)
        self.sched = D.make_schedule(diffusion_steps, beta_schedule)  # type: ignore[arg-type]
        self.local_steps, self.batch_size = local_steps, batch_size
        self.optimizer = make_optimizer(self.model, learning_rate)
        self.meter = FlopMeter(every_pass=flops_every_pass) if count_flops else None
        self.gen = torch.Generator().manual_seed(seed + 7919)
        self.pool: torch.Tensor | None = None
        self.pool_labels: torch.Tensor | None = None  # which client each image came from
        self.num_contributors = 0
        log(WARNING, "method=centralized is a REFERENCE that pools the clients' raw training images "
            "on the server (no privacy); use it as the quality upper bound only")


    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.pool is not None:
            return []  # the raw data was collected once
        return self._send(self._participants(grid),
                          lambda n: RecordDict({P.CONFIG: self._config(config, server_round, n)}),
                          "train")

    def validate_reply(self, phase: str, client: int, msg: Message) -> str:
        if phase != "train":
            return ""
        if P.UPLOAD not in msg.content.array_records or P.X0 not in msg.content[P.UPLOAD]:
            return f"upload: no '{P.UPLOAD}/{P.X0}' array"
        a = msg.content[P.UPLOAD][P.X0]
        if a.dtype != "float32" or len(a.shape) != 4 or tuple(a.shape[1:]) != self.image_shape:
            return f"upload: expected float32 (n, {self.image_shape}), got {a.dtype}{tuple(a.shape)}"
        x = a.numpy()
        if not np.isfinite(x).all() or (x.size and float(np.abs(x).max()) > 1.0):
            return "upload values: raw images must be finite and within [-1, 1]"
        return ""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.pool is None:
            ok = self._accept(server_round, replies, "train")
            parts = [(self.client_of(m.metadata.src_node_id),
                      torch.from_numpy(m.content[P.UPLOAD][P.X0].numpy())) for m in ok]
            if not parts:
                log(WARNING, "round %d: no node sent data; nothing to train on yet", server_round)
                return None, None
            self.pool = torch.cat([p for _, p in parts])
            self.pool_labels = torch.cat([torch.full((p.shape[0],), c) for c, p in parts])
            self.num_contributors = len(parts)
        steps = self.local_steps * self.num_contributors
        t0 = time.perf_counter()
        loss = train_steps(self.model, self.optimizer, client_share_loss(self.model, self.sched, self.sched.T, self.gen),
                           self.pool, steps, self.batch_size, self.gen, self.device, self.meter, "server-train",
                           labels=self.pool_labels, guard=True)
        metrics: dict[str, float] = {"server-train-seconds": time.perf_counter() - t0,
                                     P.NUM_EXAMPLES: int(self.pool.shape[0])}
        if loss == loss:
            metrics["server-train-loss"] = loss
        if self.meter is not None:
            metrics["server-train-flops"] = float(self.meter.totals.pop("server-train", 0))
        self.recorder.record(server_round, **metrics)
        self._progress(server_round, "train", **{"server-train-loss": loss})
        return ArrayRecord(self.model.state_dict()), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        n = self.num_eval_samples

        def content(node_id: int, conf: ConfigRecord) -> RecordDict:
            imgs = generate(self.model, self.sched, n, self.image_shape, self.sampling_steps or None,
                            self.gen, self.device, self.meter, label=self.client_of(node_id))
            return RecordDict({P.CONFIG: conf,
                               P.GENERATED: ArrayRecord({P.IMAGES: Array(to_uint8(imgs).numpy())})})

        return self._eval_messages(server_round, grid, config, content, harness=(P.GENERATED,))
