"""Centralized reference: the server pools the nodes' raw training images and trains one full
denoiser. This SHARES RAW DATA: it is the privacy worst case and the quality upper bound, not
a private method.

Round 1 collects the images; every round the server takes as many optimizer steps as all
nodes together take in FedAvg or local-only (nodes x local-steps), so total optimizer steps
match. At evaluation the server generates each node's samples and sends them to the node, which
scores them against its own held-out test split.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import WARNING

import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from collafuse_flwr.config import RunConfig
from collafuse_flwr.data import to_uint8
from collafuse_flwr.models import Denoiser
from collafuse_flwr.training import client_share_loss, generate, train_steps

from .base import HarnessMixin


class Centralized(HarnessMixin, Strategy):
    def __init__(self, cfg: RunConfig, model: Denoiser, image_shape: tuple[int, int, int],
                 device: torch.device, min_nodes: int = 1, on_round_end=None) -> None:
        self._init_harness(cfg, min_nodes, on_round_end)
        self._init_server_model(model, image_shape, device)
        self.pool: torch.Tensor | None = None
        self.pool_labels: torch.Tensor | None = None  # which client each image came from
        self.num_nodes = 0
        log(WARNING, "method=centralized is a REFERENCE that pools the clients' raw training images "
            "on the server (no privacy); use it as the quality upper bound only")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid: Grid) -> Iterable[Message]:
        if self.pool is not None:
            return []  # the raw data was collected once
        conf = self._base_config(server_round)
        msgs = self._messages(self._sample(grid), lambda _: RecordDict({"config": conf}), MessageType.TRAIN)
        return self._count_down(msgs, "train")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        ok = self._split_replies(server_round, replies, "train")
        if self.pool is None:
            parts = [torch.from_numpy(m.content["upload"]["x0"].numpy()) for m in ok]
            if not parts:
                log(WARNING, "round %d: no node sent data; nothing to train on yet", server_round)
                return None, None
            self.pool = torch.cat(parts)
            self.pool_labels = torch.cat([torch.full((p.shape[0],), self.node_to_partition[m.metadata.src_node_id])
                                          for p, m in zip(parts, ok)])
            self.num_nodes = len(parts)
        steps = self.cfg.local_steps * self.num_nodes
        t0 = time.perf_counter()
        loss = train_steps(self.model, self.optimizer, client_share_loss(self.model, self.sched, self.sched.T, self.gen),
                           self.pool, steps, self.cfg.batch_size, self.gen, self.device, self.meter, "server-train",
                           labels=self.pool_labels)
        metrics = {"server-train-loss": loss, "server-train-seconds": time.perf_counter() - t0,
                   "num-examples": int(self.pool.shape[0])}
        if self.meter is not None:
            metrics["server-train-flops"] = float(self.meter.totals.pop("server-train", 0))
        self._record(server_round, **metrics)
        self._progress(server_round, "train", **{"server-train-loss": loss})
        return ArrayRecord(self.model.state_dict()), None

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config, grid: Grid) -> Iterable[Message]:
        n = self.cfg.num_eval_samples
        conf = self._base_config(server_round, **{"num-samples": n})

        def content(node_id: int) -> RecordDict:
            imgs = generate(self.model, self.sched, n, self.image_shape, self.cfg.sampling_steps or None,
                            self.gen, self.device, self.meter, label=self.node_to_partition.get(node_id, 0))
            return RecordDict({"config": conf, "generated": ArrayRecord({"images": Array(to_uint8(imgs).numpy())})})

        return self._evaluate_messages(server_round, grid, content, harness=("generated",))
