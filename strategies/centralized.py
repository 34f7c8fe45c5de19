"""Centralized reference: the server pools the nodes' raw training images and trains one full
denoiser. This SHARES RAW DATA: the privacy worst case and quality upper bound, not a private method.
Round 1 collects the images; every round the server takes nodes x local_steps steps (the total of
FedAvg or local-only) and at evaluation sends each node samples to score on its own test split.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from collafuse_flwr import protocol as P
from collafuse_flwr.core import diffusion as D
from collafuse_flwr.core.images import to_uint8
from collafuse_flwr.core.training import client_share_loss, generate

from .base import DiffusionStrategy, ImplausibleUpload, MalformedReply, decoded
from .trainer import ServerTrainer


class Centralized(DiffusionStrategy):
    """The pooled-data reference; `trainer.buffer` holds the pool by client, `local_steps` is per node."""

    method = P.CENTRALIZED
    checkpoint_attrs = ("num_contributors",)

    def __init__(self, trainer: ServerTrainer, image_shape: tuple[int, int, int], *, diffusion_steps: int = 1000,
                 beta_schedule: str = "cosine", local_steps: int = 40, **common: Any) -> None:
        common.setdefault("capacity", getattr(trainer.model, "num_classes", 0) or None)
        common.setdefault("seed", trainer.seed)
        super().__init__(image_shape=image_shape, **common)
        self.trainer = trainer
        self.sched = D.make_schedule(diffusion_steps, beta_schedule)  # type: ignore[arg-type]
        self.local_steps = local_steps
        self.num_contributors = 0
        log(WARNING, "method=centralized is a REFERENCE that pools the clients' raw training images "
            "on the server (no privacy); use it as the quality upper bound only")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.trainer.buffer:
            return []  # the raw data was collected once
        # from every client, whatever fraction-train says: a sample would cut the pool for good
        return self._train_messages(server_round, grid, config, everyone=True)

    def validate_reply(self, phase: str, client: int, msg: Message) -> None:
        if phase != "train":
            return
        if P.UPLOAD not in msg.content.array_records or P.X0 not in msg.content[P.UPLOAD]:
            raise MalformedReply(f"upload: no '{P.UPLOAD}/{P.X0}' array")
        a = msg.content[P.UPLOAD][P.X0]
        if a.dtype != "float32" or len(a.shape) != 4 or tuple(a.shape[1:]) != self.image_shape:
            raise MalformedReply(f"upload: expected float32 (n, {self.image_shape}), got {a.dtype}{tuple(a.shape)}")
        x = decoded(a, f"{P.UPLOAD}/{P.X0}")  # the pool takes these bytes: as declared
        if not np.isfinite(x).all() or (x.size and float(np.abs(x).max()) > 1.0):
            raise ImplausibleUpload("upload values: raw images must be finite and within [-1, 1]")

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if not self.trainer.buffer:
            ok = self._accept(server_round, replies, "train")
            if not ok:
                log(WARNING, "round %d: no node sent data; nothing to train on yet", server_round)
                return None, None
            for m in ok:
                self.trainer.buffer[self.client_of(m.metadata.src_node_id)] = [
                    torch.from_numpy(m.content[P.UPLOAD][P.X0].numpy())]
            self.num_contributors = len(ok)
        data, labels = self.trainer.tensors()
        loss_fn = client_share_loss(self.model, self.sched, self.sched.T, self.trainer.gen)
        metrics = self.trainer.train(self.local_steps * self.num_contributors, loss_fn, data, labels, balanced=False)
        metrics = {"server-train-seconds": metrics.pop("server-train-seconds"), P.NUM_EXAMPLES: int(data.shape[0]),
                   **metrics}
        self.recorder.record(server_round, **metrics)
        self._progress(server_round, "train", **{"server-train-loss": metrics.get("server-train-loss", float("nan"))})
        return ArrayRecord(self.model.state_dict()), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        def content(node_id: int, conf: ConfigRecord) -> RecordDict:
            t = self.trainer
            imgs = generate(self.model, self.sched, self.num_eval_samples, self.image_shape,
                            self.sampling_steps or None, t.gen, t.device, t.meter, label=self.client_of(node_id))
            return RecordDict({P.CONFIG: conf,
                               P.GENERATED: ArrayRecord({P.IMAGES: Array(to_uint8(imgs).numpy())})})

        return self._eval_messages(server_round, grid, config, content, harness=(P.GENERATED,))
