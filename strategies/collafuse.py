"""The CollaFuse strategy (Message API): clients train their low-noise share and upload x_{t_c};
the server trains the shared high-noise denoiser on those uploads.

Round r:
1. configure_train: every node gets the cut step t_c, local steps, batch size and how many
   x_{t_c} to upload. No weights go down: the server model is never shared.
2. aggregate_train: uploads join the server's buffer and the server denoiser (the strategy's
   global ArrayRecord) trains `server-steps` steps on t > t_c.
3. configure_evaluate (every `eval-every` rounds and at the end): the server runs x_T -> x_{t_c}
   once per node and sends those x_{t_c}; the node finishes x_{t_c} -> x_0 privately.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from collafuse_flwr import diffusion as D
from collafuse_flwr.config import RunConfig
from collafuse_flwr.models import Denoiser
from collafuse_flwr.training import server_share_loss, train_steps

from .base import HarnessMixin


class CollaFuse(HarnessMixin, Strategy):
    def __init__(self, cfg: RunConfig, server_model: Denoiser, image_shape: tuple[int, int, int],
                 device: torch.device, min_nodes: int = 1, on_round_end=None) -> None:
        self._init_harness(cfg, min_nodes, on_round_end)
        self._init_server_model(server_model, image_shape, device)
        self.t_c = D.cut_step(cfg.cut_ratio, cfg.diffusion_steps)
        self.t_start = D.client_start_step(cfg.cut_ratio, cfg.diffusion_steps, cfg.server_target)
        self.buffer: list[torch.Tensor] = []
        self.buffer_labels: list[torch.Tensor] = []  # which client each upload came from
        self.uploads_by_node: dict[int, np.ndarray] = {}  # last upload of each node (disclosure harness)
        self.server_share = self.t_c < self.sched.T
        self._served = 0  # images whose server half ran since the last evaluation
        self.reference: torch.nn.Module | None = None  # the disclosure harness's attacker model
        # Scored only on uploads, so not at c=0 (raw uploads) nor at c=1 (none). Trained at the
        # first evaluation, in this thread, while the clients are idle: trained beside them (as a
        # background thread from the start once was) it took ~1 core for ~30 s of round 1 and
        # slowed the clients' 2 OpenMP threads more than it saved (benchmarks/overhead.py).
        self.needs_reference = 0 < self.t_c < self.sched.T and cfg.attack_reference_steps > 0
        if self.t_c == 0:
            log(WARNING, "cut-ratio=0: clients upload their RAW training images (x_0) - this is the "
                "server-only extreme and discloses the data completely")
        if self.t_c == self.sched.T:
            log(WARNING, "cut-ratio=1: clients train alone and upload nothing (local-only extreme)")

    # -- training ---------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid: Grid) -> Iterable[Message]:
        uploads = self.cfg.uploads_per_round if self.server_share else 0
        conf = self._base_config(server_round, **{"cut-step": self.t_c, "client-max-step": self.t_start,
                                                  "uploads": uploads})
        msgs = self._messages(self._sample(grid), lambda _: RecordDict({"config": conf}), MessageType.TRAIN)
        return self._count_down(msgs, "train")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        ok = self._split_replies(server_round, replies, "train")
        n_new = 0
        for m in ok:
            if "upload" in m.content.array_records:
                x = m.content["upload"]["x_tc"].numpy()
                self.buffer.append(torch.from_numpy(x))
                pid = self.node_to_partition[m.metadata.src_node_id]
                self.buffer_labels.append(torch.full((x.shape[0],), pid, dtype=torch.long))
                self.uploads_by_node[m.metadata.src_node_id] = x
                n_new += x.shape[0]
        loss = float("nan")
        t0 = time.perf_counter()
        if self.server_share and self.buffer and self.cfg.server_steps > 0:
            data = torch.cat(self.buffer)
            loss = train_steps(self.model, self.optimizer,
                               server_share_loss(self.model, self.sched, self.t_c, self.cfg.server_target, self.gen),
                               data, self.cfg.server_steps, self.cfg.batch_size, self.gen, self.device,
                               self.meter, "server-train", labels=torch.cat(self.buffer_labels))
        metrics = self._mean_metrics(ok)
        metrics["server-train-loss"] = loss
        metrics["server-train-seconds"] = time.perf_counter() - t0
        metrics["uploads-received"] = n_new
        if self.meter is not None:
            metrics["server-train-flops"] = float(self.meter.totals.pop("server-train", 0))
        self._record(server_round, **dict(metrics))
        self._progress(server_round, "train", **{k: float(v) for k, v in metrics.items()
                                                 if k in ("train-loss", "server-train-loss", "uploads-received")})
        return ArrayRecord(self.model.state_dict()), metrics

    # -- evaluation ---------------------------------------------------------------------------
    def server_half(self, n: int, client: int) -> torch.Tensor:
        """x_T -> x_{t_c} with the shared model for one client (what that node receives)."""
        s_srv, _ = D.split_step_budget(self.cfg.sampling_steps, self.sched.T, self.t_c)
        self._served += n
        self.model.eval()
        self.model.condition(client)
        eps_model = self.meter.wrap(self.model, "server-infer") if self.meter is not None else self.model
        with torch.no_grad():
            x = D.server_sample(eps_model, self.sched, (n, *self.image_shape), self.t_c,
                                self.cfg.server_target, s_srv, self.gen, self.device)
        return x.cpu()

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config, grid: Grid) -> Iterable[Message]:
        n = self.cfg.num_eval_samples
        _, s_cli = D.split_step_budget(self.cfg.sampling_steps, self.sched.T, self.t_c)
        conf = self._base_config(server_round, **{"num-samples": n, "client-start-step": self.t_start,
                                                  "client-sampling-steps": s_cli or 0})

        def content(node_id: int) -> RecordDict:
            rd = RecordDict({"config": conf})
            if self.t_c < self.sched.T:
                pid = self.node_to_partition.get(node_id, 0)
                rd["x_tc"] = ArrayRecord({"x_tc": Array(self.server_half(n, pid).float().numpy())})
            if node_id in self.uploads_by_node:  # measurement only: what the server can infer
                rd["harness"] = self.disclosure_payload(self.uploads_by_node[node_id],
                                                        self.node_to_partition.get(node_id, 0))
            return rd

        return self._evaluate_messages(server_round, grid, content, harness=("harness",))

    def disclosure_payload(self, uploads: np.ndarray, pid: int) -> ArrayRecord:
        """The server's reconstructions of a node's last upload, sent back for scoring only."""
        from collafuse_flwr.metrics.disclosure import reconstruct

        if self.reference is None and self.needs_reference:
            from collafuse_flwr.attack import train_reference_denoiser

            self.reference = train_reference_denoiser(self.cfg, self.min_nodes, self.device)
        x = torch.from_numpy(uploads)
        self.model.eval()
        with torch.no_grad():
            # The server model only learned t > t_c; read at t_c as an ordinary DDPM, its Tweedie
            # output is the best x_0 guess it can make with what it owns.
            self.model.condition(pid)
            own = reconstruct(x, self.sched, self.t_c, self.model if self.t_c > 0 else None)
            scaled = reconstruct(x, self.sched, self.t_c, None)
            recon = {"recon-server": own, "recon-scaled": scaled}
            if self.reference is not None:
                recon["recon-reference"] = reconstruct(x, self.sched, self.t_c, self.reference)
            elif self.t_c == 0:
                recon["recon-reference"] = own  # raw images: every attacker recovers them exactly
        return ArrayRecord({"uploads": Array(uploads.astype(np.float32)),
                            **{k: Array(v.float().numpy()) for k, v in recon.items()}})

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if self.meter is not None and self._served:
            flops = float(self.meter.totals.pop("server-infer", 0))
            self._record(server_round, **{"server-infer-flops-per-image": flops / self._served})
        self._served = 0
        return super().aggregate_evaluate(server_round, replies)
